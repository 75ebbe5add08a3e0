"""Per-relation verdicts of the ablation study: does switching off a relation's own top-k units
hurt its recall more than switching off as many random units, on the same test prompts?

The comparison is paired, prompt by prompt, and clustered by fact (a fact asked with several
templates is one sampling unit). Per fact f, with S random seeds, x_f0 counts the fact's test
prompts the top-k ablation answers right and x_fs those random control s answers right. The
excess drop is the random controls' mean accuracy minus the top-k accuracy,
    excess = sum_f (mean_s x_fs - x_f0) / n         (n test prompts),
so positive means the relation's own units hurt more than random ones.

Test. The random seeds are replicates of "as many random units": under the null the top-k set is
one more of them, so within a fact the S + 1 sets' counts are exchangeable. The p-value is the
exact permutation test that, independently per fact, lets any of the S + 1 sets be the top-k one
(a sign-flip test when S = 1), two-sided on the excess; its null distribution is computed
exactly by convolving the facts' (S + 1)-point distributions, no Monte Carlo. Facts are the
sampling units; a difference between random draws as a whole (seeds that disagree more than
facts do) is not in the test, and shows as the seeds' spread (`random_accuracy_sd`).

Interval: a percentile bootstrap of the excess, facts resampled (within relation for the
pooled rows). Benjamini-Hochberg over the relation x k table; a verdict holds (q < alpha,
excess > 0), is reversed (q < alpha, excess < 0) or is undecided.

Detectable drop: the smallest excess this cell's test would find (p < alpha, the top-k worse)
with probability `power`, computed by simulation on the cell's own prompts: the top-k set
answers each prompt like one more random control (right with the prompt's rate over the seeds)
and then loses each right answer with probability pi; the detectable drop is pi* times the
random controls' accuracy, pi* the smallest pi with that power (bisection, common random
numbers). NaN: even losing every answer would not be found with that power.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import polars as pl

from ..errors import NeuronmapError
from ..io import tables
from ..io.tables import FACT_OF_PROMPT
from ..maths.significance import benjamini_hochberg

VERDICTS = ("holds", "undecided", "reversed")


@dataclass(frozen=True)
class Cell:
    """One relation's (or the pooled) test prompts, clustered by fact."""
    counts: np.ndarray   # [facts, 1 + S] int64: right answers per fact, the top-k set first
    sizes: np.ndarray    # [facts] int64: test prompts per fact
    strata: np.ndarray   # [facts] int64: relation index (the bootstrap resamples within it)

    @property
    def seeds(self) -> int:
        return self.counts.shape[1] - 1

    @property
    def n(self) -> int:
        return int(self.sizes.sum())

    def excess(self) -> float:
        return float((self.counts[:, 1:].mean(1) - self.counts[:, 0]).sum() / self.n)


def fact_of(prompt_id: pl.Expr) -> pl.Expr:
    """`<relation>/<fact>/t<template>` -> `<relation>/<fact>`: the prompts of one fact."""
    return prompt_id.str.replace(FACT_OF_PROMPT, "")


def own_cells(predictions: pl.DataFrame) -> dict[tuple[str, int], Cell]:
    """Per (relation, k): the own-relation top-k and random predictions as a Cell. Every random
    seed must have answered every prompt the top-k ablation did."""
    own = predictions.filter((pl.col("ablated_relation") == pl.col("eval_relation"))
                             & pl.col("control").is_in(["top_k", "random"]))
    own = own.with_columns(fact=fact_of(pl.col("prompt_id")),
                           column=pl.when(pl.col("control") == "top_k").then(pl.lit("top"))
                           .otherwise(pl.format("seed{}", pl.col("seed"))))
    cells = {}
    for (relation, k), group in own.sort("ablated_relation", "k").group_by(["ablated_relation", "k"],
                                                                          maintain_order=True):
        wide = group.pivot(on="column", index=["fact", "prompt_id"], values="correct", aggregate_function="first")
        seeds = sorted(c for c in wide.columns if c.startswith("seed"))
        if "top" not in wide.columns or wide.select(["top", *seeds]).null_count().sum_horizontal().item():
            raise NeuronmapError(f"verdicts: {relation} k={k}: the top-k and random ablations were not "
                                 "evaluated on the same test prompts (ablation.random_eval)")
        per_fact = wide.group_by("fact", maintain_order=True).agg(
            pl.len().alias("size"), *[pl.col(c).cast(pl.Int64).sum() for c in ["top", *seeds]]).sort("fact")
        cells[(relation, int(k))] = Cell(per_fact.select(["top", *seeds]).to_numpy().astype(np.int64),
                                         per_fact["size"].to_numpy().astype(np.int64),
                                         np.zeros(per_fact.height, np.int64))
    return cells


