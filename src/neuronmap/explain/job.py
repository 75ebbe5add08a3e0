"""The two jobs of a shard: explain (activations, excerpts, the baseline's and the text model's
explanations) and score (each unit's explanations judged on its held-out excerpts, and another
unit's as the control). Each journals every finished unit (journal.py)."""

from __future__ import annotations

import logging
import time

import numpy as np
import polars as pl

from ..io import tables
from .activations import sample_contexts, unit_values, units_per_pass
from .backends import TextModel
from .examples import Excerpt, unit_examples
from .explainers import baseline_explanation, clean_explanation, explain_conversation
from .journal import Journal, unit_key
from .scoring import Scorer, derangement, score

log = logging.getLogger("neuronmap")

KEY = ["site", "layer", "unit"]


def excerpt_record(ex: Excerpt, activating: bool) -> dict:
    return {"context_id": ex.context_id, "activating": activating, "peak": ex.peak, "tokens": list(ex.tokens)}


def explain_units(units: pl.DataFrame, contexts: pl.DataFrame, model, tokenizer, explainer: TextModel | None,
                  template, settings, journal: Journal, progress: str = "explain") -> tuple[pl.DataFrame, pl.DataFrame]:
    """EXPLANATIONS and EXPLAIN_SETS rows of `units`; units already in `journal` are taken from it,
    the others computed and journalled one by one."""
    keys = [unit_key(*row) for row in units.select(KEY).iter_rows()]
    pending = units.filter(pl.Series([k not in journal.done for k in keys]))
    if pending.height:
        sample = sample_contexts(contexts, settings.contexts, settings.seed)
        token_ids = sample["token_ids"].to_list()
        scoring = sample["scoring"].to_numpy()
        context_ids = sample["context_id"].to_numpy()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        step = units_per_pass(sample.height, int(sample["n_tokens"].max()))
        decode = _decoder(tokenizer)
        log.info("%s: %d units to explain (%d done before), %d contexts (%d held out for scoring)", progress,
                 pending.height, units.height - pending.height, sample.height, int(scoring.sum()))
        started = time.perf_counter()
        for start in range(0, pending.height, step):
            part = pending.slice(start, step)
            found = unit_values(model, sample, part, settings.batch_size, pad, tokenizer.all_special_ids, progress)
            for first in range(0, part.height, settings.batch_size):
                rows = list(range(first, min(first + settings.batch_size, part.height)))
                examples = [unit_examples(found.values[:, :, j], found.peaks[:, j], found.positions[:, j], token_ids,
                                          context_ids, scoring, settings, decode,
                                          np.random.default_rng([settings.seed, *_unit_seed(part, j)]))
                            for j in rows]
                answers = _explain(explainer, template, [e.shown for e in examples], settings.max_tokens)
                for j, ex, answer in zip(rows, examples, answers):
                    key = unit_key(*part.select(KEY).row(j))
                    explanations = [{"explainer": "baseline", "explanation": baseline_explanation(ex.shown),
                                     "prompt_tokens": 0, "completion_tokens": 0}]
                    if answer is not None:
                        explanations.append({"explainer": "model", "explanation": clean_explanation(answer.text),
                                             "prompt_tokens": answer.prompt_tokens,
                                             "completion_tokens": answer.completion_tokens})
                    sets = [excerpt_record(e, True) for e in ex.activating] + \
                           [excerpt_record(e, False) for e in ex.non_activating]
                    journal.add(key, {"explanations": explanations, "sets": sets})
                log.info("%s: %d/%d units explained (%.0f s)", progress, len(journal.done), units.height,
                         time.perf_counter() - started)
    return _tables(units, keys, journal)


def _unit_seed(part: pl.DataFrame, j: int) -> tuple[int, int, int]:
    site, layer, unit = part.select(KEY).row(j)
    return sum(site.encode()), layer, unit


def _decoder(tokenizer):
    cache: dict[int, str] = {}

    def decode(token_id: int) -> str:
        if token_id not in cache:
            cache[token_id] = tokenizer.decode([token_id])
        return cache[token_id]
    return decode


