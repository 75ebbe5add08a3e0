"""The labelled corpora's findings, stated from perplexity.parquet (labels stage): per label and
selection (LAPE, AP), whether switching its units off raises the label's own perplexity more than
matched random units, whether that rise is specific to the label, and which selection hurts its
own label more per unit switched off. Each finding is a row and a sentence built from it, in the
style of report.findings; what the numbers cannot decide is undecided.

The excess is the stage's: per held-out context of the evaluated label, the selection's mean NLL
minus the random controls' (mean over seeds), averaged over contexts (nats per token), with a
paired bootstrap interval and a sign-flip test, Benjamini-Hochberg over the whole matrix. Where
two cells are combined (own label against the others' mean), each cell's standard error is read
back from its interval as (high - low) / (2 z) and the cells are taken as independent: they are
measured on different contexts. LAPE and AP are compared on the same contexts, so their
per-unit excesses are not independent; the comparison decides only where the two intervals do
not overlap, which holds whatever their correlation.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import polars as pl

from .findings import FINDINGS_SCHEMA, _interval, _verdict
from .labels import METHODS

LABEL_FINDINGS_SCHEMA = {**{k: v for k, v in FINDINGS_SCHEMA.items() if k not in ("verdict", "statement")},
                         "q_value": pl.Float64, "verdict": pl.String, "statement": pl.String}


def _nats(x: float) -> str:
    return f"{x:+.3f} nats/token"


def _per_unit(x: float) -> str:
    return f"{x:+.2e} nats/token per unit"


def _between(low: float, high: float, confidence: float, per_unit: bool = False) -> str:
    if per_unit:
        return f"{confidence:.0%} interval {low:+.2e} to {high:+.2e}"
    return f"{confidence:.0%} interval {low:+.3f} to {high:+.3f}"


def _method_order(frame: pl.DataFrame) -> pl.DataFrame:
    """Rows by ablated label, LAPE before AP."""
    order = {m: i for i, m in enumerate(METHODS)}
    return frame.sort(pl.col("ablated_label"), pl.col("method").replace_strict(order, default=len(order)))


def _number(value) -> float | None:
    """A float, or None where the stage wrote null or NaN (no units, no contexts)."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _row(prop: str, scope: str, verdict: str, statement: str, estimate=None, low=None, high=None, p=None,
         q=None) -> dict:
    return {"property": prop, "scope": scope, "estimate": estimate, "ci_low": low, "ci_high": high, "p_value": p,
            "q_value": q, "verdict": verdict, "statement": statement}


def _diagonal(perplexity: pl.DataFrame) -> pl.DataFrame:
    return perplexity.filter(pl.col("ablated_label") == pl.col("eval_label"))


def own_label_rise(perplexity: pl.DataFrame, confidence: float, alpha: float) -> list[dict]:
    """Per method and label: the excess on the label's own held-out text. Holds where the interval
    lies above 0 and the matrix-wide q-value is below alpha; reversed where both say it fell."""
    rows = []
    diagonal = _diagonal(perplexity).with_columns(pl.col(pl.Float64).fill_nan(None))
    for cell in _method_order(diagonal).iter_rows(named=True):
        method, label = METHODS.get(cell["method"], cell["method"]), cell["ablated_label"]
        scope, prop = f"{method} {label}", "own-label perplexity"
        excess, low, high = (_number(cell[c]) for c in ("excess", "ci_low", "ci_high"))
        p, q = _number(cell["p_value"]), _number(cell["q_value"])
        if not cell["units"] or None in (excess, low, high, q, cell["selected_ratio"], cell["random_ratio"]):
            why = "it selected no units" if not cell["units"] else "the check has no numbers for it"
            rows.append(_row(prop, scope, "undecided", f"{method}'s selection for {label}: {why}, so its effect "
                             f"on {label}'s own text is undecided.", excess, low, high, p, q))
            continue
        verdict = _verdict(low, high) if q < alpha else "undecided"
        says = {"holds": "raises the perplexity of its held-out text more than as many matched random units do",
                "reversed": "raises the perplexity of its held-out text less than as many matched random units do",
                "undecided": "is not told apart from as many matched random units on its held-out text (that "
                             f"needs an interval clear of 0 and Benjamini-Hochberg q < {alpha})"}[verdict]
        rows.append(_row(prop, scope, verdict,
                         f"Switching off {method}'s {cell['units']} units for {label} {says}: perplexity "
                         f"×{cell['selected_ratio']:.3f} against ×{cell['random_ratio']:.3f}, excess {_nats(excess)} "
                         f"({_between(low, high, confidence)}; q = {q:.3g}; {cell['contexts']} contexts).",
                         excess, low, high, p, q))
    return rows


