"""`neuronmap` subcommands of the ablate stage: recall of the unmodified model, each relation's
batched sweep of deactivations (with perplexity of a neutral text), and the paired statistics of
every configuration against the baseline."""

from __future__ import annotations

import logging

from .settings import AblationSettings, BaselineSettings, SignificanceSettings, VerdictSettings

log = logging.getLogger("neuronmap")

SETTINGS = {"baseline": BaselineSettings, "ablate": AblationSettings, "ablation-summary": SignificanceSettings,
            "verdicts": VerdictSettings}


def _evaluation_prompts(path: str, translated_path: str, source_language: str):
    """The source language's test prompts, then the translated ones."""
    import polars as pl

    from ..io.parquet import read_table
    prompts = read_table(path).filter(pl.col("split") == "test").sort("prompt_id") \
        .with_columns(language=pl.lit(source_language))
    translated = read_table(translated_path).sort("prompt_id")
    return pl.concat([prompts, translated.select(prompts.columns)], how="vertical_relaxed")


def _split_languages(predictions, source_language: str):
    import polars as pl
    is_source = pl.col("language") == source_language
    return predictions.filter(is_source), predictions.filter(~is_source)


def cmd_baseline(args) -> None:
    """factual recall of the unmodified model on the test prompts"""
    from ..io import tables
    from ..io.parquet import write_table
    from ..model.cost import counting_forwards, job_cost
    from ..model.deactivation import Deactivation
    from ..model.loading import load_for_job
    from .ablation import BASELINE, evaluate_sweep
    settings = args.settings
    prompts = _evaluation_prompts(args.prompts, args.language_prompts, settings.source_language)
    model, tokenizer = load_for_job(args.model_dir, settings.model, args.threads)
    with counting_forwards(model) as count:
        predictions = evaluate_sweep(model, tokenizer, prompts, [BASELINE], [Deactivation.constant({})],
                                     settings.evaluation, configs_per_batch=1)
    source, translated = _split_languages(predictions, settings.source_language)
    write_table(job_cost("baseline", "baseline", prompts.height, count), args.out_cost, tables.JOB_COST)
    write_table(translated, args.out_languages, tables.LANGUAGE_PREDICTIONS)
    write_table(source, args.out, tables.PREDICTIONS)


def _evaluation_args(p) -> None:
    p.add_argument("--model-dir", required=True, help="directory written by prepare-model")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--prompts", required=True)
    p.add_argument("--language-prompts", required=True, help="translated test prompts (prepare-languages)")
    p.add_argument("--out-cost", required=True, help="tokens forwarded and seconds taken (cost.parquet's input)")


def args_baseline(p) -> None:
    _evaluation_args(p)
    p.add_argument("--out", required=True, help="predictions on the source language's prompts")
    p.add_argument("--out-languages", required=True, help="predictions on the translated prompts")


def cmd_ablate(args) -> None:
    """batched sweep: a relation's top-k (and random) units deactivated"""
    from ..io import tables
    from ..io.parquet import read_table, write_table
    from ..model.architectures import MlpSites
    from ..model.deactivation import Deactivation
    from ..model.dispatch import input_device
    from ..model.loading import load_for_job
    from .ablation import (
        BASELINE,
        DeactivationValue,
        ablations_for,
        configs_per_batch_for,
        deactivation_for,
        evaluate_plan,
        off_means,
    )
    from ..model.cost import counting_forwards, job_cost
    from .perplexity import mean_nll, perplexity_frame, read_text
    settings = args.settings
    selected = read_table(args.units)
    prompts = _evaluation_prompts(args.prompts, args.language_prompts, settings.source_language)
    value = DeactivationValue(settings.value, settings.clamp_value)
    model, tokenizer = load_for_job(args.model_dir, settings.model, args.threads)
    sites = MlpSites(model)
    widths = {site: sites.width(site) for site in selected["site"].unique()}
    negative_means = None
    if value.mode == "mean":
        expertise = read_table(args.expertise, ["site", "layer", "unit", "off_mean"])
        negative_means = off_means(expertise, {site: sites.width(site) for site in expertise["site"].unique()})
    plan = ablations_for(args.relation, selected, settings.top_k, settings.seeds, widths)
    configs = [deactivation_for(a, value, negative_means) for a in plan]
    per_batch = configs_per_batch_for(settings.configs_per_batch, input_device(model))
    log.info("%d ablation configurations per forward batch", per_batch)
    with counting_forwards(model) as count:
        predictions = evaluate_plan(model, tokenizer, prompts, plan, configs, settings.evaluation, per_batch,
                                    settings.random_eval)
        text = read_text(args.neutral_text, tokenizer, settings.perplexity_max_tokens)
        nll = mean_nll(model, text, [Deactivation.constant({})] + configs)
    source, translated = _split_languages(predictions, settings.source_language)
    perplexity = perplexity_frame([BASELINE] + plan, nll, tokens=text.shape[1] - 1)
    log.info("perplexity of %s (%d tokens): baseline %.3f; under ablation %s", args.neutral_text, text.shape[1],
             perplexity["perplexity"][0], perplexity["perplexity"][1:].round(3).to_list())

    # Prompts: each configuration's evaluated prompts (the sweep's predictions).
    write_table(job_cost("ablate", args.relation, predictions.height, count), args.out_cost, tables.JOB_COST)
    write_table(translated, args.out_language_predictions, tables.LANGUAGE_PREDICTIONS)
    write_table(perplexity, args.out_perplexity, tables.PERPLEXITY)
    write_table(source, args.out_predictions, tables.PREDICTIONS)


