"""`neuronmap` subcommands of the explain stage: the units chosen, each shard's explanations and
held-out excerpts, their scores against the control, and the merged tables."""

from __future__ import annotations

import hashlib
import logging

from .settings import ExplainSettings, MergeSettings, ScoreSettings, UnitsSettings

log = logging.getLogger("neuronmap")

SETTINGS = {"explain-units": UnitsSettings, "explain": ExplainSettings, "explain-score": ScoreSettings,
            "explain-merge": MergeSettings}


def cmd_explain_units(args) -> None:
    """the units the explain stage describes (explain.units, capped by explain.max_units)"""
    from ..io.parquet import read_table, write_table
    from .select import select_units
    s = args.settings
    label_units = read_table(args.label_units) if args.label_units else None
    if s.units.startswith("labels") and label_units is None:
        from ..errors import NeuronmapError
        raise NeuronmapError(f"explain.units: {s.units} needs the labels stage (a labelled corpus)")
    units = select_units(s.units, s.max_units, s.seed, s.sites, label_units=label_units,
                         relation_units=args.relation_units, corpus_units=args.corpus_units)
    write_table(units, args.out)
    for group, count in units.group_by("selected_for").len().sort("selected_for").iter_rows():
        log.info("explain: %d units selected for %s", count, group)
    log.info("explain: %d units in all", units.height)


def args_explain_units(p) -> None:
    p.add_argument("--label-units", help="labels/label_units.parquet (explain.units labels)")
    p.add_argument("--relation-units", nargs="*", default=[], help="units/<relation>.parquet (explain.units relations)")
    p.add_argument("--corpus-units", help="corpus/units.parquet (explain.units top:<column> and all)")
    p.add_argument("--out", required=True)


def cmd_explain(args) -> None:
    """one shard of the selected units: activations on sampled contexts, the baseline's and the text
    model's explanations, and the held-out excerpts the score job judges"""
    from ..io import tables
    from ..io.parquet import read_table, write_table
    from ..model.cost import counting_forwards, job_cost
    from ..model.loading import load_for_job
    from ..model.source import read_manifest
    from .backends import LocalModel
    from .textmodels import text_model
    from .explainers import load_template
    from .job import explain_units
    from .journal import Journal
    from .select import shard_rows
    s = args.settings
    units = shard_rows(read_table(args.units), args.shard, s.shards)
    contexts = read_table(args.contexts, ["context_id", "document", "n_tokens", "token_ids"])
    model, tokenizer = load_for_job(args.model_dir, s.model, args.threads)
    spec = s.explainer_backend
    if spec.backend == "none":
        explainer = None
    else:
        own = LocalModel(model, tokenizer, read_manifest(args.model_dir)["source"], s.batch_size) \
            if spec.backend == "local" and spec.model is None else None
        explainer = text_model(spec, args.model_dir, s.model, args.threads, s.batch_size, loaded=own)
    template = load_template(s.prompt_template, "explain.txt")
    header = {"settings": s.to_json(), "units": units.select("site", "layer", "unit").rows(),
              "template": template}
    journal = Journal(args.journal, header)
    with counting_forwards(model) as count:
        explanations, sets = explain_units(units, contexts, model, tokenizer, explainer, template, s, journal,
                                           progress=f"explain shard {args.shard}")
    write_table(explanations, args.out_explanations, tables.EXPLANATIONS)
    write_table(sets, args.out_sets, tables.EXPLAIN_SETS)
    write_table(job_cost("explain", f"shard-{args.shard}", min(s.contexts, contexts.height), count), args.out_cost,
                tables.JOB_COST)
    journal.remove()


def args_explain(p) -> None:
    p.add_argument("--model-dir", required=True, help="directory written by prepare-model")
    p.add_argument("--contexts", required=True, help="corpus/contexts.parquet")
    p.add_argument("--units", required=True, help="explain/units.parquet")
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--journal", required=True, help="the job's journal: a killed job resumes from it")
    p.add_argument("--out-explanations", required=True)
    p.add_argument("--out-sets", required=True)
    p.add_argument("--out-cost", required=True)


def cmd_explain_score(args) -> None:
    """one shard's explanations (and another unit's, the control) judged on its held-out excerpts"""
    import polars as pl

    from ..io import tables
    from ..io.parquet import read_table, write_table
    from ..model.source import read_manifest
    from .textmodels import text_model
    from .explainers import load_template
    from .job import controls, score_units
    from .journal import Journal
    from .scoring import ModelScorer, TokenScorer
    from .select import shard_rows
    s = args.settings
    every = read_table(args.units)
    units = shard_rows(every, args.shard, s.shards)
    explanations = pl.concat([read_table(path) for path in args.explanations])
    sets = read_table(args.sets)
    control = controls(every, explanations, s.seed)
    spec = s.scorer_backend
    if spec.backend == "tokens":
        scorer = TokenScorer()
    else:
        model = text_model(spec, args.model_dir, s.model, args.threads, s.batch_size, where="explain.scorer")
        if spec.backend == "local" and spec.model is None:
            model.name = read_manifest(args.model_dir)["source"]
        scorer = ModelScorer(model, load_template(s.score_template, "score.txt"))
    digest = hashlib.sha256(explanations.sort("site", "layer", "unit", "explainer").write_csv().encode()).hexdigest()
    header = {"settings": s.to_json(), "units": units.select("site", "layer", "unit").rows(), "explanations": digest,
              "scorer": scorer.name}
    journal = Journal(args.journal, header)
    scores = score_units(units, explanations, sets, control, scorer, journal, progress=f"score shard {args.shard}")
    write_table(scores, args.out, tables.EXPLAIN_SCORES)
    if isinstance(scorer, ModelScorer):
        log.info("score shard %d: the scorer read %d prompt tokens", args.shard, scorer.prompt_tokens)
    journal.remove()


def args_explain_score(p) -> None:
    p.add_argument("--model-dir", required=True, help="directory written by prepare-model")
    p.add_argument("--units", required=True, help="explain/units.parquet (all shards': the control's derangement)")
    p.add_argument("--explanations", nargs="+", required=True, help="every explain job's explanations")
    p.add_argument("--sets", required=True, help="this shard's held-out excerpts")
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--journal", required=True, help="the job's journal: a killed job resumes from it")
    p.add_argument("--out", required=True)


def cmd_explain_merge(args) -> None:
    """every shard's explanations and scores in two tables, and the scores' summary in the log"""
    import polars as pl

    from ..io import tables
    from ..io.parquet import read_table, write_table
    from ..maths.explain_scores import score_summary
    s = args.settings
    key = ["site", "layer", "unit", "explainer"]
    explanations = pl.concat([read_table(path) for path in args.explanations]).sort(key)
    scores = pl.concat([read_table(path) for path in args.scores]).sort(key)
    write_table(explanations, args.out_explanations, tables.EXPLANATIONS)
    write_table(scores, args.out_scores, tables.EXPLAIN_SCORES)
    for metric in ("balanced_accuracy", "auc"):
        for row in score_summary(scores, s.bootstrap_resamples, s.confidence, s.seed, metric).iter_rows(named=True):
            log.info("%s, %s: %.3f [%.3f, %.3f] over %d units", metric, row["comparison"], row["mean"],
                     row["ci_low"], row["ci_high"], row["units"])


def args_explain_merge(p) -> None:
    p.add_argument("--explanations", nargs="+", required=True)
    p.add_argument("--scores", nargs="+", required=True)
    p.add_argument("--out-explanations", required=True)
    p.add_argument("--out-scores", required=True)
