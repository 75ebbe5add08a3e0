"""Per unit, the contexts its explainer is shown and the held-out ones its scorer judges, cut to a
window around each context's peak.

Thresholds are quantiles of the unit's peaks over all sampled contexts: a context activates the
unit when its peak reaches `active_quantile`, and is non-activating when its peak is at most
`inactive_quantile` (the contexts in between are left out, as ambiguous). Explainer: the explain
half's highest peaks, then activating contexts spread over the remaining ranks (the anchors'
"several quantiles"). Scorer: from the held-out half, activating contexts spread over their ranks
and as many non-activating ones (seeded).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Excerpt:
    context_id: int
    peak: float
    tokens: tuple[str, ...]     # the window's tokens, decoded one by one
    active: tuple[bool, ...]    # which reach the activating threshold

    def text(self, highlight: bool) -> str:
        """The window's text; with `highlight`, activating tokens marked <<token>> (a token's
        leading space stays outside the marks)."""
        parts = []
        for token, on in zip(self.tokens, self.active):
            if highlight and on and token.strip():
                lead = token[:len(token) - len(token.lstrip())]
                parts.append(f"{lead}<<{token.strip()}>>")
            else:
                parts.append(token)
        return "".join(parts).strip()


@dataclass(frozen=True)
class UnitExamples:
    shown: list[Excerpt]              # to the explainer, strongest first
    activating: list[Excerpt]         # held out, for the scorer
    non_activating: list[Excerpt]
    threshold: float


def spread(ranked: list[int], n: int) -> list[int]:
    """`n` items of `ranked` at evenly spaced ranks (its first and last included)."""
    if n <= 0 or not ranked:
        return []
    if n >= len(ranked):
        return list(ranked)
    return [ranked[i] for i in np.unique(np.linspace(0, len(ranked) - 1, n).round().astype(int))]


def excerpt(values: np.ndarray, position: int, token_ids, context_id: int, threshold: float, window: int,
            decode) -> Excerpt:
    """One context's window around `position`: `values` the unit's per-token values there."""
    n = len(token_ids)
    start, stop = max(0, position - window), min(n, position + window + 1)
    tokens = tuple(decode(int(t)) for t in token_ids[start:stop])
    span = values[start:stop]
    active = tuple(bool(v >= threshold) for v in np.nan_to_num(span, nan=-np.inf))
    return Excerpt(context_id, float(values[position]), tokens, active)


def unit_examples(values: np.ndarray, peaks: np.ndarray, positions: np.ndarray, token_ids: list, context_ids,
                  scoring: np.ndarray, settings, decode, rng: np.random.Generator) -> UnitExamples:
    """One unit's excerpts. `values` [contexts, tokens], `peaks`/`positions` [contexts],
    `scoring` [contexts] bool (the held-out half)."""
    finite = np.isfinite(peaks)
    high = float(np.quantile(peaks[finite], settings.active_quantile))
    low = float(np.quantile(peaks[finite], settings.inactive_quantile))
    order = [int(i) for i in np.lexsort((np.asarray(context_ids), -peaks)) if finite[i]]  # highest first

    def make(i):
        return excerpt(values[i], int(positions[i]), token_ids[i], int(context_ids[i]), high, settings.window, decode)

    explain_rank = [i for i in order if not scoring[i]]
    top = explain_rank[:settings.top_examples]
    rest = [i for i in explain_rank[settings.top_examples:] if peaks[i] >= high]
    shown = top + spread(rest, settings.quantile_examples)
    held_active = [i for i in order if scoring[i] and peaks[i] >= high]
    held_quiet = [i for i in order if scoring[i] and peaks[i] <= low and peaks[i] < high]
    n = settings.score_contexts
    quiet = sorted(rng.choice(held_quiet, min(n, len(held_quiet)), replace=False).tolist()) if held_quiet else []
    return UnitExamples([make(i) for i in shown], [make(i) for i in spread(held_active, n)],
                        [make(i) for i in quiet], high)
