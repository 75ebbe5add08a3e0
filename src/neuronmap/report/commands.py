"""`neuronmap report`: the self-contained HTML report of a run."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import NeuronmapError

SETTINGS: dict = {}


# The relation study's files: all of them, or none where it did not run.
RELATION_FILES = ("prompts", "baseline", "units", "expertise", "overlap", "significance", "sweep", "neuron_stats",
                  "top_activations", "decoded", "perplexity", "sparsity", "languages", "cost", "plan")
# The labels stage's files the report reads, and their names in results/<run>/labels/.
LABEL_FILES = {"label_records": "label_records.parquet", "label_units": "label_units.parquet",
               "label_overlap": "overlap.parquet", "label_perplexity": "perplexity.parquet"}


def _all_or_none(args, names: tuple[str, ...], what: str) -> bool:
    given = [name for name in names if getattr(args, name) is not None]
    if given and len(given) < len(names):
        missing = ", ".join(f"--{name.replace('_', '-')}" for name in names if name not in given)
        raise NeuronmapError(f"report: {what} needs every one of its files; missing {missing}")
    return bool(given)


def cmd_report(args) -> None:
    """the self-contained HTML report"""
    from .build import CorpusInputs, ReportInputs, build_report

    def path(value):
        return None if value is None else [Path(p) for p in value] if isinstance(value, list) else Path(value)
    inputs = None
    if _all_or_none(args, RELATION_FILES, "the relation study"):
        inputs = ReportInputs(model_dir=Path(args.model_dir), **{name: path(getattr(args, name))
                                                                 for name in RELATION_FILES})
    if args.labels_dir is not None:
        for name, file in LABEL_FILES.items():
            path_in_dir = Path(args.labels_dir) / file
            # The overlap needs both selections: a run without AP (labels.ap false) has none.
            if getattr(args, name) is None and (name != "label_overlap" or path_in_dir.exists()):
                setattr(args, name, str(path_in_dir))
    _all_or_none(args, tuple(name for name in LABEL_FILES if name != "label_overlap"),
                 "the labelled corpora's section")
    corpus = CorpusInputs(model_dir=Path(args.model_dir), contexts=path(args.contexts),
                          corpus_units=path(args.corpus_units),
                          **{name: path(getattr(args, name)) for name in LABEL_FILES})
    build_report(inputs, json.loads(args.config_json), args.out, args.figures_dir,
                 corpus if corpus.has_corpus or corpus.has_labels else None)


def args_report(p) -> None:
    p.add_argument("--config-json", required=True,
                   help="the run's validated config, shown in the report with its sha256")
    p.add_argument("--model-dir", required=True)
    study = p.add_argument_group("the relation study (all of them, or none where it did not run)")
    study.add_argument("--prompts")
    study.add_argument("--baseline")
    study.add_argument("--units", nargs="+")
    study.add_argument("--expertise", nargs="+", help="expertise/<relation>.parquet of every relation")
    study.add_argument("--overlap")
    for name in ("significance", "sweep", "neuron-stats", "top-activations", "decoded", "perplexity", "sparsity",
                 "languages", "cost", "plan"):
        study.add_argument(f"--{name}")
    corpus = p.add_argument_group("the corpus pass and the labels stage (where they ran)")
    corpus.add_argument("--contexts", help="corpus/contexts.parquet")
    corpus.add_argument("--corpus-units", help="corpus/units.parquet")
    corpus.add_argument("--labels-dir", help="the labels stage's folder: the four files below, unless named")
    corpus.add_argument("--label-records", help="labels/label_records.parquet")
    corpus.add_argument("--label-units", help="labels/label_units.parquet")
    corpus.add_argument("--label-overlap", help="labels/overlap.parquet (where the AP selection ran)")
    corpus.add_argument("--label-perplexity", help="labels/perplexity.parquet")
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
