"""The atlas's index, `atlas/units.parquet`: one row per unit with what every stage that ran says
about it (docs/parquet.md, "Atlas"). The server loads this file alone at start; histograms,
examples and label records stay in their own files and are read per layer when a card opens.

Every source is optional. The statistics come from the corpus records where the corpus pass ran,
else from the relation study's neuron_stats (over its prompts; no skewness, kurtosis or quantiles).
The file's metadata (`neuronmap.atlas`) names the sources, relative to the run's folder, and
holds the histogram's bin edges, so that the server needs neither the config nor torch.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa

from ..errors import NeuronmapError
from ..io import tables
from ..io.parquet import read_table, write_table

log = logging.getLogger(__name__)

KEY = ["site", "layer", "unit"]
METADATA_KEY = b"neuronmap.atlas"
STATISTICS = ["count", "mean", "var", "skewness", "kurtosis", "min", "max", "frac_positive", "frac_active",
              *tables.RECORD_QUANTILES]
PROMPT_STATISTICS = ["count", "mean", "var", "min", "max", "frac_positive", "frac_active"]
# label_units' methods and the index column naming the labels a unit was selected for by each.
SELECTION_COLUMNS = {"lape": "lape", "ap": "ap_label"}


@dataclass
class AtlasSources:
    """The files of a run the atlas reads; None (or empty) where that stage did not run."""
    units: Path | None = None           # corpus/units.parquet
    examples: Path | None = None        # corpus/examples.parquet (cards only)
    peak_tokens: Path | None = None     # corpus/peak_tokens.parquet
    neuron_stats: Path | None = None    # neuron_stats.parquet
    decoded: Path | None = None         # decoded.parquet
    expertise: dict[str, Path] = field(default_factory=dict)   # relation -> expertise/<relation>.parquet
    label_records: Path | None = None   # labels/label_records.parquet
    label_units: Path | None = None     # labels/label_units.parquet
    label_expertise: Path | None = None  # labels/label_expertise.parquet (cards only)
    explanations: Path | None = None    # explain/explanations.parquet
    explain_scores: Path | None = None  # explain/scores.parquet

    FILES = {"units": "corpus/units.parquet", "examples": "corpus/examples.parquet",
             "peak_tokens": "corpus/peak_tokens.parquet", "neuron_stats": "neuron_stats.parquet",
             "decoded": "decoded.parquet", "label_records": "labels/label_records.parquet",
             "label_units": "labels/label_units.parquet", "label_expertise": "labels/label_expertise.parquet",
             "explanations": "explain/explanations.parquet", "explain_scores": "explain/scores.parquet"}

    @classmethod
    def found_in(cls, run: Path) -> AtlasSources:
        """Whatever files of a finished run exist (for an index built by hand)."""
        found = {name: run / rel for name, rel in cls.FILES.items() if (run / rel).is_file()}
        expertise = {p.name.removesuffix(".parquet"): p for p in sorted((run / "expertise").glob("*.parquet"))
                     if not p.name.endswith(".prompts.parquet")}
        return cls(**found, expertise=expertise)

    def relative_to(self, run: Path) -> dict:
        """The sources as paths relative to the run's folder (the index's metadata)."""
        named = {name: getattr(self, name) for name in self.FILES}
        out = {name: os.path.relpath(path, run) for name, path in named.items() if path is not None}
        out["expertise"] = {relation: os.path.relpath(path, run) for relation, path in self.expertise.items()}
        return out


def statistics(sources: AtlasSources) -> tuple[pl.DataFrame, str]:
    """Every unit's statistics and where they come from (`corpus` or `prompts`)."""
    if sources.units is not None:
        return read_table(sources.units, KEY + STATISTICS), "corpus"
    if sources.neuron_stats is not None:
        return read_table(sources.neuron_stats, KEY + PROMPT_STATISTICS), "prompts"
    raise NeuronmapError("atlas index: neither corpus/units.parquet nor neuron_stats.parquet given: the run has "
                         "no records of its units (run the corpus pass or the relation study first)")


def peak_tokens(path: Path) -> pl.DataFrame:
    frame = read_table(path, KEY + ["rank", "token"]).sort(KEY + ["rank"])
    return (frame.group_by(KEY, maintain_order=True).agg(peak_tokens=pl.col("token"))
            .with_columns(peak_token=pl.col("peak_tokens").list.first()))


def decoded_tokens(path: Path) -> pl.DataFrame:
    """The top tokens of each decoded unit, through the final norm's gain where that variant was run."""
    frame = read_table(path, KEY + ["norm_gain", "tokens"])
    frame = frame.sort(KEY + ["norm_gain"], descending=[False, False, False, True]).unique(KEY, keep="first")
    return frame.select(*KEY, decoded_tokens=pl.col("tokens"), decoded_token=pl.col("tokens").list.first())


def relation_ap(relation: str, path: Path) -> pl.DataFrame:
    return read_table(path, KEY + ["ap"]).rename({"ap": f"ap:{relation}"})


