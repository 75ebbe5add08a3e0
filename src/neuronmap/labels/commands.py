"""`neuronmap` subcommands of the labels stage: the per-label records merged, the two unit
selections per label (LAPE's and AP's) with their overlap, and the perplexity check."""

from __future__ import annotations

import logging

from .settings import PerplexitySettings, SelectSettings

log = logging.getLogger("neuronmap")

SETTINGS = {"label-select": SelectSettings, "label-perplexity": PerplexitySettings}


def cmd_label_select(args) -> None:
    """per-label records merged across shards; LAPE's and the AP selection per label, and their overlap"""
    import polars as pl

    from ..io import tables
    from ..io.parquet import read_table, write_table
    from .expertise import ap_selection, label_expertise
    from .lape import lape_selection
    from .overlap import selection_overlap
    from .records import label_records, rate_matrix
    s = args.settings
    records = label_records(args.labels)
    labels = sorted(records["label"].unique().to_list())
    units, rates = rate_matrix(records, s.sites, labels)
    lape = lape_selection(units, rates, labels, s.top_rate, s.filter_rate, s.activation_bar_ratio)
    counts = lape.group_by("label").len()
    lape_counts = {label: 0 for label in labels} | dict(zip(counts["label"], counts["len"]))
    if s.ap:
        contexts = read_table(args.contexts, ["context_id", "label", "heldout"]).filter(~pl.col("heldout"))
        expertise = label_expertise(args.responses, contexts.sort("context_id"), labels)
        wanted = lape_counts if s.ap_units == "match" else {label: int(s.ap_units) for label in labels}
        selected = pl.concat([lape, ap_selection(expertise, wanted)])
    else:
        expertise = pl.from_arrow(tables.LABEL_EXPERTISE.empty_table())
        selected = lape
    overlap = selection_overlap(selected, labels, units.height)
    write_table(records, args.out_records, tables.LABEL_RECORDS)
    write_table(expertise, args.out_expertise, tables.LABEL_EXPERTISE)
    write_table(selected, args.out_units, tables.LABEL_UNITS)
    write_table(overlap, args.out_overlap, tables.LABEL_OVERLAP)
    for row in overlap.to_dicts():
        log.info("label %s: LAPE %d units, AP %d, shared %d (%.1f expected by chance, p = %.2g)", row["label"],
                 row["lape_units"], row["ap_units"], row["shared"], row["expected"], row["p_value"])


def args_label_select(p) -> None:
    p.add_argument("--contexts", required=True)
    p.add_argument("--labels", nargs="+", required=True, help="every records job's per-label partial")
    p.add_argument("--responses", nargs="*", default=[], help="every records job's context responses (labels.ap)")
    p.add_argument("--out-records", required=True)
    p.add_argument("--out-expertise", required=True)
    p.add_argument("--out-units", required=True)
    p.add_argument("--out-overlap", required=True)


def cmd_label_perplexity(args) -> None:
    """perplexity of every label's held-out text with one label's units off, against random units"""
    import polars as pl

    from ..io import tables
    from ..io.parquet import read_table, write_table
    from ..model.loading import load_for_job
    from .perplexity import label_perplexity, summary_table
    s = args.settings
    contexts = read_table(args.contexts, ["context_id", "label", "n_tokens", "token_ids", "heldout"])
    label_units = read_table(args.units, ["method", "label", "site", "layer", "unit"])
    model, tokenizer = load_for_job(args.model_dir, s.model, args.threads)
    methods = ("lape", "ap") if s.ap else ("lape",)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    per_context = label_perplexity(model, contexts, label_units, methods, s.contexts, s.seeds, pad_id,
                                   (args.contexts, args.units))
    sig = s.significance
    summary = summary_table(per_context, sig.bootstrap_resamples, sig.confidence, sig.alpha, sig.seed)
    write_table(per_context, args.out_contexts, tables.LABEL_PERPLEXITY_CONTEXTS)
    write_table(summary, args.out, tables.LABEL_PERPLEXITY)
    own = summary.filter(pl.col("ablated_label") == pl.col("eval_label"))
    for row in own.iter_rows(named=True):
        log.info("%s %s: %d units, perplexity x%.4f (random x%.4f), excess NLL %.4g [%.4g, %.4g], q %.3g",
                 row["method"], row["ablated_label"], row["units"], row["selected_ratio"], row["random_ratio"],
                 row["excess"], row["ci_low"], row["ci_high"], row["q_value"])


def args_label_perplexity(p) -> None:
    p.add_argument("--model-dir", required=True, help="directory written by prepare-model")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--contexts", required=True, help="corpus/contexts.parquet (its held-out contexts are scored)")
    p.add_argument("--units", required=True, help="labels/label_units.parquet (each method's units per label)")
    p.add_argument("--out-contexts", required=True, help="per configuration and context: the NLL")
    p.add_argument("--out", required=True, help="per method, ablated label and evaluated label: the paired statistics")
