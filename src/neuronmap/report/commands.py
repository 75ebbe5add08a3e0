"""`neuronmap report`: the self-contained HTML report of a run."""

from __future__ import annotations

import json
from pathlib import Path

SETTINGS: dict = {}


def cmd_report(args) -> None:
    """the self-contained HTML report"""
    from .build import ReportInputs, build_report
    inputs = ReportInputs(
        prompts=Path(args.prompts), model_dir=Path(args.model_dir), baseline=Path(args.baseline),
        units=[Path(p) for p in args.units], expertise=[Path(p) for p in args.expertise],
        overlap=Path(args.overlap), significance=Path(args.significance), sweep=Path(args.sweep),
        neuron_stats=Path(args.neuron_stats), top_activations=Path(args.top_activations),
        decoded=Path(args.decoded), perplexity=Path(args.perplexity), sparsity=Path(args.sparsity),
        languages=Path(args.languages), cost=Path(args.cost), plan=Path(args.plan))
    build_report(inputs, json.loads(args.config_json), args.out, args.figures_dir)


def args_report(p) -> None:
    p.add_argument("--config-json", required=True,
                   help="the run's validated config, shown in the report with its sha256")
    p.add_argument("--prompts", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--baseline", required=True)
    p.add_argument("--units", nargs="+", required=True)
    p.add_argument("--expertise", nargs="+", required=True, help="expertise/<relation>.parquet of every relation")
    p.add_argument("--overlap", required=True)
    for name in ("significance", "sweep", "neuron-stats", "top-activations", "decoded", "perplexity", "sparsity",
                 "languages", "cost", "plan"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--figures-dir", required=True, help="where each figure is written as SVG and PNG")


def cmd_cost(args) -> None:
    """what the run cost: tokens forwarded and seconds per stage, against a bare forward pass"""
    import polars as pl

    from ..io import tables
    from ..io.parquet import read_table, write_table
    from ..model.cost import cost_table
    jobs = pl.concat([read_table(path) for path in args.jobs])
    write_table(cost_table(jobs, read_table(args.calibration)), args.out, tables.COST)


def args_cost(p) -> None:
    p.add_argument("--jobs", nargs="+", required=True, help="the model-running jobs' cost files")
    p.add_argument("--calibration", required=True, help="the calibrate job's output")
    p.add_argument("--out", required=True)
