"""`neuronmap` subcommands of the evaluation and the analyses: baseline, ablate (the batched
sweep), prepare-languages, ablation-summary, decode, shared-units and sparsity.

Registered by cli.build_parser through `add_commands`; the shared helpers (model loading,
evaluation arguments) stay in cli.py.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("neuronmap")


def _source_test_prompts(path, source_language: str):
    import polars as pl
    from .parquet_io import read_table
    return read_table(path).filter(pl.col("split") == "test").sort("prompt_id") \
        .with_columns(language=pl.lit(source_language))


def _evaluation_prompts(args):
    """The source language's test prompts, then the translated ones (if any)."""
    import polars as pl
    from .parquet_io import read_table
    prompts = _source_test_prompts(args.prompts, args.source_language)
    if args.language_prompts:
        translated = read_table(args.language_prompts).sort("prompt_id")
        prompts = pl.concat([prompts, translated.select(prompts.columns)], how="vertical_relaxed")
    return prompts


def _split_languages(predictions, source_language: str):
    import polars as pl
    is_source = pl.col("language") == source_language
    return predictions.filter(is_source), predictions.filter(~is_source)


def cmd_prepare_languages(args) -> None:
    from . import schemas
    from .languages import language_prompts
    from .parquet_io import write_table
    from .prompts import PromptSettings
    settings = PromptSettings(tuple(args.templates), args.few_shot, args.max_facts, args.test_facts,
                              args.max_test_fraction, args.seed, 1)
    prompts = language_prompts(args.dir, args.languages, args.relations, settings)
    write_table(prompts, args.out, schemas.LANGUAGE_PROMPTS)
    log.info("wrote %d translated test prompts to %s", prompts.height, args.out)


def cmd_baseline(args) -> None:
    from . import schemas
    from .ablation import BASELINE, evaluate_sweep
    from .cli import _evaluation_settings, _load
    from .deactivation import Deactivation
    from .parquet_io import write_table
    prompts = _evaluation_prompts(args)
    model, tokenizer = _load(args)
    predictions = evaluate_sweep(model, tokenizer, prompts, [BASELINE], [Deactivation.constant({})],
                                 _evaluation_settings(args), configs_per_batch=1)
    source, translated = _split_languages(predictions, args.source_language)
    write_table(translated, args.out_languages, schemas.LANGUAGE_PREDICTIONS)
    write_table(source, args.out, schemas.PREDICTIONS)


def cmd_ablate(args) -> None:
    import polars as pl
    from . import schemas
    from .ablation import (BASELINE, DeactivationValue, ablations_for, configs_per_batch_for, deactivation_for,
                           evaluate_plan, off_means, summarize)
    from .architectures import MlpSites
    from .cli import _evaluation_settings, _load
    from .deactivation import Deactivation
    from .errors import NeuronmapError
    from .parquet_io import read_table, write_table
    from .perplexity import mean_nll, perplexity_frame, read_text
    selected = read_table(args.units)
    baseline = read_table(args.baseline)
    prompts = _evaluation_prompts(args)
    value = DeactivationValue(args.value, args.clamp_value)
    if value.mode == "mean" and not args.expertise:
        raise NeuronmapError("ablation.value mean needs the relation's expertise table (--expertise)")
    model, tokenizer = _load(args)
    sites = MlpSites(model)
    widths = {site: sites.width(site) for site in selected["site"].unique()}
    negative_means = None
    if value.mode == "mean":
        expertise = read_table(args.expertise, ["site", "layer", "unit", "off_mean"])
        negative_means = off_means(expertise, {site: sites.width(site) for site in expertise["site"].unique()})
    plan = ablations_for(args.relation, selected, args.top_k, args.seeds, widths)
    configs = [deactivation_for(a, value, negative_means) for a in plan]
    settings = _evaluation_settings(args)
    per_batch = configs_per_batch_for(args.configs_per_batch, next(model.parameters()).device)
    log.info("%d ablation configurations per forward batch", per_batch)
    predictions = evaluate_plan(model, tokenizer, prompts, plan, configs, settings, per_batch, args.random_eval)
    source, translated = _split_languages(predictions, args.source_language)

    text = read_text(args.neutral_text, tokenizer, args.perplexity_max_tokens)
    perplexity = perplexity_frame([BASELINE] + plan, mean_nll(model, text, [Deactivation.constant({})] + configs),
                                  tokens=text.shape[1] - 1)
    log.info("perplexity of %s (%d tokens): baseline %.3f; under ablation %s", args.neutral_text, text.shape[1],
             perplexity["perplexity"][0], perplexity["perplexity"][1:].round(3).to_list())

    write_table(translated, args.out_language_predictions, schemas.LANGUAGE_PREDICTIONS)
    write_table(perplexity, args.out_perplexity, schemas.PERPLEXITY)
    write_table(source, args.out_predictions, schemas.PREDICTIONS)
    write_table(summarize(source, baseline), args.out_summary, schemas.ABLATION)


