"""A unit's card: its row of the index, and what only the per-layer files hold (the histogram,
the top and bottom contexts, the peak tokens with their counts, the label records and selections),
read for that unit's layer alone when the card opens; and where the explain stage ran, the unit's
explanations with their scores and the shuffled control's (small files, read whole once)."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import polars as pl

from ..io.parquet import read_table
from .layers import GroupCache, LayeredFile
from .query import Index

EXAMPLE_COLUMNS = ["rank", "value", "context_id", "document", "label", "position", "token_id", "token", "before",
                   "after"]
LABEL_COLUMNS = ["label", "tokens", "contexts", "mean", "firing_rate", "n_positive"]
SCORE_COLUMNS = ["scorer", "contexts", "activating", "true_positive_rate", "true_negative_rate", "balanced_accuracy",
                 "auc"]
EXPLAINERS = ("model", "baseline", "shuffled")  # the card's order
CACHED_GROUPS = 12  # row groups kept in memory, all files together (a few layers of each)


class Cards:
    def __init__(self, index: Index, run: Path):
        self.index = index
        self.cache = GroupCache(CACHED_GROUPS)
        sources = index.metadata.get("sources", {})

        def layered(name: str, columns: list[str] | None = None) -> LayeredFile | None:
            return LayeredFile(run / sources[name], self.cache, columns) if name in sources else None

        self.units = layered("units", ["site", "layer", "unit", "hist_bins", "hist_counts"])
        self.examples = layered("examples")
        self.peak_tokens = layered("peak_tokens")
        self.label_records = layered("label_records")
        self.label_expertise = layered("label_expertise", ["site", "layer", "unit", "label", "ap", "rank"])
        self.label_units_path = run / sources["label_units"] if "label_units" in sources else None
        self._label_units: pl.DataFrame | None = None
        self.explain_paths = {name: run / sources[name] for name in ("explanations", "explain_scores")
                              if name in sources}
        self._explain: dict[str, pl.DataFrame] | None = None
        self._lock = threading.Lock()

    def card(self, site: str, layer: int, unit: int) -> dict | None:
        row = self.index.row(site, layer, unit)
        if row is None:
            return None
        metadata = self.index.metadata
        return _finite({
            "site": site, "layer": layer, "unit": unit, "records": metadata["records"], "row": row,
            "histogram": self.histogram(site, layer, unit),
            "examples": self.contexts(site, layer, unit),
            "peak_tokens": _rows(self.peak_tokens, site, layer, unit, ["rank", "token_id", "token", "contexts",
                                                                       "mean_value"], "rank"),
            "decoded": row["decoded_tokens"],
            "relations": {relation: row[f"ap:{relation}"] for relation in metadata["relations"]},
            "labels": self.labels(site, layer, unit),
            "selections": self.selections(site, layer, unit),
            "explanations": self.explanations(site, layer, unit),
        })

    def histogram(self, site: str, layer: int, unit: int) -> dict | None:
        """The non-empty bins, lowest first, each with its edges (null: open-ended), and which bin
        holds zero."""
        if self.units is None:
            return None
        rows = self.units.unit(site, layer, unit)
        if rows.height == 0:
            return None
        lower, upper = self.index.metadata["hist_lower"], self.index.metadata["hist_upper"]
        bins, counts = rows["hist_bins"][0].to_list(), rows["hist_counts"][0].to_list()
        zero = next(i for i, (a, b) in enumerate(zip(lower, upper)) if a is not None and b is not None and a < 0 < b)
        return {"zero_bin": zero,
                "bins": [{"bin": b, "lower": lower[b], "upper": upper[b], "count": c} for b, c in zip(bins, counts)]}

    def contexts(self, site: str, layer: int, unit: int) -> dict | None:
        if self.examples is None:
            return None
        rows = self.examples.unit(site, layer, unit)
        return {kind: rows.filter(pl.col("kind") == kind).sort("rank").select(EXAMPLE_COLUMNS).to_dicts()
                for kind in ("top", "bottom")}

    def labels(self, site: str, layer: int, unit: int) -> list[dict] | None:
        """Per label: the unit's firing rate and mean over the label's tokens, and its AP on the
        label's contexts where the AP selection ran."""
        if self.label_records is None:
            return None
        records = self.label_records.unit(site, layer, unit).select(LABEL_COLUMNS)
        if self.label_expertise is not None:
            expertise = self.label_expertise.unit(site, layer, unit).select(
                "label", pl.col("ap").alias("label_ap"), pl.col("rank").alias("label_ap_rank"))
            records = records.join(expertise, on="label", how="left")
        return records.sort("label").to_dicts()

    def selections(self, site: str, layer: int, unit: int) -> list[dict] | None:
        """The labels the unit was selected for, by which method, its rank and score there."""
        if self.label_units_path is None:
            return None
        with self._lock:
            if self._label_units is None:  # small (the selected units only): read whole, once
                self._label_units = read_table(self.label_units_path)
        rows = self._label_units.filter((pl.col("site") == site) & (pl.col("layer") == layer)
                                        & (pl.col("unit") == unit))
        return rows.select("method", "label", "rank", "score").sort("method", "label").to_dicts()


    def explanations(self, site: str, layer: int, unit: int) -> list[dict] | None:
        """The unit's explanations (model, baseline) and the shuffled control (another unit's
        explanation, named by explanation_of), each with its score by each scorer (null: not
        scored); None where the explain stage did not run."""
        if "explanations" not in self.explain_paths:
            return None
        with self._lock:
            if self._explain is None:  # the explained units alone: read whole, once
                self._explain = {name: read_table(path) for name, path in self.explain_paths.items()}
        texts = self._explain["explanations"]
        mine = (pl.col("site") == site) & (pl.col("layer") == layer) & (pl.col("unit") == unit)
        own = {e: t for e, t in texts.filter(mine).select("explainer", "explanation").rows()}
        scores = self._explain.get("explain_scores")
        scored = (scores.filter(mine).sort("explainer", "scorer").to_dicts() if scores is not None else [])
        name = f"{site}/{layer}/{unit}"
        out = []
        for explainer in EXPLAINERS:
            rows = [r for r in scored if r["explainer"] == explainer]
            if explainer != "shuffled" and explainer in own and not rows:
                rows = [{"explanation_of": name, **{c: None for c in SCORE_COLUMNS}}]
            for r in rows:
                of = r["explanation_of"]
                text = own.get(explainer) if of == name else _explanation_of(texts, of)
                out.append({"explainer": explainer, "explanation": text, "explanation_of": of,
                            **{c: r[c] for c in SCORE_COLUMNS}})
        return out


def _explanation_of(texts: pl.DataFrame, name: str) -> str | None:
    """Another unit's explanation (the model's, else the baseline's): what the shuffled control scored."""
    site, layer, unit = name.rsplit("/", 2)
    rows = dict(texts.filter((pl.col("site") == site) & (pl.col("layer") == int(layer)) & (pl.col("unit") == int(unit)))
                .select("explainer", "explanation").rows())
    return rows.get("model") or rows.get("baseline")


def _rows(source: LayeredFile | None, site, layer, unit, columns, order) -> list[dict] | None:
    if source is None:
        return None
    return source.unit(site, layer, unit).sort(order).select(columns).to_dicts()


def _finite(value):
    """JSON has no NaN or infinity: they go out as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