def args_ablate(p) -> None:
    _evaluation_args(p)
    p.add_argument("--units", required=True)
    p.add_argument("--expertise", required=True, help="the relation's expertise table (off_mean per unit)")
    p.add_argument("--relation", required=True)
    p.add_argument("--neutral-text", required=True)
    p.add_argument("--out-predictions", required=True)
    p.add_argument("--out-language-predictions", required=True)
    p.add_argument("--out-perplexity", required=True)


def cmd_ablation_summary(args) -> None:
    """paired significance, sweep curves, languages and perplexity"""
    import polars as pl

    from ..io import tables
    from ..io.parquet import read_table, write_table
    from .sweep import paired_table, perplexity_table, sweep_table
    s = args.settings
    options = dict(n_resamples=s.bootstrap_resamples, confidence=s.confidence, alpha=s.alpha, seed=s.seed)
    predictions = pl.concat([read_table(p) for p in args.predictions])
    significance = paired_table(predictions, read_table(args.baseline), **options)
    language_predictions = pl.concat([read_table(p) for p in args.language_predictions])
    languages = paired_table(language_predictions, read_table(args.baseline_languages),
                             by=("eval_relation", "language"), **options)
    perplexity = perplexity_table([read_table(p) for p in args.perplexity])
    write_table(languages, args.out_languages, tables.LANGUAGE_ABLATION)
    write_table(perplexity, args.out_perplexity, tables.PERPLEXITY)
    write_table(sweep_table(significance), args.out_sweep, tables.SWEEP)
    write_table(significance, args.out_significance, tables.SIGNIFICANCE)
    own = significance.filter((pl.col("ablated_relation") == pl.col("eval_relation")) & (pl.col("control") == "top_k"))
    log.info("own-relation top-k ablations significant at alpha %.3g: %d of %d", s.alpha,
             own["significant"].sum(), own.height)


def args_ablation_summary(p) -> None:
    p.add_argument("--baseline", required=True)
    p.add_argument("--baseline-languages", required=True)
    p.add_argument("--predictions", nargs="+", required=True)
    p.add_argument("--language-predictions", nargs="+", required=True)
    p.add_argument("--perplexity", nargs="+", required=True)
    p.add_argument("--out-significance", required=True)
    p.add_argument("--out-sweep", required=True)
    p.add_argument("--out-languages", required=True)
    p.add_argument("--out-perplexity", required=True)


def cmd_verdicts(args) -> None:
    """per relation and k: its top-k against the random controls on the same prompts"""
    import polars as pl

    from ..io import tables
    from ..io.parquet import read_table, write_table
    from .verdicts import verdict_table
    settings = args.settings
    significance = settings.significance
    predictions = pl.concat([read_table(p) for p in args.predictions])
    table = verdict_table(predictions, read_table(args.baseline), n_resamples=significance.bootstrap_resamples,
                          confidence=significance.confidence, alpha=significance.alpha, power=settings.power,
                          simulations=settings.power_simulations, seed=significance.seed)
    write_table(table, args.out, tables.VERDICTS)
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200):
        log.info("verdicts:\n%s", table.select("relation", "k", "n", "top_accuracy", "random_accuracy", "excess_drop",
                                               "ci_low", "ci_high", "q_value", "verdict", "detectable_drop"))


def args_verdicts(p) -> None:
    p.add_argument("--baseline", required=True)
    p.add_argument("--predictions", nargs="+", required=True, help="every relation's ablation predictions")
    p.add_argument("--out", required=True)
