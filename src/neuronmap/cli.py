"""The `neuronmap` command: one subcommand per workflow step, called by the Snakemake rules."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .errors import NeuronmapError

log = logging.getLogger("neuronmap")


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", required=True, help="directory written by prepare-model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")


def _evaluation_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=2)
    parser.add_argument("--match", choices=["prefix", "exact_start"], default="prefix")
    parser.add_argument("--case-sensitive", type=_bool, default=False)
    parser.add_argument("--batch-size", type=int, default=16)


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _load(args):
    import torch
    from .model_loading import load_model
    if args.threads:
        torch.set_num_threads(args.threads)
    return load_model(args.model_dir, args.device, args.dtype, args.trust_remote_code)


def _evaluation_settings(args):
    from .evaluation import EvaluationSettings
    return EvaluationSettings(args.max_new_tokens, args.match, args.case_sensitive, args.batch_size)


def cmd_prepare_model(args) -> None:
    from .model_loading import prepare_model
    manifest = prepare_model(args.model, args.out, args.trust_remote_code)
    log.info("model ready: %s", json.dumps(manifest))


def cmd_prepare(args) -> None:
    from . import schemas
    from .parquet_io import write_table
    from .prompts import PromptSettings, build_prompts
    from .relations import find_relation_file, load_relation
    relations = [load_relation(find_relation_file(args.relations_dir, name), name) for name in args.relations]
    settings = PromptSettings(tuple(args.templates), args.few_shot, args.max_facts, args.test_facts,
                              args.max_test_fraction, args.seed, args.shards)
    prompts = build_prompts(relations, settings)
    write_table(prompts, args.out, schemas.PROMPTS)
    counts = prompts.group_by("relation", "split").len().sort("relation", "split")
    log.info("wrote %d prompts to %s\n%s", prompts.height, args.out, counts)


def cmd_merge_prompts(args) -> None:
    import polars as pl
    from . import schemas
    from .parquet_io import read_table, write_table
    prompts = pl.concat([read_table(path) for path in args.inputs], how="vertical")
    repeated = prompts.filter(pl.col("prompt_id").is_duplicated())["prompt_id"].unique().sort()
    if repeated.len():
        raise NeuronmapError(f"{', '.join(args.inputs)}: prompt_id {repeated[0]!r} appears more than once")
    write_table(prompts, args.out, schemas.PROMPTS)
    log.info("merged %d prompts of %d relations into %s", prompts.height, len(args.inputs), args.out)


def cmd_extract(args) -> None:
    import os

    import polars as pl
    from .extract import ExtractionOutputs, ExtractionSettings, extract_shard
    from .parquet_io import read_table
    prompts = read_table(args.prompts).filter(
        (pl.col("relation") == args.relation) & (pl.col("shard") == args.shard))
    if prompts.height == 0:
        raise NeuronmapError(f"{args.prompts}: no identification prompts for {args.relation} shard {args.shard}")
    # On a cluster, the scheduler's GPU assignment is the first thing to check in a job's log.
    log.info("CUDA_VISIBLE_DEVICES=%s", os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
    from .host_memory import return_large_buffers_to_the_os
    return_large_buffers_to_the_os()  # before the model loads: its staging buffers count too
    model, tokenizer = _load(args)
    settings = ExtractionSettings(tuple(args.sites), tuple(args.poolings), args.batch_size, args.batch_tokens,
                                  args.response_dtype, args.top_n, args.active_threshold, args.include_bos,
                                  args.fused_statistics)
    outputs = ExtractionOutputs(Path(args.out), Path(args.out_stats), Path(args.out_top))
    extract_shard(model, tokenizer, prompts, outputs, settings)


def cmd_neuron_stats(args) -> None:
    from . import schemas
    from .neuron_stats import merge_partials, merge_tops
    from .parquet_io import read_table, write_table
    write_table(merge_partials([read_table(path) for path in args.stats]), args.out, schemas.NEURON_STATS)
    write_table(merge_tops([read_table(path) for path in args.top], args.top_n), args.out_top,
                schemas.TOP_ACTIVATIONS)


def _chosen_prompts(args, relations) -> dict:
    from .expertise import choose_prompts
    from .parquet_io import read_table
    prompts = read_table(args.prompts)
    return {relation: choose_prompts(prompts, relation, args.negatives_per_positive, args.seed)
            for relation in relations}


def cmd_stats_block(args) -> None:
    from . import schemas
    from .expertise import expertise_block
    from .parquet_io import write_table
    from .responses import ResponseReader
    table = expertise_block(ResponseReader(args.responses), _chosen_prompts(args, args.relations), args.pooling, args.block,
                            args.blocks)
    write_table(table, args.out, schemas.EXPERTISE_BLOCK)


def cmd_stats(args) -> None:
    import polars as pl
    from . import schemas
    from .expertise import rank_units, selected_units
    from .parquet_io import read_table, write_table
    chosen = _chosen_prompts(args, [args.relation])[args.relation]
    scores = pl.concat([read_table(path).filter(pl.col("relation") == args.relation) for path in args.blocks])
    expertise = rank_units(scores, tie_seed=args.seed)
    selected = selected_units(expertise, args.relation, args.top_k)
    write_table(chosen, args.out_prompts, schemas.EXPERTISE_PROMPTS)
    write_table(selected, args.out_units, schemas.SELECTED_UNITS)
    write_table(expertise, args.out_expertise, schemas.EXPERTISE)
    cutoff = expertise["ap"][max(args.top_k) - 1]
    log.info("%s: %d units ranked; top AP %.4f; %d units tie at the top-%d cutoff AP %.4f; selected by site:\n%s",
             args.relation, expertise.height, expertise["ap"][0], (expertise["ap"] == cutoff).sum(),
             max(args.top_k), cutoff, selected.group_by("site").len().sort("site"))


def cmd_overlap(args) -> None:
    import polars as pl
    from . import schemas
    from .overlap import unit_overlap
    from .parquet_io import read_table, write_table
    selected = pl.concat([read_table(path) for path in args.units])
    write_table(unit_overlap(selected, args.top_k), args.out, schemas.OVERLAP)


def cmd_report(args) -> None:
    from .report import ReportInputs, build_report

    def optional(path):
        return Path(path) if path else None
    inputs = ReportInputs(
        prompts=Path(args.prompts), model_dir=Path(args.model_dir), baseline=Path(args.baseline),
        ablation=[Path(p) for p in args.ablation], units=[Path(p) for p in args.units],
        expertise=[Path(p) for p in args.expertise], overlap=Path(args.overlap),
        benchmarks=optional(args.benchmarks), neuron_stats=optional(args.neuron_stats),
        top_activations=optional(args.top_activations), decoded=optional(args.decoded),
        significance=optional(args.significance), perplexity=optional(args.perplexity),
        sweep=optional(args.sweep), sparsity=optional(args.sparsity), languages=optional(args.languages))
    build_report(inputs, args.config_json, args.out, args.figures_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuronmap", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-model", help="resolve the model; dequantize a GGUF file once")
    p.add_argument("--model", required=True)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_prepare_model)

    p = sub.add_parser("prepare", help="relation files -> prompts.parquet")
    p.add_argument("--relations-dir", required=True)
    p.add_argument("--relations", nargs="+", required=True)
    p.add_argument("--templates", nargs="+", type=int, default=[0])
    p.add_argument("--few-shot", type=int, default=3)
    p.add_argument("--max-facts", type=int, default=0)
    p.add_argument("--test-facts", type=int, default=50)
    p.add_argument("--max-test-fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("merge-prompts", help="per-relation prompts files -> one prompts.parquet")
    p.add_argument("--inputs", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_merge_prompts)

    p = sub.add_parser("extract", help="pooled responses and token statistics of one shard's prompts")
    _model_args(p)
    p.add_argument("--prompts", required=True)
    p.add_argument("--relation", required=True)
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--sites", nargs="+", default=["gate", "up", "act", "down"])
    p.add_argument("--poolings", nargs="+", choices=["mean", "max", "last"], default=["mean", "max", "last"])
    p.add_argument("--batch-size", type=int, default=64, help="most prompts in a batch")
    p.add_argument("--batch-tokens", type=int, default=4096, help="most padded tokens in a batch")
    p.add_argument("--response-dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--top-n", type=int, default=10, help="top-activating prompts kept per unit")
    p.add_argument("--active-threshold", type=float, default=0.05)
    p.add_argument("--include-bos", type=_bool, default=True)
    p.add_argument("--fused-statistics", type=_bool, default=True,
                   help="compute per-token statistics in one torch.compile'd kernel (falls back to eager)")
    p.add_argument("--out", required=True)
    p.add_argument("--out-stats", required=True)
    p.add_argument("--out-top", required=True)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("neuron-stats", help="merge the shards' token statistics")
    p.add_argument("--stats", nargs="+", required=True)
    p.add_argument("--top", nargs="+", required=True)
    p.add_argument("--top-n", type=int, default=10)
    p.add_argument("--out", required=True)
    p.add_argument("--out-top", required=True)
    p.set_defaults(func=cmd_neuron_stats)

    def chosen_args(p):
        p.add_argument("--prompts", required=True)
        p.add_argument("--negatives-per-positive", type=int, default=4)
        p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("stats-block", help="expertise (AP) of one block of layers' units for every relation")
    chosen_args(p)
    p.add_argument("--responses", nargs="+", required=True)
    p.add_argument("--relations", nargs="+", required=True)
    p.add_argument("--pooling", choices=["mean", "max", "last"], default="mean")
    p.add_argument("--block", type=int, required=True)
    p.add_argument("--blocks", type=int, required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_stats_block)

    p = sub.add_parser("stats", help="rank every unit for one relation and select its top-k")
    chosen_args(p)
    p.add_argument("--blocks", nargs="+", required=True, help="the stats-block outputs")
    p.add_argument("--relation", required=True)
    p.add_argument("--top-k", nargs="+", type=int, required=True)
    p.add_argument("--out-expertise", required=True)
    p.add_argument("--out-prompts", required=True)
    p.add_argument("--out-units", required=True)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("overlap", help="units shared between relations")
    p.add_argument("--units", nargs="+", required=True)
    p.add_argument("--top-k", nargs="+", type=int, required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_overlap)

    from .analysis_commands import add_commands
    add_commands(sub, _model_args, _evaluation_args, _bool)

    p = sub.add_parser("report", help="the self-contained HTML report")
    p.add_argument("--prompts", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--baseline", required=True)
    p.add_argument("--ablation", nargs="+", required=True)
    p.add_argument("--units", nargs="+", required=True)
    p.add_argument("--overlap", required=True)
    p.add_argument("--expertise", nargs="+", required=True, help="expertise/<relation>.parquet of every relation")
    p.add_argument("--benchmarks", help="the run's benchmarks/ directory (default: beside --prompts)")
    for name in ("neuron-stats", "top-activations", "decoded", "significance", "perplexity", "sweep", "sparsity",
                 "languages"):
        p.add_argument(f"--{name}", help="optional: the report says 'not yet run' without it")
    p.add_argument("--config-json", required=True, help="the validated config; the report shows its sha256")
    p.add_argument("--out", required=True)
    p.add_argument("--figures-dir", required=True, help="where each figure is written as SVG and PNG")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        args.func(args)
    except NeuronmapError as exc:
        print(f"neuronmap {args.command}: error: {exc}", file=sys.stderr)
        return 2
    log.info("%s done in %.1f s", args.command, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