def label_rates(path: Path) -> tuple[pl.DataFrame, list[str]]:
    frame = read_table(path, KEY + ["label", "firing_rate"])
    labels = sorted(frame["label"].unique().to_list())
    wide = frame.pivot(on="label", index=KEY, values="firing_rate")
    return wide.rename({label: f"rate:{label}" for label in labels}), labels


def label_selections(path: Path) -> pl.DataFrame:
    """Per unit, the labels each method selected it for (sorted by name)."""
    frame = read_table(path, ["method", "label", *KEY])
    unknown = set(frame["method"].unique().to_list()) - set(SELECTION_COLUMNS)
    if unknown:
        raise NeuronmapError(f"{path}: method(s) {sorted(unknown)} unknown (expected {sorted(SELECTION_COLUMNS)})")
    selected = None
    for method, column in SELECTION_COLUMNS.items():
        part = (frame.filter(pl.col("method") == method).group_by(KEY)
                .agg(pl.col("label").unique().sort().alias(column)))
        selected = part if selected is None else selected.join(part, on=KEY, how="full", coalesce=True)
    return selected


def explanations(path: Path, scores: Path | None) -> pl.DataFrame:
    """Per explained unit: the explainer model's description (the baseline's where the model gave
    none), the baseline's, and each one's balanced accuracy (the mean over scorers where several
    judged it; null where none did)."""
    texts = read_table(path, KEY + ["explainer", "explanation"])
    wide = texts.filter(pl.col("explainer").is_in(["model", "baseline"])).pivot(
        on="explainer", index=KEY, values="explanation", aggregate_function="first")
    if scores is not None:
        accuracy = (read_table(scores, KEY + ["explainer", "balanced_accuracy"])
                    .filter(pl.col("explainer").is_in(["model", "baseline"]))
                    .group_by(KEY + ["explainer"]).agg(pl.col("balanced_accuracy").mean())
                    .with_columns(pl.col("explainer") + "_score")
                    .pivot(on="explainer", index=KEY, values="balanced_accuracy"))
        wide = wide.join(accuracy, on=KEY, how="left")
    for name, dtype in (("model", pl.String), ("baseline", pl.String), ("model_score", pl.Float64),
                        ("baseline_score", pl.Float64)):
        if name not in wide.columns:  # no such explainer (explainer.backend none), or no scores
            wide = wide.with_columns(pl.lit(None, dtype).alias(name))
    # An empty model answer counts as none: the baseline's description stands in.
    has_model = pl.col("model").is_not_null() & (pl.col("model").str.strip_chars() != "")
    return wide.select(
        *KEY,
        explanation=pl.when(has_model).then(pl.col("model")).otherwise(pl.col("baseline")),
        explanation_score=pl.when(has_model).then(pl.col("model_score")).otherwise(pl.col("baseline_score")),
        baseline_explanation=pl.col("baseline"), baseline_score=pl.col("baseline_score"))


def build_index(sources: AtlasSources) -> tuple[pl.DataFrame, dict]:
    """The index (schema tables.atlas_units(relations, labels, explained)) and its metadata."""
    index, records = statistics(sources)
    joins = []
    if sources.peak_tokens is not None:
        joins.append(peak_tokens(sources.peak_tokens))
    if sources.decoded is not None:
        joins.append(decoded_tokens(sources.decoded))
    relations = sorted(sources.expertise)
    joins += [relation_ap(relation, sources.expertise[relation]) for relation in relations]
    labels: list[str] = []
    if sources.label_records is not None:
        rates, labels = label_rates(sources.label_records)
        joins.append(rates)
    if sources.label_units is not None:
        joins.append(label_selections(sources.label_units))
    explained = sources.explanations is not None
    if explained:
        joins.append(explanations(sources.explanations, sources.explain_scores))
    for part in joins:
        index = index.join(part, on=KEY, how="left")
    schema = tables.atlas_units(relations, labels, explained)
    dtypes = pl.from_arrow(schema.empty_table()).schema
    index = index.with_columns([pl.lit(None, dtype=dtypes[name]).alias(name) for name in schema.names
                                if name not in index.columns])
    metadata = {"records": records, "relations": relations, "labels": labels, "explained": explained}
    if sources.units is not None:
        from ..io.histogram import bin_edges
        lower, upper = bin_edges()
        # JSON has no infinity: the outermost bins' open ends are null.
        metadata["hist_lower"] = [None if abs(v) == float("inf") else float(v) for v in lower]
        metadata["hist_upper"] = [None if abs(v) == float("inf") else float(v) for v in upper]
    return index.select(schema.names).sort(KEY), metadata


def write_index(index: pl.DataFrame, metadata: dict, out: Path, sources: AtlasSources) -> None:
    run = Path(out).resolve().parent.parent
    metadata = {**metadata, "sources": sources.relative_to(run)}
    schema = tables.atlas_units(metadata["relations"], metadata["labels"], metadata.get("explained", False))
    table = index.to_arrow().select(schema.names).cast(schema)
    write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()}), out)


def read_metadata(schema: pa.Schema, path: Path) -> dict:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise NeuronmapError(f"{path}: no {METADATA_KEY.decode()} metadata: not an atlas index "
                             "(build it with `neuronmap atlas-index` or `snakemake atlas_index`)")
    return json.loads(raw)
