"""What a run's model-running jobs will need, before any of them runs: from the model's config
alone (the model instantiated on the meta device: no weight read) and the run's config.

Per job kind (extract, baseline, ablate, decode, calibrate): the number of jobs, the weights'
bytes on each device (as `device_map` places them), the peak memory of one job on each device
(weights, the activations of its largest batch, and on the host the Python runtime), the
forward tokens and FLOPs of all its jobs, the time they take at `plan.tflops`, and the bytes
they write.

Memory model (bytes; d = bytes per value of the model's dtype, BT = tokens of a batch):
- extraction, per layer at once: the residual stream and attention (about 4·H·d and heads·T·d
  per token), gate, up and act (3·I·d) and the float32 reductions over a site (4·I·4);
- generation: the same without the reductions, for batch_size × configs_per_batch rows, plus
  their KV cache (2·layers·kv_width·d per token) and the last position's logits;
- perplexity: its logits, at most LOGIT_BUDGET, and one row's float32 log-softmax;
- decoding: one layer's vectors and a chunk's vocabulary products (chunk x vocab scores, their
  grouped top-k's copy; with a bfloat16 search, the unembedding's copy and the rescoring's
  gathered rows), and on the host every decoded row until decoded.parquet is written;
- calibration (bare forward passes of each stage's regime, model/cost.py): the largest of
  extraction's batches without the reductions, baseline/ablate's generation, and a batch of
  whole prompts.
The host adds RUNTIME (interpreter, torch, transformers, polars), COMPILE (the fused statistics'
torch.compile) and, on the CPU, CPU_WORKING_SET (an empirical fraction of the weights). Checked against measured peaks on the CPU (tests/test_plan.py).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import NeuronmapError
from ..model import dispatch
from ..model.batching import LOGIT_BUDGET
from ..model.cost import CALIBRATION_PROMPTS
from ..model.shape import ModelShape, shape_of
from .explain_cost import explain_cost

GiB = 2 ** 30
MiB = 2 ** 20
# The host memory of a job before its model loads: Python, torch, transformers, polars (measured
# on the CPU: about 270 MiB after the imports, 60 more once a tokenizer and the first batch ran).
RUNTIME = 330 * MiB
# What a CUDA context and cuBLAS' workspace take on each GPU a job uses.
GPU_CONTEXT = 600 * MiB
# torch.compile of the fused statistics, in the job's own process (CPU and GPU jobs alike).
COMPILE = 250 * MiB
# On the CPU a job's anonymous memory grows, beyond its activations, by about this fraction of
# its weights while it runs (measured, extraction of SmolLM2-135M in float32: +0.85x with the
# weights memory-mapped from safetensors; its cause is not pinned down: allocator caches of the
# per-layer matmuls are the suspect). Empirical; tests/test_plan.py checks the total.
CPU_WORKING_SET = 0.85
DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
DECODE_CHUNK = 512        # stats.decode's chunk of units
# decoded.parquet's rows as Arrow holds them: per top token an int32 id, a float32 score and a
# string (offset and a few bytes); per row site, layer, unit, norm_gain and three list offsets.
DECODED_ROW_TOKEN_BYTES = 20
DECODED_ROW_BYTES = 40
TOKEN_STRING_BYTES = 64   # one Python str per vocabulary entry (token_strings)
# What the first Arrow tables of a job reserve in pyarrow's memory pool, beyond their own bytes
# (measured: a decode job's peak grew 48 MiB once it built 1 MiB of rows).
ARROW_POOL = 48 * MiB


@dataclass(frozen=True)
class Target:
    """Where the jobs run: "cuda" (gpus GPUs each) or "cpu", in dtype."""
    device: str
    gpus: int
    dtype: torch.dtype


def target_of(settings) -> Target:
    """The configured device (auto: CUDA when this machine has it, else the CPU; set device:
    cuda to plan a GPU run from a login node without one) and the dtype it will load in."""
    model = settings.extraction.model
    device = model.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = "cuda" if device.startswith("cuda") else "cpu" if device == "cpu" else device
    if model.dtype != "auto":
        dtype = getattr(torch, model.dtype)
    else:
        dtype = torch.bfloat16 if kind == "cuda" else torch.float16 if kind == "mps" else torch.float32
    return Target(kind, 0 if kind != "cuda" else gpus_for(settings, None), dtype)


def gpus_for(settings, need: int | None) -> int:
    """gpus_per_job, or (auto) 1 with device_map single, the GPUs max_memory names, or as many
    of plan.gpu_memory as `need` bytes fill (1 while the need is not known)."""
    if settings.gpus_per_job != "auto":
        return int(settings.gpus_per_job)
    model = settings.extraction.model
    if model.device_map == "single":
        return 1
    named = [key for key in model.max_memory if key != "cpu"]
    if named:
        return len(named)
    return 1 if need is None else max(1, math.ceil(need / (settings.gpu_memory * GiB * 0.9)))


def placement(model, settings, target: Target, reserve: int) -> dict[str, object]:
    """Module -> device of every module, as loading will place them; `reserve` bytes are left
    free on each GPU for activations. Refuses what the memory given does not hold."""
    model_settings = settings.extraction.model
    if model_settings.device_map == "single":
        return {"": 0 if target.device == "cuda" else target.device}
    available: dict = {}
    if target.device == "cuda":
        for gpu in range(target.gpus):
            limit = (dispatch.size_in_bytes(model_settings.max_memory[str(gpu)])
                     if str(gpu) in model_settings.max_memory else int(settings.gpu_memory * GiB))
            available[gpu] = max(0, limit - reserve - GPU_CONTEXT)
    available["cpu"] = 2 ** 62  # unbounded unless max_memory.cpu says otherwise
    if target.device == "cpu":
        available["cpu"] = max(0, available["cpu"] - reserve)
    budget = dispatch.memory_budget(model_settings.max_memory, model_settings.offload, torch.device(target.device),
                                    available)
    quiet = logging.getLogger("accelerate.utils.modeling")  # it warns that the planned GPUs are not here
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        device_map = dispatch.place_layers(model, budget, model_settings.device_map == "balanced", target.dtype)
    finally:
        quiet.setLevel(level)
    dispatch.check_offload(device_map, model_settings.offload, target.device == "cuda")
    return device_map


def weight_bytes(model, device_map: dict, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of weights on each device ("0", "1", ..., "cpu", "disk")."""
    from accelerate.utils import compute_module_sizes
    sizes = compute_module_sizes(model, dtype=dtype)
    per_device: dict[str, int] = {}
    for name, device in device_map.items():
        per_device[str(device)] = per_device.get(str(device), 0) + sizes[name]
    return per_device


