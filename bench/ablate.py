"""The batched ablation sweep against one configuration at a time, on the default model.

    .venv/bin/python bench/ablate.py [--prompts 48] [--repeats 3] [--group 12 4]
                                     [--units results/default/units/country_capital_city.parquet]

A relation's sweep as the workflow runs it: k in (100, 1000, 3000), the top-k units and three
random controls per k (same layer x site counts), 12 configurations, greedy generation of two
tokens on test prompts of the default relations, batches of 16 prompts per configuration.
(a) one configuration at a time: deactivation hooks installed for one configuration, all
prompts generated, hooks removed, next configuration (neuronmap 0.1's way); (b) the sweep:
each batch of 16 prompts tokenized once and run for a group of configurations in one forward
batch with per-row unit masks (`--group` configurations per batch). The modes alternate, each
measured `--repeats` times (medians: the machine is shared). Every configuration's predictions
must be identical between the modes. Prints a table, then one JSON line.

What to expect: the sweep saves model loads, hook installs and tokenization, and gives the
device bigger batches. Where a batch of 16 prompts underuses the device (a GPU) that is the
win. On a CPU the forward pass of 16 few-shot prompts is already compute-bound: the ceiling row
(the same generations with nothing deactivated, 16 rows per forward against 192) bounds what
any sharing of forward batches can give, and on 2 idle cores it is below 1 (0.94x; the sweep
measured 0.90x with 12 configurations per batch, 0.98x with 4). That is why
`ablation.configs_per_batch: auto` is 1 on the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from neuronmap.ablate.ablation import (Ablation, DeactivationValue, ablations_for, deactivation_for, evaluate,  # noqa: E402
                                evaluate_sweep)
from neuronmap.model.architectures import MlpSites  # noqa: E402
from neuronmap.model.batching import encode, length_sorted_batches  # noqa: E402
from neuronmap.ablate.settings import EvaluationSettings  # noqa: E402
from neuronmap.model.loading import load_model, prepare_model  # noqa: E402
from neuronmap.prepare.prompts import build_prompts
from neuronmap.prepare.settings import PromptSettings  # noqa: E402
from neuronmap.prepare.relations import find_relation_file, load_relation  # noqa: E402

RELATIONS = ["country_capital_city", "landmark_in_country", "star_constellation", "object_superclass",
             "word_first_letter", "verb_past_tense", "adj_comparative"]
TOP_K = [100, 1000, 3000]
SEEDS = [1, 2, 3]
SETTINGS = EvaluationSettings.defaults(max_new_tokens=2, batch_size=16)


def model_dir() -> Path:
    path = REPO / "results" / "bench" / "model"
    if not path.exists():
        prepare_model("builtin:smollm2-135m-instruct", path)
    return path


def test_prompts(n: int) -> pl.DataFrame:
    relations = [load_relation(find_relation_file(REPO / "data" / "relations", r), r) for r in RELATIONS]
    prompts = build_prompts(relations, PromptSettings.defaults(few_shot=3, max_facts=200, test_facts=50, seed=0))
    prompts = prompts.filter(pl.col("split") == "test").sort("prompt_id")
    return prompts.sample(min(n, prompts.height), seed=0).sort("prompt_id")


def selected_units(path: Path | None, widths: dict[str, int], n_layers: int) -> tuple[pl.DataFrame, str]:
    """A relation's selected units from a finished run, or, without one, 3000 units drawn with
    the spread selection gives on the default model (mostly gate/up/act, all layers)."""
    if path is not None and path.exists():
        return pl.read_parquet(path), str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
    rng = np.random.default_rng(0)
    pool = [(site, layer, unit) for site in ("gate", "up", "act", "down") for layer in range(n_layers)
            for unit in range(widths[site])]
    chosen = [pool[i] for i in rng.choice(len(pool), max(TOP_K), replace=False)]
    frame = pl.DataFrame({"site": [c[0] for c in chosen], "layer": [c[1] for c in chosen],
                          "unit": [c[2] for c in chosen], "rank": np.arange(1, len(chosen) + 1)},
                         schema_overrides={"layer": pl.Int32, "unit": pl.Int32, "rank": pl.Int64})
    return frame, "synthetic (random units of every site and layer)"


def one_at_a_time(model, tokenizer, prompts, plan: list[Ablation]) -> tuple[float, list[list[str]]]:
    start = time.perf_counter()
    generated = [evaluate(model, tokenizer, prompts, ablation, SETTINGS)["generated"].to_list() for ablation in plan]
    return time.perf_counter() - start, generated


def swept(model, tokenizer, prompts, plan: list[Ablation], group: int) -> tuple[float, list[list[str]]]:
    configs = [deactivation_for(a, DeactivationValue("zero")) for a in plan]
    start = time.perf_counter()
    frame = evaluate_sweep(model, tokenizer, prompts, plan, configs, SETTINGS, group)
    elapsed = time.perf_counter() - start
    n = prompts.height
    return elapsed, [frame["generated"][i * n:(i + 1) * n].to_list() for i in range(len(plan))]


def batching_ceiling(model, tokenizer, prompts, group: int) -> tuple[float, float]:
    """The sweep's forward work with nothing deactivated: every batch of 16 prompts generated
    `group` times on 16 rows (one configuration at a time) against once on 16 x `group` rows (a
    sweep). Their ratio bounds what sharing forward batches can save on this machine, whatever
    the masks cost."""
    texts = prompts["text"].to_list()
    lengths = [len(x) for x in tokenizer(texts)["input_ids"]]
    batches = [encode(tokenizer, [texts[i] for i in b], torch.device("cpu"), padding_side="left")
               for b in length_sorted_batches(lengths, SETTINGS.batch_size)]
    seconds = []
    with torch.inference_mode():
        for rows in (1, group):
            start = time.perf_counter()
            for encoded in batches:
                repeated = {key: value.repeat(rows, 1) for key, value in encoded.items()}
                for _ in range(group // rows):
                    model.generate(**repeated, max_new_tokens=SETTINGS.max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
            seconds.append(time.perf_counter() - start)
    return seconds[0], seconds[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=48, help="test prompts evaluated per configuration")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--group", type=int, nargs="+", default=[12, 4], help="configurations per forward batch")
    parser.add_argument("--units", type=Path,
                        default=REPO / "results" / "default" / "units" / "country_capital_city.parquet",
                        help="a relation's selected units from a finished run (else synthetic ones)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import logging
    logging.disable(logging.INFO)  # per-configuration accuracy lines would drown the table

    model, tokenizer = load_model(model_dir(), device="cpu", dtype="float32")
    sites = MlpSites(model)
    widths = {site: sites.width(site) for site in ("gate", "up", "act", "down")}
    units, source = selected_units(args.units, widths, sites.n_layers)
    relation = units["relation"][0] if "relation" in units.columns else "synthetic"
    plan = ablations_for(relation, units, TOP_K, SEEDS, widths)
    prompts = test_prompts(args.prompts)

    times: dict[str, list[float]] = {"one at a time": []} | {f"sweep, {g} per batch": [] for g in args.group}
    ceiling: dict[str, list[float]] = {"16 rows": [], f"{16 * max(args.group)} rows": []}
    reference, identical = None, True
    for _ in range(args.repeats):  # alternate the modes, so load on the machine hits both alike
        for name, seconds in zip(ceiling, batching_ceiling(model, tokenizer, prompts, max(args.group))):
            ceiling[name].append(seconds)
        elapsed, reference = one_at_a_time(model, tokenizer, prompts, plan)
        times["one at a time"].append(elapsed)
        for g in args.group:
            elapsed, generated = swept(model, tokenizer, prompts, plan, g)
            times[f"sweep, {g} per batch"].append(elapsed)
            identical &= generated == reference

    evaluations = len(plan) * prompts.height
    base = statistics.median(times["one at a time"])
    print(f"{len(plan)} configurations (k in {TOP_K}, top-k + {len(SEEDS)} random each; units: {source}) x "
          f"{prompts.height} test prompts, {SETTINGS.max_new_tokens} new tokens, {SETTINGS.batch_size} prompts "
          f"per configuration and batch, {args.threads} threads, {args.repeats} repeats")
    print(f"{'mode':<22} {'median s':>9} {'min s':>7} {'max s':>7} {'evals/s':>8} {'speedup':>8}")
    for mode, values in times.items():
        median = statistics.median(values)
        print(f"{mode:<22} {median:9.1f} {min(values):7.1f} {max(values):7.1f} {evaluations / median:8.1f} "
              f"{base / median:8.2f}")
    print(f"identical predictions in every configuration: {identical}")
    small, large = (statistics.median(v) for v in ceiling.values())
    print(f"ceiling, nothing deactivated, the same generations: {' vs '.join(ceiling)} per forward: "
          f"{small:.1f} s vs {large:.1f} s, {small / large:.2f}x (the most any sharing of forward batches can give)")
    best = min((k for k in times if k != "one at a time"), key=lambda k: statistics.median(times[k]))
    print(json.dumps({
        "bench": "ablate", "configurations": len(plan), "prompts": prompts.height, "units": source,
        "batch_size": SETTINGS.batch_size, "threads": args.threads, "repeats": args.repeats,
        "seconds_median": {mode: round(statistics.median(v), 2) for mode, v in times.items()},
        "speedup": {mode: round(base / statistics.median(v), 2) for mode, v in times.items()
                    if mode != "one at a time"},
        "best": best, "best_speedup": round(base / statistics.median(times[best]), 2),
        "identical_predictions": identical,
        "ceiling_seconds_median": {name: round(statistics.median(v), 2) for name, v in ceiling.items()},
        "ceiling_speedup": round(small / large, 2),
    }))


if __name__ == "__main__":
    main()
