"""`neuronmap` subcommands of the labels stage."""

from __future__ import annotations

import logging

from .settings import PerplexitySettings

log = logging.getLogger("neuronmap")

SETTINGS = {"label-perplexity": PerplexitySettings}


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