def specificity(perplexity: pl.DataFrame, confidence: float) -> list[dict]:
    """Per method and ablated label: the excess on its own text minus the mean excess on the other
    labels' text. Specific where the difference's interval lies above 0."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    cells = perplexity.with_columns(pl.col(pl.Float64).fill_nan(None)).with_columns(
        se=(pl.col("ci_high") - pl.col("ci_low")) / (2 * z), own=pl.col("ablated_label") == pl.col("eval_label"))
    rows = []
    for (method, label), group in _method_order(cells).group_by("method", "ablated_label", maintain_order=True):
        method = METHODS.get(method, method)
        scope, prop = f"{method} {label}", "specificity"
        own = group.filter(pl.col("own") & pl.col("excess").is_not_null() & pl.col("se").is_not_null())
        others = group.filter(~pl.col("own") & pl.col("excess").is_not_null() & pl.col("se").is_not_null())
        if own.height == 0 or others.height == 0 or not group["units"][0]:
            why = ("it selected no units" if not group["units"][0] else
                   f"the check has no numbers on {label}'s own text" if own.height == 0 else
                   "the check has no numbers on the other labels' text")
            rows.append(_row(prop, scope, "undecided",
                             f"Whether {method}'s units for {label} hurt {label} more than the other labels is "
                             f"undecided: {why}."))
            continue
        mean_others = float(others["excess"].mean())
        difference = float(own["excess"][0]) - mean_others
        se = math.sqrt(float(own["se"][0]) ** 2 + float((others["se"] ** 2).sum()) / others.height ** 2)
        low, high = _interval(difference, se, z)
        verdict = {"holds": "specific", "reversed": "reversed", "undecided": "undecided"}[_verdict(low, high)]
        says = {"specific": f"hurt {label}'s text more than the other labels' text",
                "reversed": f"hurt the other labels' text more than {label}'s own",
                "undecided": f"cannot be told to hurt {label}'s text more or less than the other labels' text"
                }[verdict]
        rows.append(_row(prop, scope, verdict,
                         f"{method}'s units for {label} {says}: excess {_nats(float(own['excess'][0]))} on "
                         f"{label} against {_nats(mean_others)} on average over {others.height} other "
                         f"label{'s' if others.height != 1 else ''}, a difference of {_nats(difference)} "
                         f"({_between(low, high, confidence)}).", difference, low, high))
    return rows


def selection_comparison(perplexity: pl.DataFrame, confidence: float) -> list[dict]:
    """Per label: which selection raises the label's own perplexity more per unit switched off
    (excess_per_unit on the diagonal, interval = the excess's over the units). Decided only where
    the two per-unit intervals do not overlap; then a summary over labels."""
    diagonal = _diagonal(perplexity).with_columns(pl.col(pl.Float64).fill_nan(None)).with_columns(
        per_unit_low=pl.col("ci_low") / pl.col("units"), per_unit_high=pl.col("ci_high") / pl.col("units"))
    rows, verdicts = [], []
    labels = sorted(set(perplexity["ablated_label"].to_list()))
    for label in labels:
        cells = {row["method"]: row for row in diagonal.filter(pl.col("ablated_label") == label).iter_rows(named=True)}
        lape, ap = cells.get("lape"), cells.get("ap")
        why = [f"{METHODS[m]}'s selection was not checked on {label}'s text" if c is None else
               f"{METHODS[m]} selected no units" if not c["units"] else
               f"{METHODS[m]} has no numbers on {label}'s text" for m, c in (("lape", lape), ("ap", ap))
               if c is None or not c["units"] or None in (c["excess_per_unit"], c["per_unit_low"], c["per_unit_high"])]
        if why:
            verdicts.append("undecided")
            rows.append(_row("LAPE vs AP per unit", label, "undecided",
                             f"Which selection hurts {label} more per unit is undecided: {'; '.join(why)}."))
            continue
        difference = lape["excess_per_unit"] - ap["excess_per_unit"]
        if lape["per_unit_low"] > ap["per_unit_high"]:
            verdict = "LAPE"
        elif ap["per_unit_low"] > lape["per_unit_high"]:
            verdict = "AP"
        else:
            verdict = "undecided"
        verdicts.append(verdict)
        says = {"LAPE": "LAPE's selection hurts it more per unit switched off than AP's",
                "AP": "AP's selection hurts it more per unit switched off than LAPE's",
                "undecided": "the intervals overlap, so which selection hurts it more per unit is undecided"}[verdict]
        rows.append(_row(
            "LAPE vs AP per unit", label, verdict,
            f"On {label}'s own text, {says}: LAPE {_per_unit(lape['excess_per_unit'])} over {lape['units']} units "
            f"({_between(lape['per_unit_low'], lape['per_unit_high'], confidence, True)}), AP "
            f"{_per_unit(ap['excess_per_unit'])} over {ap['units']} units "
            f"({_between(ap['per_unit_low'], ap['per_unit_high'], confidence, True)}).", difference))
    if labels:
        count = {v: verdicts.count(v) for v in ("LAPE", "AP", "undecided")}
        verdict = ("mixed" if count["LAPE"] and count["AP"] else "LAPE" if count["LAPE"] else
                   "AP" if count["AP"] else "undecided")
        rows.append(_row("LAPE vs AP per unit", "all labels", verdict,
                         f"Over {len(labels)} label{'s' if len(labels) != 1 else ''}, LAPE's selection hurts its own "
                         f"label more per unit in {count['LAPE']}, AP's in {count['AP']}, and the numbers do not "
                         f"decide in {count['undecided']}.", float(count["LAPE"] - count["AP"])))
    return rows


def label_findings(perplexity: pl.DataFrame, confidence: float, alpha: float) -> pl.DataFrame:
    """Every labelled-corpora finding as a row (LABEL_FINDINGS_SCHEMA)."""
    rows = own_label_rise(perplexity, confidence, alpha) + specificity(perplexity, confidence) \
        + selection_comparison(perplexity, confidence)
    return pl.DataFrame(rows, schema=LABEL_FINDINGS_SCHEMA)
