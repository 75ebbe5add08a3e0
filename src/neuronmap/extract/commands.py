"""`neuronmap` subcommands of the extract stage: one shard's forward passes, then the merge of
every shard's per-token statistics."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import NeuronmapError
from .settings import CalibrationSettings, ExtractionSettings, NeuronStatsSettings

log = logging.getLogger("neuronmap")

SETTINGS = {"extract": ExtractionSettings, "neuron-stats": NeuronStatsSettings, "calibrate": CalibrationSettings}


def cmd_extract(args) -> None:
    """pooled responses and token statistics of one shard's prompts"""
    import polars as pl

    from ..io import tables
    from ..io.parquet import read_table, write_table
    from ..model.cost import counting_forwards, job_cost
    from ..model.host_memory import reuse_freed_buffers
    from ..model.loading import load_for_job
    from .engine import ExtractionOutputs, extract_shard
    prompts = read_table(args.prompts).filter(
        (pl.col("relation") == args.relation) & (pl.col("shard") == args.shard))
    if prompts.height == 0:
        raise NeuronmapError(f"{args.prompts}: no identification prompts for {args.relation} shard {args.shard}")
    # On a cluster, the scheduler's GPU assignment is the first thing to check in a job's log.
    log.info("CUDA_VISIBLE_DEVICES=%s", os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
    # Before the model loads. Freed batch buffers serve the next batch: a fresh mapping per
    # buffer (return_large_buffers_to_the_os) made the job fault in every batch's pages.
    reuse_freed_buffers()
    model, tokenizer = load_for_job(args.model_dir, args.settings.model, args.threads)
    outputs = ExtractionOutputs(Path(args.out), Path(args.out_stats), Path(args.out_top))
    with counting_forwards(model) as count:
        extract_shard(model, tokenizer, prompts, outputs, args.settings)
    log.info("forwarded %d token positions in %d forward passes, %.1f s", count.tokens, count.forwards,
             count.seconds)
    write_table(job_cost("extract", f"{args.relation}-{args.shard}", prompts.height, count), args.out_cost,
                tables.JOB_COST)


def args_extract(p) -> None:
    p.add_argument("--model-dir", required=True, help="directory written by prepare-model")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--prompts", required=True)
    p.add_argument("--relation", required=True)
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--out-stats", required=True)
    p.add_argument("--out-top", required=True)
    p.add_argument("--out-cost", required=True, help="tokens forwarded and seconds taken (cost.parquet's input)")


def cmd_neuron_stats(args) -> None:
    """merge the shards' token statistics"""
    from ..io import tables
    from ..io.parquet import read_table, write_table
    from .neuron_stats import merge_partials, merge_tops
    write_table(merge_partials([read_table(path) for path in args.stats]), args.out, tables.NEURON_STATS)
    write_table(merge_tops([read_table(path) for path in args.top], args.settings.top_n), args.out_top,
                tables.TOP_ACTIVATIONS)


def args_neuron_stats(p) -> None:
    p.add_argument("--stats", nargs="+", required=True)
    p.add_argument("--top", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--out-top", required=True)


def cmd_calibrate(args) -> None:
    """bare forward passes of each stage's regime: the floors cost.parquet compares the stages with"""
    from ..io import tables
    from ..io.parquet import read_table, write_table
    from ..model.cost import calibration
    from ..model.loading import load_for_job
    prompts = read_table(args.prompts, ["prompt_id", "relation", "shard", "split", "prefix", "text"])
    model, tokenizer = load_for_job(args.model_dir, args.settings.model, args.threads)
    bare = calibration(model, tokenizer, prompts, args.settings)
    for row in bare.iter_rows(named=True):
        log.info("bare forward, %s regime: %d token positions in %d forwards, %.2f s, %.0f tokens/s", row["job"],
                 row["tokens"], row["forwards"], row["seconds"], row["tokens"] / row["seconds"])
    write_table(bare, args.out, tables.JOB_COST)


def args_calibrate(p) -> None:
    p.add_argument("--model-dir", required=True, help="directory written by prepare-model")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--prompts", required=True)
    p.add_argument("--out", required=True)
