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


def cmd_extract(args) -> None:
    import polars as pl
    from .extract import extract_responses
    from .parquet_io import read_table
    prompts = read_table(args.prompts).filter(
        (pl.col("relation") == args.relation) & (pl.col("shard") == args.shard))
    if prompts.height == 0:
        raise NeuronmapError(f"{args.prompts}: no identification prompts for {args.relation} shard {args.shard}")
    model, tokenizer = _load(args)
    extract_responses(model, tokenizer, prompts, args.out, sites=args.sites, pooling=args.pooling,
                      batch_size=args.batch_size, dtype=args.response_dtype)


def cmd_stats(args) -> None:
    from . import schemas
    from .expertise import choose_prompts, expertise_table, selected_units
    from .parquet_io import read_table, write_table
    from .responses import ResponseReader
    prompts = read_table(args.prompts)
    chosen = choose_prompts(prompts, args.relation, args.negatives_per_positive, args.seed)
    reader = ResponseReader(args.responses)
    expertise = expertise_table(reader, chosen, tie_seed=args.seed)
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


def _test_prompts(path):
    import polars as pl
    from .parquet_io import read_table
    return read_table(path).filter(pl.col("split") == "test").sort("prompt_id")


def cmd_baseline(args) -> None:
    from . import schemas
    from .ablation import Ablation, evaluate
    from .parquet_io import write_table
    model, tokenizer = _load(args)
    predictions = evaluate(model, tokenizer, _test_prompts(args.prompts), Ablation(None, 0, "none", None, {}),
                           _evaluation_settings(args))
    write_table(predictions, args.out, schemas.PREDICTIONS)


def cmd_ablate(args) -> None:
    import polars as pl
    from . import schemas
    from .ablation import ablations_for, evaluate, summarize
    from .architectures import MlpSites
    from .parquet_io import read_table, write_table
    selected = read_table(args.units)
    baseline = read_table(args.baseline)
    test_prompts = _test_prompts(args.prompts)
    model, tokenizer = _load(args)
    sites = MlpSites(model)
    widths = {site: sites.width(site) for site in selected["site"].unique()}
    plan = ablations_for(args.relation, selected, args.top_k, args.seeds, widths)
    settings = _evaluation_settings(args)
    predictions = pl.concat([evaluate(model, tokenizer, test_prompts, a, settings) for a in plan])
    write_table(predictions, args.out_predictions, schemas.PREDICTIONS)
    write_table(summarize(predictions, baseline), args.out_summary, schemas.ABLATION)


def cmd_report(args) -> None:
    from .report import ReportInputs, build_report
    build_report(ReportInputs(Path(args.prompts), Path(args.model_dir), Path(args.baseline),
                              [Path(p) for p in args.ablation], [Path(p) for p in args.units], Path(args.overlap)),
                 json.loads(args.config_json), args.out)


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

    p = sub.add_parser("extract", help="pooled responses of one shard's prompts")
    _model_args(p)
    p.add_argument("--prompts", required=True)
    p.add_argument("--relation", required=True)
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--sites", nargs="+", default=["gate", "up", "act", "down"])
    p.add_argument("--pooling", choices=["mean", "max", "last"], default="mean")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--response-dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("stats", help="expertise (AP) of every unit for one relation, and its top-k units")
    p.add_argument("--prompts", required=True)
    p.add_argument("--responses", nargs="+", required=True)
    p.add_argument("--relation", required=True)
    p.add_argument("--negatives-per-positive", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
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

    p = sub.add_parser("baseline", help="factual recall of the unmodified model on the test prompts")
    _model_args(p)
    _evaluation_args(p)
    p.add_argument("--prompts", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser("ablate", help="factual recall with a relation's top-k (and random) units deactivated")
    _model_args(p)
    _evaluation_args(p)
    p.add_argument("--prompts", required=True)
    p.add_argument("--units", required=True)
    p.add_argument("--baseline", required=True)
    p.add_argument("--relation", required=True)
    p.add_argument("--top-k", nargs="+", type=int, required=True)
    p.add_argument("--seeds", nargs="*", type=int, default=[])
    p.add_argument("--out-summary", required=True)
    p.add_argument("--out-predictions", required=True)
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("report", help="the self-contained HTML report")
    p.add_argument("--prompts", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--baseline", required=True)
    p.add_argument("--ablation", nargs="+", required=True)
    p.add_argument("--units", nargs="+", required=True)
    p.add_argument("--overlap", required=True)
    p.add_argument("--config-json", required=True)
    p.add_argument("--out", required=True)
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