def pooled(cells: list[Cell]) -> Cell:
    seeds = {cell.seeds for cell in cells}
    if len(seeds) != 1:
        raise NeuronmapError(f"verdicts: relations have different numbers of random seeds ({sorted(seeds)})")
    return Cell(np.concatenate([c.counts for c in cells]), np.concatenate([c.sizes for c in cells]),
                np.concatenate([np.full(len(c.sizes), i) for i, c in enumerate(cells)]))


def _null_values(counts: np.ndarray) -> np.ndarray:
    """[facts, 1 + S]: S x (n x excess)'s share of each fact when set j is taken for the top-k
    one, X - (S + 1) x_j with X the fact's total; integers, so the null is exact."""
    return counts.sum(1, keepdims=True) - counts.shape[1] * counts


def null_distribution(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The permutation test's null: (support, probabilities, observed) of S x n x excess, exact
    (module docstring). Facts where every set gives the same count add 0 whatever the roles."""
    values = _null_values(counts)
    observed = int(values[:, 0].sum())
    pmf, low = np.ones(1), 0
    for row in values[(values != 0).any(1)]:
        kernel = np.zeros(row.max() - row.min() + 1)
        np.add.at(kernel, row - row.min(), 1.0 / row.size)
        pmf, low = np.convolve(pmf, kernel), low + int(row.min())
    return np.arange(low, low + pmf.size), pmf, observed


def permutation_p_value(counts: np.ndarray) -> float:
    """Two-sided p-value of the exact per-fact permutation test: P(|T| >= |observed|)."""
    if counts.shape[1] < 2:
        return math.nan
    support, pmf, observed = null_distribution(counts)
    return float(min(1.0, pmf[np.abs(support) >= abs(observed)].sum()))


def bootstrap(cell: Cell, n_resamples: int, confidence: float, rng: np.random.Generator) -> tuple[float, float, float]:
    """Percentile interval and standard error of the excess, facts resampled within strata."""
    difference = cell.counts[:, 1:].mean(1) - cell.counts[:, 0]
    total = np.zeros(n_resamples)
    size = np.zeros(n_resamples)
    for stratum in np.unique(cell.strata):
        members = np.flatnonzero(cell.strata == stratum)
        draws = members[rng.integers(0, members.size, size=(n_resamples, members.size))]
        total += difference[draws].sum(1)
        size += cell.sizes[draws].sum(1)
    estimates = total / size
    tail = (1 - confidence) / 2
    low, high = np.quantile(estimates, [tail, 1 - tail])
    return float(low), float(high), float(estimates.std(ddof=1))


def _simulated_p_values(cell: Cell, top: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided p-values of the permutation test, and the statistics, of many simulated
    datasets at once: the cell's random controls with the top-k counts `top` [datasets, facts].
    The null's characteristic function is the product of the facts'; facts with the same size
    and random counts share one per top-k count, so a dataset's is one matrix row times a small
    table. The statistic is an integer below length / 2 in size, so the inverse FFT gives the
    null exactly up to rounding (~1e-12, enough to compare with alpha)."""
    seeds = cell.seeds
    length = 1 << int(np.ceil(np.log2(2 * (seeds + 1) * cell.n + 2)))
    kinds, kind_of = np.unique(np.column_stack([cell.sizes, cell.counts[:, 1:]]), axis=0, return_inverse=True)
    kind_of = kind_of.ravel()
    offsets = np.concatenate([[0], np.cumsum(kinds[:, 0] + 1)])
    frequencies = np.arange(length // 2 + 1) * (-2j * np.pi / length)
    table = np.empty((offsets[-1], frequencies.size), complex)
    for kind, (size, *randoms) in enumerate(kinds):
        for t in range(size + 1):
            values = _null_values(np.array([[t, *randoms]]))[0]
            cf = np.exp(values[:, None] * frequencies[None, :]).mean(0)
            table[offsets[kind] + t] = np.log(np.where(np.abs(cf) > 1e-300, cf, 1e-300))
    columns = offsets[kind_of][None, :] + top  # [datasets, facts]
    datasets = top.shape[0]
    histogram = np.bincount((columns + offsets[-1] * np.arange(datasets)[:, None]).ravel(),
                            minlength=datasets * offsets[-1]).reshape(datasets, -1).astype(np.float64)
    log_cf = histogram @ table.real + 1j * (histogram @ table.imag)
    pmf = np.fft.irfft(np.exp(log_cf), n=length, axis=1)
    support = np.arange(length)
    support = np.abs(np.where(support < length // 2, support, support - length))
    observed = (cell.counts[:, 1:].sum(1)[None, :] - seeds * top).sum(1)
    p = np.where(support[None, :] >= np.abs(observed)[:, None], pmf, 0.0).sum(1)
    return np.clip(p, 0.0, 1.0), observed


def detectable_drop(cell: Cell, alpha: float, power: float, simulations: int, rng: np.random.Generator,
                    steps: int = 12) -> float:
    """The smallest excess drop the test finds with probability `power` (module docstring)."""
    if cell.seeds < 1:
        return math.nan
    fact = np.repeat(np.arange(cell.sizes.size), cell.sizes)
    # Per prompt, its fact's rate of right answers over the random seeds.
    rate = np.repeat(cell.counts[:, 1:].mean(1) / cell.sizes, cell.sizes)
    if rate.sum() == 0:
        return math.nan
    answered = rng.random((simulations, rate.size)) < rate  # like one more random control
    loss = rng.random((simulations, rate.size))

    def found(pi: float) -> float:
        right = (answered & (loss >= pi)).astype(np.int64)
        top = np.zeros((simulations, cell.sizes.size), np.int64)
        np.add.at(top, (slice(None), fact), right)
        p, observed = _simulated_p_values(cell, top)
        return float(np.mean((p < alpha) & (observed > 0)))

    if found(1.0) < power:
        return math.nan
    low, high = 0.0, 1.0
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (low, middle) if found(middle) >= power else (middle, high)
    return float(high * rate.mean())


def verdict(q: float, excess: float, alpha: float) -> str:
    if q is None or math.isnan(q) or q >= alpha or excess == 0:
        return "undecided"
    return "holds" if excess > 0 else "reversed"


def _row(relation, k, cell: Cell, baseline: float, n_resamples, confidence, alpha, power, simulations, seed) -> dict:
    rng = np.random.default_rng([seed, zlib.crc32(repr((relation, k)).encode())])
    low, high, se = bootstrap(cell, n_resamples, confidence, rng)
    random_accuracy = cell.counts[:, 1:].sum(0) / cell.n
    return {"relation": relation, "k": k, "n": cell.n, "facts": int(cell.sizes.size), "seeds": cell.seeds,
            "baseline_accuracy": baseline, "top_accuracy": float(cell.counts[:, 0].sum() / cell.n),
            "random_accuracy": float(random_accuracy.mean()),
            "random_accuracy_sd": float(random_accuracy.std(ddof=1)) if cell.seeds > 1 else math.nan,
            "excess_drop": cell.excess(), "ci_low": low, "ci_high": high, "se": se,
            "p_value": permutation_p_value(cell.counts),
            "detectable_drop": detectable_drop(cell, alpha, power, simulations, rng)}


def verdict_table(predictions: pl.DataFrame, baseline: pl.DataFrame, *, n_resamples: int = 2000,
                  confidence: float = 0.95, alpha: float = 0.05, power: float = 0.8, simulations: int = 400,
                  seed: int = 0) -> pl.DataFrame:
    """tables.VERDICTS: one row per (relation, k), then per k a pooled row (relation null) over
    every relation's facts. q_value: Benjamini-Hochberg over the per-relation rows, and apart
    over the pooled rows."""
    cells = own_cells(predictions)
    # The unmodified model's accuracy on the prompts of each cell (context for the reader).
    own_top = predictions.filter((pl.col("ablated_relation") == pl.col("eval_relation"))
                                 & (pl.col("control") == "top_k")).select("ablated_relation", "k", "prompt_id")
    base = own_top.join(baseline.select("prompt_id", "correct"), on="prompt_id", how="left")
    options = dict(n_resamples=n_resamples, confidence=confidence, alpha=alpha, power=power,
                   simulations=simulations, seed=seed)
    rows = []
    for (relation, k), cell in cells.items():
        accuracy = base.filter((pl.col("ablated_relation") == relation) & (pl.col("k") == k))["correct"].mean()
        rows.append(_row(relation, k, cell, accuracy, **options))
    for k in sorted({k for _, k in cells}):
        members = [cell for (_, kk), cell in cells.items() if kk == k]
        rows.append(_row(None, k, pooled(members), base.filter(pl.col("k") == k)["correct"].mean(), **options))
    if not rows:
        return pl.from_arrow(tables.VERDICTS.empty_table())
    table = pl.DataFrame(rows, schema_overrides={"relation": pl.String}, infer_schema_length=None)
    q = np.full(table.height, np.nan)
    for family in (table["relation"].is_not_null(), table["relation"].is_null()):
        index = np.flatnonzero(family.to_numpy())
        q[index] = benjamini_hochberg(table["p_value"].to_numpy()[index])
    table = table.with_columns(q_value=pl.Series(q, nan_to_null=False))
    table = table.with_columns(verdict=pl.Series([verdict(q, e, alpha) for q, e in
                                                  table.select("q_value", "excess_drop").iter_rows()]))
    table = table.sort(pl.col("relation").is_null(), "relation", "k")
    return pl.from_arrow(table.select(tables.VERDICTS.names).to_arrow().cast(tables.VERDICTS))
