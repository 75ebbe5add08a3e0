"""The atlas's table: the index in memory, filtered, searched, sorted and cut into pages.

Token search matches the tokens a unit peaks on in the corpus (peak_tokens) and its decoded
tokens: by default a whole token, ignoring case and the spaces around it (`hat` finds ` hat` and
`Hat`); with match=substring, any token containing the text. Explanation search (where the explain
stage ran) keeps the units whose explanation or baseline explanation holds every word given,
ignoring case. NaN (the skewness of a constant
unit) never passes a range filter and sorts last, like a missing value.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ..errors import NeuronmapError
from ..io.parquet import open_parquet
from .index import KEY, read_metadata

SEPARATOR = "\x1f"  # between a unit's tokens in the search columns; no token holds it
LIST_COLUMNS = ("peak_tokens", "decoded_tokens")  # the card shows them; the table shows the first
MAX_LIMIT = 1000
# Integers in a request (layer, unit, offset, limit) are plain decimal digits up to 2**53 - 1, the
# largest a browser's JSON keeps exact; a bigger one once reached polars as an overflow and dropped
# the connection without an answer.
MAX_INTEGER = 2**53 - 1
DIGITS = re.compile(r"[0-9]{1,16}")


class QueryError(NeuronmapError):
    """A request the table cannot answer (HTTP 400)."""


def _search_columns(frame: pl.DataFrame) -> pl.DataFrame:
    """Per list of tokens, two lower-cased strings: the tokens joined (substring search) and the
    stripped tokens between separators (whole-token search)."""
    columns = []
    for source, prefix in (("peak_tokens", "_peak"), ("decoded_tokens", "_decoded")):
        lower = pl.col(source).list.eval(pl.element().str.to_lowercase())
        stripped = pl.col(source).list.eval(pl.element().str.strip_chars().str.to_lowercase())
        columns += [lower.list.join(SEPARATOR).fill_null("").alias(f"{prefix}_text"),
                    (SEPARATOR + stripped.list.join(SEPARATOR) + SEPARATOR).fill_null("").alias(f"{prefix}_exact")]
    if "explanation" in frame.columns:
        both = pl.concat_str([pl.col("explanation").fill_null(""), pl.col("baseline_explanation").fill_null("")],
                             separator=SEPARATOR)
        columns.append(both.str.to_lowercase().alias("_explanation_text"))
    return frame.with_columns(columns)


@dataclass
class Index:
    frame: pl.DataFrame
    metadata: dict
    path: Path
    seconds_to_load: float = 0.0

    @classmethod
    def load(cls, path: str | Path) -> Index:
        start = time.perf_counter()
        parquet = open_parquet(path)
        metadata = read_metadata(parquet.schema_arrow, Path(path))
        # Sorted by unit: the table's default order, which a stable sort keeps among ties.
        frame = _search_columns(pl.from_arrow(parquet.read())).sort(KEY)
        return cls(frame, metadata, Path(path), time.perf_counter() - start)

    @property
    def columns(self) -> list[str]:
        """The index's own columns (not the search columns)."""
        return [c for c in self.frame.columns if not c.startswith("_")]

    @property
    def numeric(self) -> list[str]:
        return [c for c, t in self.frame.schema.items() if t.is_numeric() and not c.startswith("_")]

    def describe(self) -> dict:
        """/api/columns: every column and its kind, and what the run has."""
        kinds = {}
        for name in self.columns:
            dtype = self.frame.schema[name]
            kinds[name] = "list" if isinstance(dtype, pl.List) else "number" if dtype.is_numeric() else "text"
        table = [c for c in self.columns if c not in LIST_COLUMNS]
        nulls = self.frame.select(self.columns).null_count().row(0, named=True)
        return {"columns": [{"name": c, "kind": kinds[c]} for c in self.columns], "table": table,
                "empty": [c for c in self.columns if nulls[c] == self.frame.height],
                "units": self.frame.height, "sites": sorted(self.frame["site"].unique().to_list()),
                "layers": sorted(self.frame["layer"].unique().to_list()),
                "relations": self.metadata["relations"], "labels": self.metadata["labels"],
                "records": self.metadata["records"], "sources": self.metadata.get("sources", {}),
                "explained": self.metadata.get("explained", False),
                "run": self.path.resolve().parent.parent.name}

    def row(self, site: str, layer: int, unit: int) -> dict | None:
        rows = self.frame.filter((pl.col("site") == site) & (pl.col("layer") == layer) & (pl.col("unit") == unit))
        return rows.select(self.columns).to_dicts()[0] if rows.height else None

    def select(self, params: dict[str, list[str]]) -> pl.DataFrame:
        """The rows a request's filters keep, in its order."""
        frame = self.frame
        one = {name: values[-1] for name, values in params.items() if values and values[-1] != ""}
        if "site" in one:
            frame = frame.filter(pl.col("site").is_in(one["site"].split(",")))
        for name in ("layer", "unit"):
            if name in one:
                frame = frame.filter(pl.col(name).is_in(_integers(name, one[name])))
        if "token" in one:
            frame = frame.filter(self._token_match(one["token"], one.get("match", "token"), one.get("in", "both")))
        if "label" in one:
            frame = frame.filter(self._label_match(one["label"], one.get("method", "")))
        if "explanation" in one:
            frame = frame.filter(self._explanation_match(one["explanation"]))
        for text in params.get("filter", []):
            if text:
                frame = frame.filter(self._range(text))
        if "sort" not in one:
            return frame  # filters keep the frame's order: site, layer, unit
        return frame.sort(self._order(one["sort"]), descending=one.get("desc", "0") == "1", nulls_last=True,
                          maintain_order=True)

    def units(self, params: dict[str, list[str]]) -> dict:
        """/api/units: one page of the selected rows (the token lists left to the card)."""
        offset = integer("offset", params.get("offset", ["0"])[-1] or "0")
        limit = integer("limit", params.get("limit", ["50"])[-1] or "50")
        if not 0 < limit <= MAX_LIMIT:
            raise QueryError(f"limit must be in 1..{MAX_LIMIT} (got {limit})")
        selected = self.select(params)
        columns = [c for c in self.columns if c not in LIST_COLUMNS]
        page = selected.slice(offset, limit).select(columns)
        return {"total": selected.height, "offset": offset, "limit": limit, "columns": columns,
                "rows": [[_finite(v) for v in row] for row in page.rows()]}

    def _token_match(self, text: str, match: str, where: str) -> pl.Expr:
        sources = {"both": ["_peak", "_decoded"], "peak": ["_peak"], "decoded": ["_decoded"]}.get(where)
        if sources is None or match not in ("token", "substring"):
            raise QueryError(f"token search: in must be both, peak or decoded and match token or substring "
                             f"(got in={where!r}, match={match!r})")
        text = text.replace(SEPARATOR, "").lower()
        if match == "token":
            needle, suffix = SEPARATOR + text.strip() + SEPARATOR, "_exact"
        else:
            needle, suffix = text, "_text"
        found = [pl.col(source + suffix).str.contains(needle, literal=True) for source in sources]
        return pl.any_horizontal(found)

    def _label_match(self, label: str, method: str) -> pl.Expr:
        columns = {"": ["lape", "ap_label"], "lape": ["lape"], "ap": ["ap_label"]}.get(method)
        if columns is None:
            raise QueryError(f"method must be lape or ap (got {method!r})")
        return pl.any_horizontal([pl.col(c).list.contains(label).fill_null(False) for c in columns])

    def _explanation_match(self, text: str) -> pl.Expr:
        if "_explanation_text" not in self.frame.columns:
            raise QueryError("explanation: this run has no explanations (the explain stage did not run)")
        words = text.replace(SEPARATOR, "").lower().split()
        if not words:
            return pl.lit(True)
        return pl.all_horizontal([pl.col("_explanation_text").str.contains(w, literal=True) for w in words])

    def _range(self, text: str) -> pl.Expr:
        """`column:min:max`, either bound empty for none (column names may hold colons)."""
        parts = text.rsplit(":", 2)
        if len(parts) != 3 or parts[0] not in self.numeric:
            raise QueryError(f"filter {text!r}: expected <numeric column>:<min>:<max> (columns: {self.numeric})")
        column, low, high = parts
        value = pl.col(column)
        keep = value.is_not_null()
        if self.frame.schema[column].is_float():
            keep &= value.is_not_nan()
        for bound, compare in ((low, value.__ge__), (high, value.__le__)):
            if bound != "":
                try:
                    keep &= compare(float(bound))
                except ValueError:
                    raise QueryError(f"filter {text!r}: {bound!r} is not a number") from None
        return keep

    def _order(self, column: str) -> pl.Expr:
        if column not in self.columns or column in LIST_COLUMNS or isinstance(self.frame.schema[column], pl.List):
            raise QueryError(f"sort: {column!r} is not a column of the table")
        value = pl.col(column)
        if self.frame.schema[column].is_float():
            value = value.fill_nan(None)
        # Sorted stably: ties keep the frame's order (site, layer, unit), whichever way the column goes.
        return value


def _integers(name: str, text: str, many: bool = True) -> list[int]:
    """Non-negative integers, comma-separated where `many`; anything else names the parameter (no
    int(): it takes spaces, underscores and other scripts' digits)."""
    parts = text.split(",") if many else [text]
    if not all(DIGITS.fullmatch(part) and int(part) <= MAX_INTEGER for part in parts):
        shown = text if len(text) <= 40 else text[:40] + "..."
        what = "or a comma-separated list of them " if many else ""
        raise QueryError(f"{name} must be an integer in 0..{MAX_INTEGER} {what}(got {shown!r})")
    return [int(part) for part in parts]


def integer(name: str, text: str) -> int:
    """One integer of a request's path or query (as _integers)."""
    return _integers(name, text, many=False)[0]


def _finite(value):
    """JSON has no NaN or infinity: they go out as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