def cmd_ablation_summary(args) -> None:
    import polars as pl
    from . import schemas
    from .parquet_io import read_table, write_table
    from .sweep import paired_table, perplexity_table, sweep_table
    options = dict(n_resamples=args.bootstrap_resamples, confidence=args.confidence, alpha=args.alpha,
                   seed=args.seed)
    predictions = pl.concat([read_table(p) for p in args.predictions])
    significance = paired_table(predictions, read_table(args.baseline), **options)
    language_predictions = pl.concat([read_table(p) for p in args.language_predictions])
    languages = paired_table(language_predictions, read_table(args.baseline_languages),
                             by=("eval_relation", "language"), **options)
    perplexity = perplexity_table([read_table(p) for p in args.perplexity])
    write_table(languages, args.out_languages, schemas.LANGUAGE_ABLATION)
    write_table(perplexity, args.out_perplexity, schemas.PERPLEXITY)
    write_table(sweep_table(significance), args.out_sweep, schemas.SWEEP)
    write_table(significance, args.out_significance, schemas.SIGNIFICANCE)
    own = significance.filter((pl.col("ablated_relation") == pl.col("eval_relation")) & (pl.col("control") == "top_k"))
    log.info("own-relation top-k ablations significant at alpha %.3g: %d of %d", args.alpha,
             own["significant"].sum(), own.height)


def cmd_decode(args) -> None:
    import torch
    from . import schemas
    from .cli import _load
    from .decode import decode_neurons
    from .parquet_io import write_table
    model, tokenizer = _load(args)
    with torch.inference_mode():
        table = decode_neurons(model, tokenizer, args.sites, args.norm_gain, args.top_n, args.chunk_size,
                               args.search)
    write_table(table, args.out, schemas.DECODED)
    log.info("wrote %d decoded unit vectors to %s", table.num_rows, args.out)


def cmd_shared_units(args) -> None:
    import polars as pl
    from . import schemas
    from .overlap import shared_units
    from .parquet_io import read_table, write_table
    selected = pl.concat([read_table(path) for path in args.units])
    table = shared_units(selected, args.top_k)
    write_table(table, args.out, schemas.SHARED_UNITS)
    log.info("%d shared (pair, unit) rows over k in %s", table.height, args.top_k)


def cmd_sparsity(args) -> None:
    import polars as pl
    from . import schemas
    from .parquet_io import read_table, write_table
    from .sparsity import NEEDED, check_columns, dead_units, per_layer
    stats = read_table(args.neuron_stats)
    check_columns(stats, args.neuron_stats)
    stats = stats.select(NEEDED)
    write_table(dead_units(stats), args.out_dead, schemas.DEAD_UNITS)
    layers = per_layer(stats, args.rare_rate)
    write_table(layers, args.out, schemas.SPARSITY)
    log.info("firing rate (value > 0) per site, mean over layers, and dead units:\n%s",
             layers.group_by("site").agg(pl.col("firing_rate_mean").mean(), pl.col("dead").sum()).sort("site"))


def _configs_per_batch(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"ablation.configs_per_batch: {text!r} is neither auto nor an integer >= 1")
    return value


def _language_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--language-prompts", help="translated test prompts (prepare-languages); none when omitted")
    p.add_argument("--source-language", default="en", help="language of --prompts, where units are identified")


