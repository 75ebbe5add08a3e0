"""The causal check of the label selections: perplexity of every label's held-out text with one
label's selected units off, against matched random units.

A selection is specific to its label when switching it off makes that label's text less
predictable than the same number of random units in the same sites and layers does, while the
other labels' text suffers no more than under the random units. Every configuration (the
baseline, each method's selection of each label, and its random controls) scores every held-out
context as its own sequence; the configurations share forward passes through per-row unit masks
(model/deactivation.py RowDeactivation), the contexts are right-padded with an attention mask.

Statistics are paired by context: per context, the selection's mean NLL minus the mean over
seeds of the random controls' (`excess`), with a paired bootstrap interval of its mean and a
two-sided sign-flip permutation test (under the null the per-context difference is symmetric
about zero; exact over all 2^n sign patterns when they number no more than the resamples, Monte
Carlo otherwise), Benjamini-Hochberg over the whole label x label matrix.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import scipy.stats
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import NeuronmapError
from ..io import tables
from ..maths.draws import relation_rng
from ..maths.significance import benjamini_hochberg, bootstrap_interval
from ..model.architectures import MlpSites
from ..model.batching import LOGIT_BUDGET
from ..model.deactivation import Deactivation, RowDeactivation, UnitSet, random_units
from ..model.dispatch import input_device

log = logging.getLogger(__name__)

CONFIG_KEY = ["method", "ablated_label", "control", "seed"]
CELL = ["method", "ablated_label", "eval_label"]


@dataclass(frozen=True)
class Configuration:
    method: str          # "none" (baseline), "lape" or "ap"
    ablated_label: str   # "" for the baseline
    control: str         # "none", "selected" or "random"
    seed: int            # 0 unless random
    units: UnitSet

    @property
    def size(self) -> int:
        return sum(len(ids) for ids in self.units.values())

    def unit_key(self) -> frozenset:
        """The set of units off: configurations with the same set give the same NLLs."""
        return frozenset((site, layer, int(u)) for (site, layer), ids in self.units.items() for u in ids)


BASELINE = Configuration("none", "", "none", 0, {})


def heldout_contexts(contexts: pl.DataFrame, per_label: int) -> pl.DataFrame:
    """The contexts scored: each label's first `per_label` held-out contexts by context_id, of at
    least 2 tokens (a context predicts its tokens after the first)."""
    heldout = contexts.filter(pl.col("heldout") & (pl.col("n_tokens") >= 2)).sort("context_id")
    return heldout.filter(pl.int_range(pl.len()).over("label") < per_label).sort("label", "context_id")


def selected_units(label_units: pl.DataFrame, method: str, label: str) -> UnitSet:
    units: UnitSet = {}
    chosen = label_units.filter((pl.col("method") == method) & (pl.col("label") == label))
    for site, layer, unit in chosen.select("site", "layer", "unit").sort("site", "layer", "unit").iter_rows():
        units.setdefault((site, int(layer)), []).append(int(unit))
    return units


def configurations(label_units: pl.DataFrame, methods: Sequence[str], labels: Sequence[str],
                   seeds: Sequence[int], widths: Mapping[str, int]) -> list[Configuration]:
    """The baseline, then per method and ablated label its selection and one matched random
    control per seed: as many units in each (site, layer) as the selection has there, drawn
    uniformly from that (site, layer)'s other units (model.deactivation.random_units). A label's
    draws depend only on the seed, the method and the label."""
    plan = [BASELINE]
    for method in methods:
        for label in labels:
            chosen = selected_units(label_units, method, label)
            plan.append(Configuration(method, label, "selected", 0, chosen))
            for seed in seeds:
                rng = relation_rng(seed, label, f"label-random-{method}")
                plan.append(Configuration(method, label, "random", seed, random_units(chosen, dict(widths), rng)))
    return plan


def context_nll(model, sequences: Sequence[np.ndarray], configs: Sequence[Deactivation],
                pad_id: int = 0, progress: bool = True) -> np.ndarray:
    """[configs, sequences]: each sequence's mean negative log-likelihood (nats per predicted
    token) under each configuration. Rows are (configuration, sequence) pairs, longest sequences
    first so that a batch pads little, as many per forward pass as the logits budget allows."""
    device = input_device(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    if lengths.size and lengths.min() < 2:
        raise ValueError("context_nll: every sequence needs 2 tokens or more")
    pairs = sorted(((c, s) for c in range(len(configs)) for s in range(len(sequences))),
                   key=lambda pair: (-lengths[pair[1]], pair[1], pair[0]))
    batches, start = [], 0
    while start < len(pairs):
        width = int(lengths[pairs[start][1]])
        rows = max(1, LOGIT_BUDGET // (width * vocab * 4))
        batches.append(pairs[start:start + rows])
        start += rows
    out = np.full((len(configs), len(sequences)), np.nan)
    masks = RowDeactivation(MlpSites(model), configs, device)
    with masks.installed(), torch.inference_mode():
        for batch in tqdm(batches, desc="label perplexity", unit="batch", mininterval=2, disable=not progress):
            width = int(lengths[batch[0][1]])
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            for row, (_, s) in enumerate(batch):
                ids[row, :lengths[s]] = torch.as_tensor(sequences[s], dtype=torch.long)
            size = torch.as_tensor([lengths[s] for _, s in batch])
            attention = (torch.arange(width)[None, :] < size[:, None]).long()
            masks.set_rows([c for c, _ in batch])
            logits = model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False).logits
            targets = ids[:, 1:].to(logits.device)
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   reduction="none").view(targets.shape)
            # Right padding: a row's predictions stop at its own length; the padded ones are dropped.
            valid = attention[:, 1:].to(logits.device).bool()
            per_row = (loss * valid).sum(1) / valid.sum(1)
            for (c, s), value in zip(batch, per_row.tolist()):
                out[c, s] = value
    return out


def score(model, heldout: pl.DataFrame, plan: Sequence[Configuration], pad_id: int = 0,
          progress: bool = True) -> pl.DataFrame:
    """tables.LABEL_PERPLEXITY_CONTEXTS: every configuration on every held-out context.
    Configurations that switch off the same units (a selection of 0 units and the baseline, say)
    are computed once, so their NLLs are identical, not merely close."""
    keys: dict[frozenset, int] = {}
    unique: list[Configuration] = []
    index = []
    for config in plan:
        key = config.unit_key()
        if key not in keys:
            keys[key] = len(unique)
            unique.append(config)
        index.append(keys[key])
    log.info("%d configurations (%d distinct unit sets) x %d held-out contexts", len(plan), len(unique),
             heldout.height)
    sequences = [np.asarray(ids, dtype=np.int64) for ids in heldout["token_ids"].to_list()]
    nll = context_nll(model, sequences, [Deactivation.constant(c.units) for c in unique], pad_id, progress)
    n = heldout.height
    columns = {
        "method": [c.method for c in plan for _ in range(n)],
        "ablated_label": [c.ablated_label for c in plan for _ in range(n)],
        "control": [c.control for c in plan for _ in range(n)],
        "seed": [c.seed for c in plan for _ in range(n)],
        "units": [c.size for c in plan for _ in range(n)],
        "context_id": heldout["context_id"].to_list() * len(plan),
        "eval_label": heldout["label"].to_list() * len(plan),
        "tokens": (heldout["n_tokens"] - 1).to_list() * len(plan),
        "nll": np.concatenate([nll[i] for i in index]),
    }
    return pl.from_arrow(pa.table(columns, schema=tables.LABEL_PERPLEXITY_CONTEXTS))


def sign_flip_p_value(differences: np.ndarray, n_resamples: int, rng: np.random.Generator) -> float:
    """Two-sided p-value of a zero mean of paired differences: the signs flipped at random
    (scipy.stats.permutation_test, exact when 2^n <= n_resamples). 1 when there is no difference
    or a single pair (its two sign patterns are equally extreme)."""
    if differences.size == 0:
        return math.nan
    if differences.size == 1 or not np.any(differences):
        return 1.0
    result = scipy.stats.permutation_test((differences,), lambda d, axis: np.mean(d, axis=axis),
                                          permutation_type="samples", vectorized=True, n_resamples=n_resamples,
                                          alternative="two-sided", rng=rng)
    return float(result.pvalue)


def _weighted_perplexity(nll: np.ndarray, tokens: np.ndarray) -> float:
    return math.exp(float(np.sum(nll * tokens) / np.sum(tokens)))


def summary_table(per_context: pl.DataFrame, n_resamples: int, confidence: float, alpha: float,
                  seed: int) -> pl.DataFrame:
    """tables.LABEL_PERPLEXITY from the per-context NLLs: one row per (method, ablated label,
    evaluated label)."""
    baseline = per_context.filter(pl.col("control") == "none").select("context_id", pl.col("nll").alias("base"))
    if baseline["context_id"].n_unique() != baseline.height:
        raise NeuronmapError("label perplexity: more than one baseline NLL per context")
    if per_context.filter(pl.col("control") == "random").height == 0:
        raise NeuronmapError("label perplexity: no random controls (labels.random_seeds)")
    random = per_context.filter(pl.col("control") == "random") \
        .pivot(on="seed", index=["method", "ablated_label", "context_id"], values="nll", sort_columns=True)
    seeds = [c for c in random.columns if c not in ("method", "ablated_label", "context_id")]
    selected = per_context.filter(pl.col("control") == "selected") \
        .join(baseline, on="context_id", how="left") \
        .join(random, on=["method", "ablated_label", "context_id"], how="left") \
        .sort(CELL + ["context_id"])
    rows = []
    for key, cell in selected.group_by(CELL, maintain_order=True):
        tokens = cell["tokens"].to_numpy().astype(np.float64)
        base, chosen = cell["base"].to_numpy(), cell["nll"].to_numpy()
        controls = cell.select(seeds).to_numpy()  # [contexts, seeds]
        differences = chosen - controls.mean(1)
        # Each cell has its own seeded stream, so adding a cell leaves the others' as they were.
        rng = np.random.default_rng([seed, zlib.crc32(repr(key).encode())])
        low, high = bootstrap_interval(differences, n_resamples, confidence, rng)
        baseline_perplexity = _weighted_perplexity(base, tokens)
        units = int(cell["units"][0])
        excess = float(differences.mean())
        rows.append({
            **dict(zip(CELL, key)), "units": units, "contexts": cell.height, "tokens": int(tokens.sum()),
            "baseline_perplexity": baseline_perplexity,
            "selected_ratio": _weighted_perplexity(chosen, tokens) / baseline_perplexity,
            "random_ratio": float(np.mean([_weighted_perplexity(controls[:, s], tokens) for s in range(len(seeds))]))
            / baseline_perplexity,
            "excess": excess, "ci_low": low, "ci_high": high,
            "p_value": sign_flip_p_value(differences, n_resamples, rng),
            "excess_per_unit": excess / units if units else math.nan,
        })
    if not rows:
        return pl.from_arrow(tables.LABEL_PERPLEXITY.empty_table())
    table = pl.DataFrame(rows)
    q = benjamini_hochberg(table["p_value"].to_numpy())
    table = table.with_columns(q_value=pl.Series(q, nan_to_null=False),
                               significant=pl.Series(np.nan_to_num(q, nan=1.0) < alpha))
    return pl.from_arrow(table.select(tables.LABEL_PERPLEXITY.names).to_arrow().cast(tables.LABEL_PERPLEXITY))


def check_label_units(label_units: pl.DataFrame, methods: Sequence[str], labels: Sequence[str],
                      widths: Mapping[str, int], source: str) -> None:
    """A clear error for a selection this check cannot switch off."""
    for column, known, what in (("method", methods, "the methods run (labels.ap)"),
                                ("label", labels, "the corpus's labels"), ("site", list(widths), "the sites")):
        unknown = sorted(set(label_units[column].unique().to_list()) - set(known))
        if unknown:
            raise NeuronmapError(f"{source}: {column} {unknown[0]!r} is not one of {what}: {', '.join(known)}")
    for site, width in widths.items():
        rows = label_units.filter(pl.col("site") == site)
        bad = rows.filter((pl.col("unit") < 0) | (pl.col("unit") >= width))
        if bad.height:
            raise NeuronmapError(f"{source}: unit {bad['unit'][0]} out of range for site {site} (width {width})")
    dup = label_units.select("method", "label", "site", "layer", "unit").is_duplicated()
    if dup.any():
        row = label_units.filter(dup).row(0, named=True)
        raise NeuronmapError(f"{source}: unit {row['site']} {row['layer']} {row['unit']} listed twice for "
                             f"{row['method']} {row['label']!r}")


def label_perplexity(model, contexts: pl.DataFrame, label_units: pl.DataFrame, methods: Sequence[str],
                     per_label: int, seeds: Sequence[int], pad_id: int = 0,
                     sources: tuple[str, str] = ("contexts", "label units")) -> pl.DataFrame:
    """tables.LABEL_PERPLEXITY_CONTEXTS for a run: every corpus label's selection off, and its
    random controls, on every label's held-out contexts."""
    labels = sorted(set(contexts["label"].unique().to_list()))
    sites = MlpSites(model)
    n_layers = sites.n_layers
    bad_layer = label_units.filter((pl.col("layer") < 0) | (pl.col("layer") >= n_layers))
    if bad_layer.height:
        raise NeuronmapError(f"{sources[1]}: layer {bad_layer['layer'][0]} out of range (the model has {n_layers})")
    widths = {site: sites.width(site) for site in sites.available}
    check_label_units(label_units, methods, labels, widths, sources[1])
    heldout = heldout_contexts(contexts, per_label)
    if heldout.height == 0:
        raise NeuronmapError(f"{sources[0]}: no held-out contexts of 2 tokens or more (corpus.heldout_fraction "
                             "holds documents out for this check: raise it, or add documents)")
    missing = sorted(set(labels) - set(heldout["label"].to_list()))
    if missing:
        log.warning("no held-out contexts for label(s) %s: their text is not scored", ", ".join(missing))
    return score(model, heldout, configurations(label_units, methods, labels, seeds, widths), pad_id)