def _layer_tokens(shape: ModelShape, d: int, stats: bool) -> int:
    """Bytes per token of the tensors one layer holds at its peak."""
    per_token = 4 * shape.hidden * d + 3 * shape.intermediate * d
    return per_token + (4 * shape.intermediate * 4 if stats else 0)


def _forward_bytes(shape: ModelShape, d: int, rows: int, longest: int, stats: bool) -> int:
    """One forward pass of `rows` prompts padded to `longest` tokens, keeping the last position's
    logits: one layer's tensors at once, attention's scores, and the logits (float32)."""
    tokens = rows * longest
    return tokens * (_layer_tokens(shape, d, stats) + shape.heads * longest * d) + rows * shape.vocab * 4


def _generation_bytes(shape: ModelShape, d: int, rows: int, longest: int) -> int:
    """Greedy decoding of `rows` rows up to `longest` tokens: a forward pass without the
    reductions, the KV cache, and the last position's logits and their argmax's copy."""
    return (rows * longest * (_layer_tokens(shape, d, False) + shape.heads * longest * d)
            + 2 * shape.n_layers * rows * longest * shape.kv_width * d + rows * shape.vocab * 4 * 2)


def activation_bytes(kind: str, shape: ModelShape, d: int, settings, lengths: dict) -> int:
    """Peak activation memory of one job of `kind` (its largest batch), on one device."""
    ext, ab = settings.extraction, settings.ablation
    if kind == "extract":
        longest = lengths["identification_max"]
        rows = max(1, min(ext.batch_size, ext.batch_tokens // max(longest, 1)))
        return _forward_bytes(shape, d, rows, longest, True)
    if kind == "decode":
        return decode_bytes(shape, d, settings, decode_search(settings, target_of(settings), d))
    if kind == "calibrate":
        return calibrate_bytes(shape, d, settings, lengths)
    per_batch = configs_per_batch(settings, kind)
    rows = ab.evaluation.batch_size * per_batch
    generation = _generation_bytes(shape, d, rows, lengths["test_max"] + ab.evaluation.max_new_tokens)
    if kind == "baseline":
        return generation
    tokens = ab.perplexity_max_tokens
    logits = min(LOGIT_BUDGET, (1 + n_configs(settings)) * tokens * shape.vocab * 4)
    perplexity = logits + 2 * tokens * shape.vocab * 4 + tokens * _layer_tokens(shape, d, False)
    return max(generation, perplexity)


def calibrate_bytes(shape: ModelShape, d: int, settings, lengths: dict) -> int:
    """The calibration job's peak activations: the largest of its regimes (model/cost.py's
    `calibration`, no hook, so no statistics' reductions), all in batches of the extraction's
    batch_size: extraction's batches (batch_tokens bounds them), greedy decoding of
    configs_per_batch copies of a batch after their prefixes, and whole prompts (no batch_tokens;
    its sample mixes both splits, so the longest of either)."""
    ext = settings.extraction
    longest = lengths["identification_max"]
    rows = max(1, min(ext.batch_size, ext.batch_tokens // max(longest, 1)))
    extract = _forward_bytes(shape, d, rows, longest, False)
    generation = _generation_bytes(shape, d, ext.batch_size * configs_per_batch(settings, "ablate"),
                                   lengths["test_max"] + settings.ablation.evaluation.max_new_tokens)
    whole = _forward_bytes(shape, d, ext.batch_size, max(lengths["identification_max"], lengths["test_max"]), False)
    return max(extract, generation, whole)


def calibrate_work(shape: ModelShape, settings, lengths: dict, baseline_tokens: int) -> tuple[int, float]:
    """Forward tokens and FLOPs of the calibration job, roughly: CALIBRATION_PROMPTS prompts per
    regime (it samples whole groups, so at least that many), as that share of what extraction and
    the baseline forward; the ablate regime again configs_per_batch times where that is above 1
    (else it is the baseline's measurement); and whole prompts counted at the longest prompt's
    length (an upper bound: batches are padded to their longest)."""
    new = settings.ablation.evaluation.max_new_tokens
    mean_test = lengths["test_tokens"] / max(lengths["test"], 1)
    share_ident = min(1.0, CALIBRATION_PROMPTS / max(lengths["identification"], 1))
    share_test = min(1.0, CALIBRATION_PROMPTS / max(lengths["test"], 1))
    repeats = configs_per_batch(settings, "ablate")
    longest = max(lengths["identification_max"], lengths["test_max"])
    extract = int(lengths["identification_tokens"] * share_ident)
    evaluation = int(baseline_tokens * share_test * (1 + (repeats if repeats > 1 else 0)))
    whole = min(CALIBRATION_PROMPTS, lengths["identification"] + lengths["test"]) * longest
    mean_ident = lengths["identification_tokens"] / max(lengths["identification"], 1)
    flops = (forward_flops(shape, extract, int(mean_ident), 0.0)
             + forward_flops(shape, evaluation, int(mean_test + new / 2), new / (mean_test + new))
             + forward_flops(shape, whole, longest // 2, 0.0))
    return extract + evaluation + whole, flops


def decode_search(settings, target: Target, d: int) -> bool:
    """Whether decoding searches candidates in a bfloat16 copy of the unembedding (stats/decode.py's
    `search_dtype`: auto is bfloat16 on CUDA and on CPUs with AMX tiles; none when the model is
    already in a 2-byte dtype). On the CPU, this machine's CPU stands for the target's."""
    if d <= 2 or settings.decode_search == "float32":
        return False
    if settings.decode_search == "bfloat16" or target.device == "cuda":
        return True
    return target.device == "cpu" and torch.backends.mkldnn.is_available() and torch.cpu._is_amx_tile_supported()


def decode_bytes(shape: ModelShape, d: int, settings, searched: bool) -> int:
    """What decoding holds beside the weights, on the device of the unembedding: one layer's
    vectors, a chunk's vocabulary products (the chunk's units x every token) and what selects
    their top tokens. Without a search, the float32 scores and the grouped top-k's padded copy
    (2 x chunk x vocab x 4); with one, the unembedding's bfloat16 copy, the chunk's bfloat16
    scores, their float32 top-k candidates, and the candidates' unembedding rows gathered for
    exact rescoring (chunk x candidates x hidden x d)."""
    vectors = 3 * shape.intermediate * shape.hidden * d
    products = DECODE_CHUNK * shape.vocab
    if not searched:
        return vectors + 2 * products * 4
    candidates = max(4 * settings.decode_top_n, settings.decode_top_n + 32)
    return (vectors + shape.vocab * shape.hidden * 2 + products * 2 + products * 4
            + DECODE_CHUNK * candidates * shape.hidden * d)


def decode_host_bytes(shape: ModelShape, settings) -> int:
    """The host memory decoding builds up beside the runtime: every decoded vector's row of
    decoded.parquet (held until the file is written: top_n ids, scores and token strings, about
    DECODED_ROW_TOKEN_BYTES a token, plus DECODED_ROW_BYTES a row), every token's string, and
    what Arrow's memory pool reserves."""
    rows = shape.n_layers * shape.intermediate * len(settings.decode_sites) * len(settings.norm_gain)
    return (rows * (settings.decode_top_n * DECODED_ROW_TOKEN_BYTES + DECODED_ROW_BYTES)
            + shape.vocab * TOKEN_STRING_BYTES + ARROW_POOL)


def n_configs(settings) -> int:
    ab = settings.ablation
    return len(ab.top_k) * (1 + len(ab.seeds))


def configs_per_batch(settings, kind: str) -> int:
    if kind == "baseline":
        return 1
    setting = settings.ablation.configs_per_batch
    if setting != "auto":
        return int(setting)
    return 1 if target_of(settings).device == "cpu" else 12


def job_memory(kind: str, weights: dict[str, int], activations: int, target: Target, fused: bool,
               host_extra: int = 0) -> dict[str, int]:
    """Peak bytes of one job on each device it uses: weights plus activations where layers run
    (every GPU of a dispatched model holds its own layers' activations), the runtime and
    `host_extra` on the host. Decoding runs no forward pass: no CPU working set of the layers'
    matmuls (measured: SmolLM2-135M's decode peaked at its weights, runtime and a chunk's scores)."""
    memory: dict[str, int] = {}
    compute = [device for device in weights if device not in ("cpu", "disk")] if target.device == "cuda" else ["cpu"]
    for device in compute:
        memory[device] = weights.get(device, 0) + activations + (GPU_CONTEXT if target.device == "cuda" else 0)
    host = RUNTIME + (COMPILE if fused and kind == "extract" else 0) + host_extra
    if target.device == "cpu" and kind != "decode":
        host += int(CPU_WORKING_SET * weights.get("cpu", 0))
    memory["cpu"] = memory.get("cpu", 0) + weights.get("cpu", 0) * (target.device == "cuda") + host
    if "disk" in weights:
        memory["disk"] = weights["disk"]
    return memory


def forward_flops(shape: ModelShape, tokens: int, context: int, logits_per_token: float) -> float:
    """2 FLOPs per multiply-add: the layers' weights, attention over `context` positions, and the
    unembedding for `logits_per_token` of the tokens."""
    return tokens * (2 * shape.layer_parameters + 4 * shape.n_layers * context * shape.hidden
                     + logits_per_token * 2 * shape.hidden * shape.vocab)


@dataclass
class JobPlan:
    kind: str
    jobs: int
    gpus_per_job: int
    weights_bytes: dict
    peak_bytes: dict
    activation_bytes: int
    forward_tokens: int
    flops: float
    seconds: float
    written_bytes: int
    notes: list = field(default_factory=list)


def token_lengths(settings, tokenizer=None) -> dict:
    """The prompts every job will see (built as the prepare stage builds them) and their lengths
    in tokens: counted by the tokenizer, or estimated at 4 characters a token without one.
    `*_max` are whole prompts (what attention spans); `*_tokens` what is forwarded: each distinct
    prefix of demonstrations once per job and every query (pool_span: query), or every whole
    prompt (pool_span: prompt)."""
    import polars as pl

    from ..prepare.prompts import relation_prompts
    from ..prepare.relations import find_relation_file, load_relation
    frames = [relation_prompts(load_relation(find_relation_file(settings.relations_dir, name), name),
                               settings.prepare.prompts, settings.prepare.shards) for name in settings.relations]
    prompts = pl.concat(frames, how="diagonal_relaxed")

    def count(texts):
        if tokenizer is not None:
            return [len(ids) for ids in tokenizer(texts)["input_ids"]]
        return [max(1, math.ceil(len(text) / 4)) for text in texts]

    prompts = prompts.with_columns(tokens=pl.Series(count(prompts["text"].to_list())),
                                   prefix_tokens=pl.Series(count(prompts["prefix"].to_list())))
    ident = prompts.filter(pl.col("split") == "identification")
    test = prompts.filter(pl.col("split") == "test")
    cached = settings.extraction.pool_span == "query"

    def forwarded(frame, by):
        if not cached:
            return int(frame["tokens"].sum())
        prefixes = frame.unique([*by, "prefix"])["prefix_tokens"].sum()
        return int((frame["tokens"] - frame["prefix_tokens"]).sum() + prefixes)

    return {"identification": ident.height, "identification_tokens": forwarded(ident, ["relation", "shard"]),
            "identification_max": int(ident["tokens"].max()), "test": test.height,
            "test_tokens": int((test["tokens"] - test["prefix_tokens"]).sum()),
            "test_prefix_tokens": int(test.unique("prefix")["prefix_tokens"].sum()),
            "test_max": int(test["tokens"].max()),
            "test_by_relation": {r: int(n) for r, n in test.group_by("relation").len().iter_rows()},
            "counted_by": "tokenizer" if tokenizer is not None else "characters / 4"}


def plan_jobs(config, settings, lengths: dict | None = None, tokenizer=None) -> dict:
    """The plan: per model-running job kind, what it needs (see the module's docstring)."""
    shape_model = dispatch.meta_model(config, settings.extraction.model.trust_remote_code)
    shape = shape_of(shape_model)
    target = target_of(settings)
    d = DTYPE_BYTES[target.dtype]
    lengths = lengths or token_lengths(settings)
    ext, ab = settings.extraction, settings.ablation
    kinds = ("extract", "baseline", "ablate", "decode", "calibrate")
    activations = {kind: activation_bytes(kind, shape, d, settings, lengths) for kind in kinds}
    total_weights = shape.parameters * d
    if target.device == "cuda" and settings.gpus_per_job == "auto":
        need = total_weights + max(activations.values())
        target = Target(target.device, gpus_for(settings, need), target.dtype)
    device_map = placement(shape_model, settings, target, max(activations.values()))
    weights = weight_bytes(shape_model, device_map, target.dtype)

    relations = len(settings.relations)
    configs = n_configs(settings)
    new = ab.evaluation.max_new_tokens
    own_tests = sum(lengths["test_by_relation"].values()) / max(relations, 1)
    mean_test = lengths["test_tokens"] / max(lengths["test"], 1)
    random_per_config = own_tests if ab.random_eval == "own" else lengths["test"]
    top_k_configs = len(ab.top_k)
    evaluated = top_k_configs * lengths["test"] + (configs - top_k_configs) * random_per_config
    work = {
        # (jobs, forward tokens, mean context, logits per token, bytes written)
        "extract": (relations * settings.prepare.shards, lengths["identification_tokens"],
                    lengths["identification_tokens"] / max(lengths["identification"], 1), 0.0,
                    lengths["identification"] * len(ext.poolings) * shape.n_layers
                    * sum(shape.widths[s] for s in ext.sites if s in shape.widths)
                    * (2 if ext.response_dtype == "float16" else 4)),
        # Queries and generated tokens per evaluation; each distinct prefix once per configuration.
        "baseline": (1, int(lengths["test"] * (mean_test + new) + lengths["test_prefix_tokens"]), mean_test + new / 2,
                     new / (mean_test + new), lengths["test"] * 200),
        "ablate": (relations, int(relations * (evaluated * (mean_test + new) + configs * lengths["test_prefix_tokens"]
                                               + (1 + configs) * ab.perplexity_max_tokens)),
                   mean_test + new / 2, 0.5, relations * (evaluated + lengths["test"]) * 200),
        "decode": (1, 0, 0, 0.0, 0),
        "calibrate": (1, 0, 0, 0.0, 4 * 200),  # its tokens and FLOPs: calibrate_work
    }
    jobs = []
    for kind in kinds:
        count, tokens, context, logits, written = work[kind]
        if kind == "decode":
            units = shape.n_layers * shape.intermediate * len(settings.decode_sites) * len(settings.norm_gain)
            flops = 2.0 * units * shape.hidden * shape.vocab
            written = units * (8 + 12 * 10)
        elif kind == "calibrate":
            tokens, flops = calibrate_work(shape, settings, lengths, work["baseline"][1])
        else:
            flops = forward_flops(shape, tokens, int(context), logits)
        memory = job_memory(kind, weights, activations[kind], target, ext.fused_statistics in (True, "auto"),
                            decode_host_bytes(shape, settings) if kind == "decode" else 0)
        jobs.append(JobPlan(kind, count, target.gpus, weights, memory, activations[kind], tokens, flops,
                            flops / (settings.tflops * 1e12), int(written)))
    explain = (explain_cost(settings.explain, shape.parameters, settings.tflops, tokenizer)
               if settings.explain.get("enabled") else None)
    return {"model_type": config.model_type, "device": target.device, "dtype": str(target.dtype).replace("torch.", ""),
            "gpus_per_job": target.gpus, "device_map": settings.extraction.model.device_map,
            "parameters": shape.parameters, "n_layers": shape.n_layers, "hidden": shape.hidden,
            "intermediate": shape.intermediate, "vocab": shape.vocab, "tflops": settings.tflops,
            "prompts": {key: value for key, value in lengths.items() if key != "test_by_relation"},
            "placement": {name: str(device) for name, device in device_map.items()},
            "jobs": [asdict(job) for job in jobs], "explain_per_unit": explain}


def check_fits(plan: dict, settings) -> None:
    """Refuse a plan whose peak on a GPU exceeds the memory it has (max_memory or plan.gpu_memory)."""
    if plan["device"] != "cuda":
        return
    model = settings.extraction.model
    for job in plan["jobs"]:
        for device, need in job["peak_bytes"].items():
            if device in ("cpu", "disk"):
                continue
            limit = (dispatch.size_in_bytes(model.max_memory[device]) if device in model.max_memory
                     else settings.gpu_memory * GiB)
            if need > limit:
                key = f"max_memory.{device}" if device in model.max_memory else "plan.gpu_memory"
                raise NeuronmapError(
                    f"{key}: the {job['kind']} job needs {need / GiB:.1f} GiB on GPU {device} (weights "
                    f"{job['weights_bytes'].get(device, 0) / GiB:.1f} GiB, activations {job['activation_bytes'] / GiB:.1f}"
                    f" GiB) but has {limit / GiB:.1f} GiB: set device_map: auto with more GPUs (gpus_per_job), "
                    "lower batch_tokens or batch_size, or allow offload")


def format_table(plan: dict) -> str:
    """The plan as a text table, one row per job kind."""
    def size(n):
        return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / MiB:.0f} MiB"
    header = (f"{plan['model_type']}: {plan['parameters'] / 1e9:.3g}B parameters, {plan['n_layers']} layers, on "
              f"{plan['device']} in {plan['dtype']} (device_map {plan['device_map']}, {plan['gpus_per_job']} GPU(s) "
              f"per job), at {plan['tflops']} TFLOP/s")
    rows = [("job", "jobs", "peak per job (device: bytes)", "activations", "forward tokens", "TFLOP", "time",
             "written")]
    for job in plan["jobs"]:
        peaks = ", ".join(f"{device}: {size(n)}" for device, n in sorted(job["peak_bytes"].items()))
        rows.append((job["kind"], str(job["jobs"]), peaks, size(job["activation_bytes"]), f"{job['forward_tokens']:,}",
                     f"{job['flops'] / 1e12:,.1f}", _duration(job["seconds"]), size(job["written_bytes"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    if explain := plan.get("explain_per_unit"):
        lines.append(
            f"explain, per unit: explainer {explain['explainer_prompt_tokens']:,} tokens in, "
            f"{explain['explainer_completion_tokens']:,} out; scorer {explain['scorer_prompts']} prompts, "
            f"{explain['scorer_prompt_tokens']:,} tokens in; {_duration(explain['seconds_per_unit'])} at "
            f"{explain['tokens_per_second']:,.0f} tokens/s ({explain['rate_from']})")
    return "\n".join([header, *lines])


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def parse_time_plan(config: dict, prepared: str | Path | None = None) -> dict | None:
    """The plan the workflow checks while it is parsed, from the model's config.json (a local
    Hugging Face directory, or the run's prepared model directory) and prompt lengths estimated
    from their characters; None where no config.json is at hand (an unprepared GGUF file or hub
    id: then the plan rule's own check, before any model-running job, refuses instead)."""
    from ..model.source import MANIFEST
    for candidate in (Path(config["model"]).expanduser(), Path(prepared) if prepared else None):
        if candidate is None or not (candidate / "config.json").is_file():
            continue
        if candidate != Path(config["model"]).expanduser():
            manifest = candidate / MANIFEST
            if not manifest.is_file() or json.loads(manifest.read_text()).get("source") != config["model"]:
                continue
        return _cached_plan(json.dumps(config, sort_keys=True), str(candidate))
    return None


@functools.lru_cache(maxsize=4)
def _cached_plan(config_json: str, model_dir: str) -> dict:
    from transformers import AutoConfig

    from .settings import PlanSettings
    config = json.loads(config_json)
    settings = PlanSettings.from_config(config)
    model_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=config["trust_remote_code"],
                                              local_files_only=True)
    plan = plan_jobs(model_config, settings)
    check_fits(plan, settings)
    return plan


def needs_parse_time_plan(config: dict) -> bool:
    """Whether the plan can refuse or size anything: a dispatched model, a GPU, or GPUs to derive."""
    return config["device_map"] != "single" or config["device"].startswith("cuda")
