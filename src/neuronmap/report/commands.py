"""`neuronmap report`: the self-contained HTML report of a run."""

from __future__ import annotations

import json

from .inputs import INPUTS, PARTS, option, report_files

SETTINGS: dict = {}


def cmd_report(args) -> None:
    """the self-contained HTML report"""
    from .build import build_report

    files = report_files({i.name: getattr(args, i.name) for i in INPUTS})
    build_report(files, json.loads(args.config_json), args.out, args.figures_dir)


def args_report(p) -> None:
    p.add_argument("--config-json", required=True,
                   help="the run's validated config, shown in the report with its sha256")
    groups = {part: p.add_argument_group(f"{what} (all of its files, or none where it did not run)")
              for part, what in PARTS.items() if part != "model"}
    for i in INPUTS:
        where = p if i.part == "model" else groups[i.part]
        where.add_argument(option(i.name), nargs="+" if i.many else None, required=i.part == "model",
                           help=i.help + (" (optional)" if i.optional else ""))
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
