"""Exact AP at scale: neuronmap's shared-sort AP against sklearn, and the time for 10^9
responses x 12 relations streamed block by block (one unit block in memory at a time).

    .venv/bin/python bench/stats.py [--responses 1e9] [--prompts 1000] [--relations 12]

Prints a table, then one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import numpy as np
import torch
from sklearn.metrics import average_precision_score

from neuronmap.maths.expertise import _ap_units_major, unit_chunks


def labels(n_prompts: int, n_relations: int, rng: np.random.Generator):
    """Each prompt belongs to one relation; each relation counts its own prompts and 4x as many others."""
    relation_of = rng.integers(0, n_relations, n_prompts)
    positive = np.zeros((n_prompts, n_relations), bool)
    positive[np.arange(n_prompts), relation_of] = True
    included = positive.copy()
    for r in range(n_relations):
        others = np.flatnonzero(~positive[:, r])
        take = min(len(others), 4 * int(positive[:, r].sum()))
        included[rng.choice(others, take, replace=False), r] = True
    return torch.from_numpy(positive), torch.from_numpy(included)


def synthetic_block(n_prompts: int, units: int, positive: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """float16-rounded responses (as stored), a few units shifted on their relation's prompts."""
    values = rng.standard_normal((n_prompts, units), dtype=np.float32)
    values += positive[:, rng.integers(0, positive.shape[1], units)].numpy() * rng.uniform(0, 2, units)
    return torch.from_numpy(values.astype(np.float16).astype(np.float32))


def ours(block: torch.Tensor, positive, included) -> torch.Tensor:
    """As the stats stage runs it: units-major, chunked."""
    units_major = block.T.contiguous()
    return torch.cat([_ap_units_major(units_major[c], positive, included)
                      for c in unit_chunks(block.shape[0], block.shape[1], positive.shape[1])], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--responses", type=float, default=1e9)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--relations", type=int, default=12)
    parser.add_argument("--block-units", type=int, default=16384)
    parser.add_argument("--sklearn-units", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    positive, included = labels(args.prompts, args.relations, rng)

    # Agreement and per-unit speed on the same sample.
    sample = synthetic_block(args.prompts, args.sklearn_units, positive, rng)
    start = time.perf_counter()
    reference = np.array([[average_precision_score(positive[included[:, r], r].numpy(),
                                                   sample[included[:, r], u].numpy())
                           for u in range(sample.shape[1])] for r in range(args.relations)])
    sklearn_per_unit = (time.perf_counter() - start) / args.sklearn_units
    max_diff = float(np.abs(ours(sample, positive, included).numpy() - reference).max())

    block = synthetic_block(args.prompts, args.block_units, positive, rng)
    timings = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        ours(block, positive, included)
        timings.append(time.perf_counter() - start)
    ours_per_unit = statistics.median(timings) / args.block_units

    # The full stream: generate a block, score it for every relation, drop it.
    total_units = int(args.responses // args.prompts)
    start = time.perf_counter()
    done = 0
    while done < total_units:
        units = min(args.block_units, total_units - done)
        ours(synthetic_block(args.prompts, units, positive, rng), positive, included)
        done += units
    stream_seconds = time.perf_counter() - start
    generate_start = time.perf_counter()
    synthetic_block(args.prompts, args.block_units, positive, rng)
    generate_per_block = time.perf_counter() - generate_start
    scoring_seconds = stream_seconds - generate_per_block * (total_units / args.block_units)

    figures = {
        "prompts": args.prompts, "relations": args.relations, "responses": total_units * args.prompts,
        "threads": torch.get_num_threads(),
        "max_abs_diff_vs_sklearn": max_diff,
        "sklearn_seconds_per_unit_all_relations": sklearn_per_unit,
        "neuronmap_seconds_per_unit_all_relations": ours_per_unit,
        "speedup_per_unit": sklearn_per_unit / ours_per_unit,
        "stream_seconds_including_data_generation": stream_seconds,
        "stream_seconds_scoring_only": scoring_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(f"{'exact AP, ' + str(args.relations) + ' relations, ' + str(args.prompts) + ' prompts':<48}")
    print(f"  max |neuronmap - sklearn|            {max_diff:.2e}")
    print(f"  sklearn, per unit (all relations)     {sklearn_per_unit * 1e3:9.3f} ms")
    print(f"  neuronmap, per unit (all relations)   {ours_per_unit * 1e3:9.4f} ms  ({figures['speedup_per_unit']:.0f}x)")
    print(f"  {figures['responses']:.2e} responses streamed       {stream_seconds:9.1f} s "
          f"({scoring_seconds:.1f} s scoring, the rest generating data)")
    print(f"  peak RSS                              {figures['peak_rss_mb']:9.0f} MB")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