def _explain(explainer: TextModel | None, template, shown: list[list[Excerpt]], max_tokens: int) -> list:
    if explainer is None:
        return [None] * len(shown)
    return explainer.complete([explain_conversation(template, s) for s in shown], max_tokens)


def frame(rows: list[dict], schema) -> pl.DataFrame:
    import pyarrow as pa
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=schema))


def _tables(units: pl.DataFrame, keys: list[str], journal: Journal) -> tuple[pl.DataFrame, pl.DataFrame]:
    explanations, sets = [], []
    for (site, layer, unit), key in zip(units.select(KEY).iter_rows(), keys):
        record = journal.done[key]
        explanations += [{"site": site, "layer": layer, "unit": unit, **e} for e in record["explanations"]]
        sets += [{"site": site, "layer": layer, "unit": unit, **s} for s in record["sets"]]
    return (frame(explanations, tables.EXPLANATIONS).sort([*KEY, "explainer"]),
            frame(sets, tables.EXPLAIN_SETS))


def controls(units: pl.DataFrame, explanations: pl.DataFrame, seed: int) -> dict[str, tuple[str, str]]:
    """Per unit key, the control: (explanation, whose) of another unit, by a seeded derangement
    of all selected units (so it does not depend on the shards). The model's explanations, or the
    baseline's where no text model explained."""
    kind = "model" if (explanations["explainer"] == "model").any() else "baseline"
    text = {unit_key(s, l, u): e for s, l, u, e in
            explanations.filter(pl.col("explainer") == kind).select(*KEY, "explanation").iter_rows()}
    keys = [unit_key(*row) for row in units.select(KEY).iter_rows()]
    perm = derangement(len(keys), seed)
    return {keys[i]: (text[keys[perm[i]]], keys[perm[i]]) for i in range(len(keys)) if perm[i] != i}


def score_units(units: pl.DataFrame, explanations: pl.DataFrame, sets: pl.DataFrame, control: dict, scorer: Scorer,
                journal: Journal, progress: str = "score") -> pl.DataFrame:
    """EXPLAIN_SCORES rows of `units`: each explanation of the unit and its control, judged on the
    unit's held-out excerpts."""
    started = time.perf_counter()
    by_unit = {unit_key(*k): g for k, g in sets.group_by(KEY)}
    rows = []
    for n, (site, layer, unit) in enumerate(units.select(KEY).iter_rows(), 1):
        key = unit_key(site, layer, unit)
        if key not in journal.done:
            own = explanations.filter((pl.col("site") == site) & (pl.col("layer") == layer) & (pl.col("unit") == unit))
            candidates = [(e, t, key) for e, t in own.select("explainer", "explanation").iter_rows()]
            if key in control:
                candidates.append(("shuffled", *control[key]))
            group = by_unit.get(key)
            excerpts = [] if group is None else [
                (Excerpt(c, p, tuple(t), tuple(False for _ in t)), a)
                for c, p, t, a in group.sort("context_id").select("context_id", "peak", "tokens", "activating").iter_rows()]
            active = [e for e, a in excerpts if a]
            quiet = [e for e, a in excerpts if not a]
            scored = []
            for explainer, text, whose in candidates:
                d = score(scorer, text, active, quiet)
                scored.append({"explainer": explainer, "explanation_of": whose, "scorer": scorer.name,
                               "contexts": d.contexts, "activating": d.activating,
                               "true_positive_rate": d.true_positive_rate, "true_negative_rate": d.true_negative_rate,
                               "balanced_accuracy": d.balanced_accuracy, "auc": d.auc})
            journal.add(key, {"scores": scored})
            log.info("%s: %d/%d units scored (%.0f s)", progress, n, units.height, time.perf_counter() - started)
        rows += [{"site": site, "layer": layer, "unit": unit, **s} for s in journal.done[key]["scores"]]
    return frame(rows, tables.EXPLAIN_SCORES).sort([*KEY, "explainer"])
