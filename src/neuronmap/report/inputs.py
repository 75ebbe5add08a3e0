"""The report's input files, declared once.

Each file is written by one part of a run: the model's preparation (every run), the relation
study, the corpus pass or the labels stage. From this table come the options of `neuronmap
report` (commands.py), the check that a part's files come all together or not at all, and the
object build.py reads (ReportFiles). rules/common.smk names the rule output each input is, by
the same names, and refuses a name missing on either side (tests/test_report_labels.py runs it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from pathlib import Path

from ..errors import NeuronmapError

# The parts of a run, as the "all of them or none" check names them.
PARTS = {"model": "the model", "study": "the relation study", "corpus": "the corpus pass",
         "labels": "the labelled corpora's section", "explain": "the explain stage"}


@dataclass(frozen=True)
class Input:
    name: str  # the option --<name with dashes>, and the field of ReportFiles
    part: str  # the part of the run that writes it (PARTS)
    help: str
    many: bool = False  # one file per relation
    optional: bool = False  # may be missing where its part ran


INPUTS = (
    Input("model_dir", "model", "the prepared model's folder"),
    Input("prompts", "study", "every relation's prompts"),
    Input("baseline", "study", "the unablated model's predictions on the test prompts"),
    Input("units", "study", "each relation's selected units", many=True),
    Input("expertise", "study", "each relation's expertise of every unit", many=True),
    Input("overlap", "study", "the overlap of the relations' selections"),
    Input("significance", "study", "the ablations' paired statistics"),
    Input("sweep", "study", "accuracy as a function of k"),
    Input("verdicts", "study", "each relation's top-k against random units, per k and pooled"),
    Input("versatility", "study", "the overlap of pairs of relations against the selection on permuted labels"),
    Input("stability", "study", "the split-half stability of each relation's selection"),
    Input("neuron_stats", "study", "every unit's activation statistics"),
    Input("top_activations", "study", "every unit's top activating prompts"),
    Input("decoded", "study", "every unit's decoded tokens"),
    Input("perplexity", "study", "the ablations' perplexity of neutral text"),
    Input("sparsity", "study", "the units' sparsity per layer"),
    Input("languages", "study", "the ablations' effect on the translations"),
    Input("cost", "study", "what the run cost, stage by stage"),
    Input("calibration", "study", "the calibration job's bare forward passes (its peak memory against the plan)",
          optional=True),
    Input("plan", "study", "what the run was estimated to need"),
    Input("contexts", "corpus", "the corpus's contexts"),
    Input("corpus_units", "corpus", "every unit's records over the corpus", optional=True),
    Input("label_records", "labels", "every unit's records per label"),
    Input("label_units", "labels", "each label's selected units"),
    Input("label_perplexity", "labels", "the perplexity check of each label's units"),
    Input("label_overlap", "labels", "the overlap of LAPE's and AP's selections, where AP ran", optional=True),
    Input("explanations", "explain", "each explained unit's descriptions"),
    Input("explain_scores", "explain", "each description's detection score, the control's included"),
)


def option(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def options(files: dict[str, str | Path | list]) -> list[str]:
    """The command-line options of `neuronmap report` that name these files: --<name> <file(s)>."""
    words = []
    for name, paths in files.items():
        words += [option(name), *map(str, paths if isinstance(paths, list | tuple) else [paths])]
    return words


def _ran(self, part: str) -> bool:
    """Whether `part` ran: its files were given (all of them, checked by report_files)."""
    return any(getattr(self, i.name) is not None for i in INPUTS if i.part == part)


# The files of the parts that ran; None for the others.
ReportFiles = make_dataclass(
    "ReportFiles",
    [(i.name, list[Path] | None if i.many else Path | None, field(default=None)) for i in INPUTS],
    frozen=True, namespace={"ran": _ran, "__doc__": "The report's input files by name (INPUTS)."})


def report_files(given: dict[str, str | list[str] | None]) -> ReportFiles:
    """The files named in `given` (None where not given), each part's required files all together
    or not at all."""
    unknown = set(given) - {i.name for i in INPUTS}
    if unknown:
        raise NeuronmapError(f"report: no input is named {', '.join(sorted(unknown))}")
    for part, what in PARTS.items():
        named = [i for i in INPUTS if i.part == part and given.get(i.name) is not None]
        missing = [option(i.name) for i in INPUTS if i.part == part and not i.optional and i not in named]
        if named and missing:
            raise NeuronmapError(f"report: {what} needs every one of its files; missing {', '.join(missing)}")

    def path(value):
        return None if value is None else [Path(p) for p in value] if isinstance(value, list) else Path(value)
    return ReportFiles(**{i.name: path(given.get(i.name)) for i in INPUTS})
