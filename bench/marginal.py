"""The marginal ratio and the fixed cost of a stage against its floor, from runs at two sizes.

A job's time is a fixed part (allocating outputs, compiling, writing files, start-up of the
first batches) plus a part that grows with the tokens; a ratio of totals mixes the two, so that
a small bench over-states a per-token overhead and a large one hides a per-job one. Timed at
two sizes (tokens n1 < n2), each of the stage and of its floor (the bare forward passes of the
same batches) is a line t = fixed + n x per_token:
- marginal_ratio = (stage2 - stage1) / (floor2 - floor1): what one more token costs the stage,
  in units of what it costs the bare model;
- fixed_s: the stage's intercept, seconds per job at no token (the floor's own, floor_fixed_s,
  is the model's: batching a few tokens costs something even bare).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable


def interleaved(measure: Callable[[int], dict[str, float]], sizes: tuple[int, int],
                repeats: int) -> dict[int, dict[str, float]]:
    """Median seconds per (size, method) over `repeats` rounds; each round runs every size and,
    inside `measure(size)`, every method side by side, so that drifts in machine load hit them
    alike."""
    times: dict[int, dict[str, list[float]]] = {size: {} for size in sizes}
    for _ in range(repeats):
        for size in sizes:
            for method, seconds in measure(size).items():
                times[size].setdefault(method, []).append(seconds)
    return {size: {method: statistics.median(values) for method, values in methods.items()}
            for size, methods in times.items()}


def marginal(tokens: tuple[int, int], floor: tuple[float, float], stage: tuple[float, float]) -> dict[str, float]:
    """marginal_ratio, fixed_s and floor_fixed_s (see the module's docstring) from the seconds
    of the floor and of the stage at `tokens` (n1 < n2)."""
    (n1, n2), (f1, f2), (s1, s2) = tokens, floor, stage
    if n2 <= n1:
        raise ValueError("marginal: the second size must forward more tokens than the first")
    floor_per_token, stage_per_token = (f2 - f1) / (n2 - n1), (s2 - s1) / (n2 - n1)
    return {"marginal_ratio": round(stage_per_token / floor_per_token, 3) if floor_per_token > 0 else None,
            "fixed_s": round(s1 - stage_per_token * n1, 3), "floor_fixed_s": round(f1 - floor_per_token * n1, 3),
            "marginal_tokens": [n1, n2]}
