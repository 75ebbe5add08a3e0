"""The corpus records pass against a bare forward pass over the same contexts, on the default model.

    .venv/bin/python bench/corpus.py [--contexts 128] [--repeats 3] [--rss-contexts 48]

(a) the floor: a plain torch.inference_mode forward of the same fixed-shape batches (no hooks,
the last position's logits); (b) neuronmap's records pass as `neuronmap corpus-records` runs it:
all four sites of every layer, moments, histograms, top and bottom contexts, the partial Parquet
files. At --contexts and twice as many, side by side, median of --repeats: records_ratio at
--contexts, marginal_records_ratio (per token, fixed cost removed) and fixed_s (seconds per job;
bench/marginal.py). Then, each in a fresh process: peak RSS of the records
pass at N and at >= 10x N tokens; the merged records of 1, 2 and 5 shards compared; a records job
killed (SIGKILL) after its first checkpoint and run again, compared with an uninterrupted one.
Prints a table, then one JSON line.

On a GPU, `--device cuda --random-config bench/configs/llama-3.1-8b.json --dtype bfloat16` times the
same two passes on a model of that shape with random weights over random tokens (no download:
the cost of both passes depends on the shapes, not on the weights); the RSS, shard and resume
checks run on the CPU only, and not with --random-config or --timing-only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from neuronmap.corpus.contexts import cut_contexts  # noqa: E402
from neuronmap.corpus.engine import RecordsOutputs, RecordsPass  # noqa: E402
from neuronmap.corpus.merge import merge_records  # noqa: E402
from neuronmap.corpus.reading import read_documents  # noqa: E402
from neuronmap.corpus.settings import MergeSettings, RecordsSettings  # noqa: E402
from neuronmap.model.host_memory import reuse_freed_buffers  # noqa: E402
from neuronmap.model.loading import load_model  # noqa: E402

from extract import high_water_mark_mb, model_dir  # noqa: E402  (bench/ is this script's folder)
from marginal import interleaved, marginal  # noqa: E402

CORPUS = REPO / "data" / "corpus" / "fortunes"
CONTEXT_TOKENS = 64
SETTINGS = RecordsSettings.defaults(batch_size=32, checkpoint_minutes=60)


def corpus_contexts(tokenizer, n: int, shards: int = 1) -> pl.DataFrame:
    """The first n contexts of the shipped corpus, its languages interleaved (documents by hash)."""
    documents = sorted(read_documents(CORPUS), key=lambda d: d.shard(2 ** 61 - 1))
    contexts = cut_contexts(tokenizer, documents, CONTEXT_TOKENS, shards, 0.0)
    if contexts.height < n:
        raise SystemExit(f"the corpus has {contexts.height} contexts of {CONTEXT_TOKENS} tokens, asked for {n}")
    return contexts.head(n)


def random_contexts(n: int, vocabulary: int) -> pl.DataFrame:
    ids = np.random.default_rng(0).integers(100, vocabulary, (n, CONTEXT_TOKENS), dtype=np.int32)
    return pl.DataFrame({"context_id": np.arange(n), "document": [f"random:{i}" for i in range(n)],
                         "label": [""] * n, "part": np.zeros(n, np.int32), "shard": np.zeros(n, np.int32),
                         "n_tokens": np.full(n, CONTEXT_TOKENS, np.int32), "token_ids": list(ids)})


def random_model(config_path: str, device: str, dtype: str):
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(config_path)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    return model.eval(), config.vocab_size


def synchronize(model) -> None:
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


def time_floor(model, contexts: pl.DataFrame, pad: int) -> float:
    rows = contexts["token_ids"].to_list()
    device = next(model.parameters()).device
    synchronize(model)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(rows), SETTINGS.batch_size):
            batch = rows[i:i + SETTINGS.batch_size]
            ids = torch.full((len(batch), CONTEXT_TOKENS), pad)
            for j, row in enumerate(batch):
                ids[j, :len(row)] = torch.tensor(row)
            mask = (torch.arange(CONTEXT_TOKENS)[None] < torch.tensor([len(r) for r in batch])[:, None]).long()
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, logits_to_keep=1)
    synchronize(model)
    return time.perf_counter() - start


def time_records(model, contexts: pl.DataFrame, pad: int, workdir: Path, settings=SETTINGS) -> float:
    outputs = RecordsOutputs(workdir / "u.parquet", workdir / "e.parquet", workdir / "c.pt")
    synchronize(model)
    start = time.perf_counter()
    RecordsPass(model, contexts, settings, CONTEXT_TOKENS, pad).run(outputs)
    synchronize(model)
    return time.perf_counter() - start


def rss_child(n: int) -> None:
    reuse_freed_buffers()  # as `neuronmap corpus-records` does before loading the model
    model, tokenizer = load_model(model_dir(), "cpu", "float32")
    contexts = corpus_contexts(tokenizer, n)
    with tempfile.TemporaryDirectory() as tmp:
        time_records(model, contexts, tokenizer.pad_token_id, Path(tmp))
    print(json.dumps({"rss_mb": high_water_mark_mb(), "tokens": int(contexts["n_tokens"].sum())}))


def child(*args) -> dict:
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(result.stdout.strip().splitlines()[-1])


def merged_records(model, tokenizer, contexts, shards: int, workdir: Path) -> dict[str, pl.DataFrame]:
    contexts = contexts.with_columns(shard=pl.col("context_id") % shards)
    settings = RecordsSettings.defaults(batch_size=8, checkpoint_minutes=60)
    units, extremes = [], []
    for shard in range(shards):
        outputs = RecordsOutputs(workdir / f"{shards}-{shard}.u.parquet", workdir / f"{shards}-{shard}.e.parquet",
                                 workdir / f"{shards}-{shard}.pt")
        RecordsPass(model, contexts.filter(pl.col("shard") == shard), settings, CONTEXT_TOKENS,
                    tokenizer.pad_token_id).run(outputs)
        units.append(outputs.units)
        extremes.append(outputs.extremes)
    paths = {name: workdir / f"{shards}.{name}.parquet" for name in ("units", "examples", "peak_tokens")}
    merge_records(units, extremes, contexts, tokenizer, MergeSettings.defaults(), paths)
    return {name: pl.read_parquet(path) for name, path in paths.items()}


def same_records(a: dict, b: dict) -> bool:
    """Integers, extremes, histograms and chosen contexts identical; moments to float64 rounding."""
    floats = ["mean", "var", "skewness", "kurtosis"]
    exact = [c for c in a["units"].columns if c not in floats]
    return (a["examples"].equals(b["examples"]) and a["peak_tokens"].equals(b["peak_tokens"])
            and a["units"].select(exact).equals(b["units"].select(exact))
            and all(np.allclose(a["units"][c], b["units"][c], rtol=1e-9, atol=1e-12, equal_nan=True) for c in floats))


def shards_identical(model, tokenizer, n: int) -> bool:
    contexts = corpus_contexts(tokenizer, n)
    with tempfile.TemporaryDirectory() as tmp:
        records = {shards: merged_records(model, tokenizer, contexts, shards, Path(tmp)) for shards in (1, 2, 5)}
    return same_records(records[1], records[2]) and same_records(records[1], records[5])


def resume_identical(tokenizer, n: int) -> bool:
    """`neuronmap corpus-records` killed by SIGKILL after its first checkpoint, then run again."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus_contexts(tokenizer, n).write_parquet(tmp / "contexts.parquet")
        settings = RecordsSettings.defaults(batch_size=4, checkpoint_minutes=0).to_json()

        def command(tag):
            return [sys.executable, "-m", "neuronmap", "corpus-records", "--settings", settings,
                    "--model-dir", str(model_dir()), "--contexts", str(tmp / "contexts.parquet"), "--shard", "0",
                    "--out-units", str(tmp / f"{tag}.u.parquet"), "--out-extremes", str(tmp / f"{tag}.e.parquet"),
                    "--out-cost", str(tmp / f"{tag}.cost.parquet"), "--checkpoint", str(tmp / f"{tag}.pt")]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
        subprocess.run(command("whole"), check=True, env=env, capture_output=True)
        job = subprocess.Popen(command("killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not (tmp / "killed.pt").exists() and job.poll() is None:
            time.sleep(0.05)
        time.sleep(1.0)  # into the next batches, past the first checkpoint
        job.send_signal(signal.SIGKILL)
        job.wait()
        if (tmp / "killed.u.parquet").exists():
            raise SystemExit("the job finished before it was killed: give it more contexts")
        subprocess.run(command("killed"), check=True, env=env, capture_output=True)
        return all(pl.read_parquet(tmp / f"whole.{k}.parquet").equals(pl.read_parquet(tmp / f"killed.{k}.parquet"))
                   for k in ("u", "e"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss-contexts", type=int, default=48)
    parser.add_argument("--check-contexts", type=int, default=40, help="contexts of the shard and resume checks")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--random-config", help="time a model of this config.json's shape, random weights")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--timing-only", action="store_true", help="on the CPU too, no RSS, shard or resume check")
    parser.add_argument("--rss-child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        return rss_child(args.rss_child)
    reuse_freed_buffers()  # as `neuronmap corpus-records` does; the floor runs under it too

    if args.random_config:
        model, vocabulary = random_model(args.random_config, args.device, args.dtype)
        contexts, tokenizer, pad = random_contexts(2 * args.contexts, vocabulary), None, 0
    else:
        model, tokenizer = load_model(model_dir(), args.device, args.dtype)
        contexts, pad = corpus_contexts(tokenizer, 2 * args.contexts), tokenizer.pad_token_id
    sizes = (args.contexts, 2 * args.contexts)
    size_tokens = tuple(int(contexts.head(n)["n_tokens"].sum()) for n in sizes)
    tokens = size_tokens[0]
    with tempfile.TemporaryDirectory() as tmp:
        def measure(size: int) -> dict[str, float]:
            chosen = contexts.head(size)
            times = {"floor": time_floor(model, chosen, pad), "records": time_records(model, chosen, pad, Path(tmp))}
            print(f"{size} contexts: floor {times['floor']:.3f} s, records {times['records']:.3f} s", file=sys.stderr)
            return times
        time_records(model, contexts.head(SETTINGS.batch_size), pad, Path(tmp))  # warm-up (and the kernel's build)
        # A job's fixed costs (allocating the records, writing them) apart from the per-token
        # cost: the same passes over twice the contexts, side by side (bench/marginal.py).
        at = interleaved(measure, sizes, args.repeats)
    medians = at[sizes[0]]
    device = str(next(model.parameters()).device)
    timing = {"bench": "corpus", "device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
              "model": args.random_config or "smollm2-135m", "dtype": args.dtype, "contexts": args.contexts,
              "tokens": tokens, "repeats": args.repeats, "threads": torch.get_num_threads(), "seconds": medians,
              "records_ratio": medians["records"] / medians["floor"],
              "tokens_per_s": tokens / medians["records"], "floor_tokens_per_s": tokens / medians["floor"],
              "seconds_at_twice_the_tokens": at[sizes[1]],
              **{("marginal_records_ratio" if key == "marginal_ratio" else key): value for key, value in
                 marginal(size_tokens, (at[sizes[0]]["floor"], at[sizes[1]]["floor"]),
                          (at[sizes[0]]["records"], at[sizes[1]]["records"])).items()},
              "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if device.startswith("cuda") else None}
    if device != "cpu" or args.random_config or args.timing_only:
        print(f"{device}: floor {medians['floor']:.3f} s, records {medians['records']:.3f} s over {tokens} tokens; "
              f"marginal {timing['marginal_records_ratio']}, fixed {timing['fixed_s']} s per job")
        print(json.dumps(timing))
        return
    small = child("--rss-child", str(args.rss_contexts))
    large = child("--rss-child", str(10 * args.rss_contexts + SETTINGS.batch_size))
    figures = {
        **timing,
        "rss_mb_small": small["rss_mb"], "rss_mb_large": large["rss_mb"],
        "rss_tokens_small": small["tokens"], "rss_tokens_large": large["tokens"],
        "rss_growth": large["rss_mb"] / small["rss_mb"] - 1,
        "shards_identical": shards_identical(model, tokenizer, args.check_contexts),
        "resume_identical": resume_identical(tokenizer, args.check_contexts),
    }
    print(f"{args.contexts} contexts, {tokens} tokens, median of {args.repeats}, {figures['threads']} threads")
    print(f"{'method':<12}{'seconds':>10}{'tokens/s':>10}{'ratio':>8}")
    for name, seconds in medians.items():
        print(f"{name:<12}{seconds:>10.2f}{tokens / seconds:>10.0f}{seconds / medians['floor']:>8.3f}")
    print(f"peak RSS {small['rss_mb']:.0f} MB at {small['tokens']} tokens, {large['rss_mb']:.0f} MB at "
          f"{large['tokens']} tokens ({100 * figures['rss_growth']:+.1f}%)")
    print(f"shards identical: {figures['shards_identical']}; resume identical: {figures['resume_identical']}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
