"""Extraction cost against the forward-pass floor, on the same batches of the default model.

    .venv/bin/python bench/extract.py [--prompts 128] [--repeats 3] [--rss-prompts 64] [--others]

In two regimes, whole prompts (no cache) and the workflow's (cached prefixes of demonstrations,
short query segments after them), at two sizes (--prompts and half of it), side by side and
median of --repeats: (a) the floor, a bare torch.inference_mode forward of the same batches (the
last position's logits only; in the query regime model/cost.py's `cached_queries`, what the
calibration job forwards); (b) neuronmap's extraction: all four sites, the default pooling
(mean), streaming statistics, top activations and the Parquet writes, as the workflow runs it,
and beside it the same with three poolings (mean, max, last: three times the responses). Per
regime: the ratio at the larger size, the marginal ratio (per token, fixed cost removed) and
the fixed cost per job (bench/marginal.py). With --others, (c) TransformerLens and (d) nnsight
doing the same reductions on whole prompts, when installed (pip install -e '.[bench]'). Then
peak RSS of extraction at 1x and 8x the prompts (separate processes). Prints a table, then one
JSON line.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from marginal import interleaved, marginal  # noqa: E402  (bench/ is this script's folder)
from neuronmap.model.batching import encode, length_sorted_batches  # noqa: E402
from neuronmap.model.cost import cached_queries  # noqa: E402
from neuronmap.extract.engine import Extraction, ExtractionOutputs
from neuronmap.extract.settings import ExtractionSettings  # noqa: E402
from neuronmap.model.host_memory import reuse_freed_buffers  # noqa: E402
from neuronmap.model.loading import load_model, prepare_model  # noqa: E402
from neuronmap.prepare.prompts import build_prompts
from neuronmap.prepare.settings import PromptSettings  # noqa: E402
from neuronmap.prepare.relations import find_relation_file, load_relation  # noqa: E402

RELATIONS = ["country_capital_city", "landmark_in_country", "star_constellation", "object_superclass",
             "word_first_letter", "verb_past_tense", "adj_comparative"]
# Fused statistics: on the CPU the C kernel, the path fused_statistics: auto takes there for any shard.
# The workflow's default poolings (mean), and side by side three: the reductions TransformerLens
# and nnsight are timed doing (--others), and the figures of earlier sessions (docs/performance.md).
SETTINGS = ExtractionSettings.defaults(batch_size=64, batch_tokens=2048, fused_statistics=True)
THREE_POOLINGS = ("mean", "max", "last")
METHODS = {"neuronmap": SETTINGS, "three_poolings": dataclasses.replace(SETTINGS, poolings=THREE_POOLINGS)}
# whole: whole prompts, no cache (pool_span: prompt); query: the workflow's default (pool_span:
# query), each distinct prefix of demonstrations forwarded once and ~11-token query segments after
# its cached keys and values, where a forward's fixed costs weigh far more per token.
REGIMES = ("whole", "query")


def model_dir() -> Path:
    path = REPO / "results" / "bench" / "model"
    if not path.exists():
        prepare_model("builtin:smollm2-135m-instruct", path)
    return path


def identification_prompts(n: int) -> pl.DataFrame:
    relations = [load_relation(find_relation_file(REPO / "data" / "relations", r), r) for r in RELATIONS]
    prompts = build_prompts(relations, PromptSettings.defaults(few_shot=3, test_facts=50, seed=0))
    prompts = prompts.filter(pl.col("split") == "identification").sort("prompt_id")
    if prompts.height < n:
        raise SystemExit(f"only {prompts.height} identification prompts available, asked for {n}")
    return prompts.sample(n, seed=0)


def batches_of(tokenizer, texts):
    lengths = [len(x) for x in tokenizer(texts)["input_ids"]]
    return [encode(tokenizer, [texts[i] for i in b], torch.device("cpu"), "right")
            for b in length_sorted_batches(lengths, SETTINGS.batch_size, SETTINGS.batch_tokens)]


def time_floor(model, batches, logits: bool) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            model(**batch, use_cache=False) if logits else model(**batch, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - start


def time_neuronmap(model, tokenizer, prompts, workdir: Path, prefixes=None, settings=SETTINGS) -> float:
    outputs = ExtractionOutputs(workdir / "r.parquet", workdir / "s.parquet", workdir / "t.parquet")
    start = time.perf_counter()
    Extraction(model, tokenizer, prompts["prompt_id"].to_list(), prompts["text"].to_list(), settings,
               prefixes).run(outputs)
    return time.perf_counter() - start


def reduce_like_neuronmap(acts: dict, mask: torch.Tensor) -> None:
    """The reductions neuronmap does inside its hooks, applied to activations saved by another tool."""
    from neuronmap.model.hooks import TokenMask, observe
    token_mask = TokenMask.from_attention_mask(mask)
    for x in acts.values():
        observe(x, token_mask, THREE_POOLINGS, SETTINGS.active_threshold, fused=True)


def time_nnsight(model, tokenizer, batches):
    try:
        from nnsight import NNsight
    except ImportError:
        return None
    wrapped = NNsight(model)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            saved = {}
            with wrapped.trace(**batch, use_cache=False, logits_to_keep=1):
                for layer, block in enumerate(wrapped.model.layers):
                    saved[("gate", layer)] = block.mlp.gate_proj.output.save()
                    saved[("up", layer)] = block.mlp.up_proj.output.save()
                    saved[("act", layer)] = block.mlp.down_proj.input.save()
                    saved[("down", layer)] = block.mlp.down_proj.output.save()
            reduce_like_neuronmap({k: getattr(v, "value", v) for k, v in saved.items()}, batch["attention_mask"])
    return time.perf_counter() - start


def time_transformer_lens(model, tokenizer, batches):
    try:
        from transformer_lens import HookedTransformer
    except ImportError:
        return None
    try:
        hooked = HookedTransformer.from_pretrained_no_processing("meta-llama/Llama-2-7b-hf", hf_model=model,
                                                                 tokenizer=tokenizer, device="cpu")
    except Exception as error:  # TransformerLens only knows its own list of model names
        print(f"TransformerLens could not wrap the default model: {error.__class__.__name__}: {error}",
              file=sys.stderr)
        return None
    start = time.perf_counter()
    names = lambda name: name.endswith(("mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post", "hook_mlp_out"))
    with torch.inference_mode():
        for batch in batches:
            _, cache = hooked.run_with_cache(batch["input_ids"], attention_mask=batch["attention_mask"],
                                             names_filter=names)
            reduce_like_neuronmap(dict(cache.items()), batch["attention_mask"])
    return time.perf_counter() - start


def rss_child(n: int) -> None:
    model, tokenizer = load_model(model_dir(), "cpu", "float32")
    prompts = identification_prompts(n)
    with tempfile.TemporaryDirectory() as tmp:
        time_neuronmap(model, tokenizer, prompts, Path(tmp))
    print(high_water_mark_mb())


def high_water_mark_mb() -> float:
    """This process's peak RSS. Not ru_maxrss: that survives exec, so a child started by this
    (large) parent would report the parent's size."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def peak_rss(n: int, repeats: int) -> float:
    """Median over `repeats` fresh processes: glibc's and oneDNN's caches make one run noisy."""
    def one() -> float:
        result = subprocess.run([sys.executable, __file__, "--rss-child", str(n)], capture_output=True, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
        return float(result.stdout.strip().splitlines()[-1])
    return statistics.median(one() for _ in range(repeats))


def time_bare_queries(model, tokenizer, prompts) -> tuple[float, int]:
    """The workflow regime's floor: each distinct prefix once, then the batches of queries after
    their cached prefixes, bare (the calibration job's `extract` regime, model/cost.py)."""
    with torch.inference_mode():
        count = cached_queries(model, tokenizer, prompts["prefix"].to_list(), prompts["text"].to_list(),
                               SETTINGS.batch_size, SETTINGS.batch_tokens)
    return count.seconds, count.tokens


def measure_regime(model, tokenizer, prompts, regime: str, workdir: Path):
    """A function of a size that times, side by side, the floor and neuronmap on the first
    `size` prompts in one regime: whole prompts (no cache) or the workflow's cached prefixes and
    query segments (pool_span: query). Remembers the floor's tokens per size."""
    tokens: dict[int, int] = {}

    def measure(size: int) -> dict[str, float]:
        chosen = prompts.head(size)
        prefixes = chosen["prefix"].to_list() if regime == "query" else None
        if regime == "query":
            floor, tokens[size] = time_bare_queries(model, tokenizer, chosen)
        else:
            batches = batches_of(tokenizer, chosen["text"].to_list())
            floor = time_floor(model, batches, logits=False)
            tokens[size] = sum(int(b["attention_mask"].numel()) for b in batches)
        return {"floor": floor, **{method: time_neuronmap(model, tokenizer, chosen, workdir, prefixes, settings)
                                   for method, settings in METHODS.items()}}
    return measure, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=128, help="prompts of the larger size (the smaller: half)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss-prompts", type=int, default=64, help="0: no peak RSS measurement")
    parser.add_argument("--others", action="store_true", help="also time nnsight and TransformerLens (whole prompts)")
    parser.add_argument("--rss-child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    reuse_freed_buffers()  # as `neuronmap extract` does before loading the model
    if args.rss_child:
        return rss_child(args.rss_child)

    model, tokenizer = load_model(model_dir(), "cpu", "float32")
    prompts = identification_prompts(args.prompts)
    sizes = (args.prompts // 2, args.prompts)
    figures = {"bench": "extract", "prompts": list(sizes), "repeats": args.repeats,
               "threads": torch.get_num_threads(), "regimes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for regime in REGIMES:
            measure, tokens = measure_regime(model, tokenizer, prompts, regime, Path(tmp))
            measure(sizes[0])  # warm-up
            medians = interleaved(measure, sizes, args.repeats)
            large = medians[sizes[1]]
            ends = (tokens[sizes[0]], tokens[sizes[1]]), (medians[sizes[0]]["floor"], large["floor"])
            row = {"tokens": tokens[sizes[1]], "seconds": large}
            for method in METHODS:
                suffix = "" if method == "neuronmap" else f"_{method}"
                row[f"ratio{suffix}"] = round(large[method] / large["floor"], 3)
                row.update({f"{key}{suffix}": value for key, value in
                            marginal(*ends, (medians[sizes[0]][method], large[method])).items()
                            if not suffix or key in ("marginal_ratio", "fixed_s")})
            figures["regimes"][regime] = row
        if args.others:
            batches = batches_of(tokenizer, prompts["text"].to_list())
            # The other tools wrap the modules they see (nnsight replaces every module's forward):
            # they get their own copy of the model.
            other = copy.deepcopy(model)
            others = {}
            for name, run in (("nnsight", time_nnsight), ("transformer_lens", time_transformer_lens)):
                seconds = [run(other, tokenizer, batches) for _ in range(args.repeats)]
                if seconds[0] is not None:
                    others[name] = statistics.median(seconds)
            whole = figures["regimes"]["whole"]
            whole["others_ratio"] = {name: round(t / whole["seconds"]["floor"], 3) for name, t in others.items()}
    if args.rss_prompts:
        rss_1x, rss_8x = peak_rss(args.rss_prompts, args.repeats), peak_rss(8 * args.rss_prompts, args.repeats)
        figures.update({"peak_rss_mb": {f"{args.rss_prompts}_prompts": rss_1x,
                                        f"{8 * args.rss_prompts}_prompts": rss_8x},
                        "rss_growth_8x": rss_8x / rss_1x - 1})
    print(f"prompts {sizes[0]} and {sizes[1]}, median of {args.repeats}, {figures['threads']} threads; "
          f"neuronmap: poolings {','.join(SETTINGS.poolings)} (the default); three_poolings: {','.join(THREE_POOLINGS)}")
    print(f"{'regime':<8}{'method':<16}{'tokens':>8}{'floor s':>9}{'seconds':>9}{'ratio':>7}{'marginal':>10}"
          f"{'fixed s':>9}")
    for regime, row in figures["regimes"].items():
        for method in METHODS:
            suffix = "" if method == "neuronmap" else f"_{method}"
            print(f"{regime:<8}{method:<16}{row['tokens']:>8}{row['seconds']['floor']:>9.2f}"
                  f"{row['seconds'][method]:>9.2f}{row['ratio' + suffix]:>7.3f}"
                  f"{row['marginal_ratio' + suffix] or float('nan'):>10.3f}{row['fixed_s' + suffix]:>9.2f}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