def add_commands(sub, model_args, evaluation_args, parse_bool) -> None:
    p = sub.add_parser("prepare-languages", help="translated relation files -> their test prompts")
    p.add_argument("--dir", required=True, help="folder with one sub-folder of relation files per language")
    p.add_argument("--languages", nargs="*", default=[])
    p.add_argument("--relations", nargs="+", required=True)
    p.add_argument("--templates", nargs="+", type=int, default=[0])
    p.add_argument("--few-shot", type=int, default=3)
    p.add_argument("--max-facts", type=int, default=0)
    p.add_argument("--test-facts", type=int, default=50)
    p.add_argument("--max-test-fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_prepare_languages)

    p = sub.add_parser("baseline", help="factual recall of the unmodified model on the test prompts")
    model_args(p)
    evaluation_args(p)
    p.add_argument("--prompts", required=True)
    _language_args(p)
    p.add_argument("--out", required=True, help="predictions on the source language's prompts")
    p.add_argument("--out-languages", required=True, help="predictions on the translated prompts")
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser("ablate", help="batched sweep: a relation's top-k (and random) units deactivated")
    model_args(p)
    evaluation_args(p)
    p.add_argument("--prompts", required=True)
    _language_args(p)
    p.add_argument("--units", required=True)
    p.add_argument("--expertise", help="the relation's expertise table (off_mean per unit, for --value mean)")
    p.add_argument("--baseline", required=True)
    p.add_argument("--relation", required=True)
    p.add_argument("--top-k", nargs="+", type=int, required=True)
    p.add_argument("--seeds", nargs="*", type=int, default=[])
    p.add_argument("--value", choices=["zero", "mean", "clamp"], default="zero")
    p.add_argument("--clamp-value", type=float, default=0.0)
    p.add_argument("--configs-per-batch", type=_configs_per_batch, default="auto",
                   help="configurations sharing a forward batch (rows = batch size x this); auto: 1 on the "
                        "CPU, 12 on a GPU")
    p.add_argument("--random-eval", choices=["own", "all"], default="own",
                   help="random controls on the ablated relation's own prompts only, or on every relation's")
    p.add_argument("--neutral-text", required=True)
    p.add_argument("--perplexity-max-tokens", type=int, default=512)
    p.add_argument("--out-summary", required=True)
    p.add_argument("--out-predictions", required=True)
    p.add_argument("--out-language-predictions", required=True)
    p.add_argument("--out-perplexity", required=True)
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("ablation-summary", help="paired significance, sweep curves, languages and perplexity")
    p.add_argument("--baseline", required=True)
    p.add_argument("--baseline-languages", required=True)
    p.add_argument("--predictions", nargs="+", required=True)
    p.add_argument("--language-predictions", nargs="+", required=True)
    p.add_argument("--perplexity", nargs="+", required=True)
    p.add_argument("--bootstrap-resamples", type=int, default=2000)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-significance", required=True)
    p.add_argument("--out-sweep", required=True)
    p.add_argument("--out-languages", required=True)
    p.add_argument("--out-perplexity", required=True)
    p.set_defaults(func=cmd_ablation_summary)

    p = sub.add_parser("decode", help="every neuron's weight vectors through the unembedding -> top tokens")
    model_args(p)
    p.add_argument("--sites", nargs="+", default=["up", "gate", "act"],
                   help="up: up_proj rows, gate: gate_proj rows, act: down_proj columns")
    p.add_argument("--norm-gain", nargs="+", type=parse_bool, default=[False, True],
                   help="decode without (false) and/or with (true) the final norm's gain")
    p.add_argument("--top-n", type=int, default=10)
    p.add_argument("--chunk-size", type=int, default=512, help="units per matmul (bounds memory)")
    p.add_argument("--search", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="dtype of the candidate search (auto: bfloat16 where fast); kept scores are exact")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("shared-units", help="the units each pair of relations shares, per k")
    p.add_argument("--units", nargs="+", required=True)
    p.add_argument("--top-k", nargs="+", type=int, required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_shared_units)

    p = sub.add_parser("sparsity", help="firing rates per layer and dead units from neuron_stats.parquet")
    p.add_argument("--neuron-stats", required=True)
    p.add_argument("--rare-rate", type=float, default=0.01, help="a unit firing on fewer tokens than this is rare")
    p.add_argument("--out", required=True)
    p.add_argument("--out-dead", required=True)
    p.set_defaults(func=cmd_sparsity)
