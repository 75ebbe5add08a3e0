"""neuronmap on a CUDA GPU, with a randomly initialized model of Llama-2-7B's shape (its config
only: no weights to download, so it runs on a bare machine).

    .venv/bin/python bench/gpu.py [--prompts 256] [--test-prompts 64] [--group 12] [--device-map auto]
    .venv/bin/python bench/gpu.py --smoke      # a tiny shape on the CPU (tests/test_bench_smoke.py)

Measures, on the same model:
(a) load time: the model saved once as safetensors, then loaded by neuronmap under `--device-map`
    (single: one device; auto: decoder layers dispatched by accelerate over the visible GPUs);
(b) extraction against the bare forward on the same batches (all four sites, three poolings,
    per-token statistics, top activations, Parquet writes), at --prompts and half of it, side by
    side: extract_ratio = extraction / forward at --prompts; extract_marginal_ratio (per token,
    fixed cost removed) and extract_fixed_s (seconds per job; bench/marginal.py);
(c) the batched ablation sweep (`--group` >= 12 configurations per forward batch: k in 100, 1000,
    3000, top-k and three random controls each) against one configuration at a time:
    sweep_speedup; their answers must be identical with the model in float32 (on
    --check-prompts; identical_answers), where bfloat16's rounding of batches of other shapes
    cannot flip a near-tied greedy choice of random weights (the timed runs' own agreement, in
    the model's dtype, is identical_answers_in_model_dtype, for information);
(d) LM-head decoding of every unit's vectors (up, gate, act; with and without the norm's gain).
Then projects the reference study's whole experiment (Llama-2-7B, 12 relations; see --study-*)
on one such GPU from those rates. Prints a table, then one JSON line with extract_ratio,
sweep_speedup, decode_seconds, load_seconds, gpu, torch and the projection.

Prompts are few-shot prompts of the relation files under a character-level tokenizer (a
random model has no tokenizer of its own), so a prompt is a few hundred tokens: longer than
Llama-2's tokenizer would make it, which makes the measured rates conservative.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from marginal import interleaved, marginal  # noqa: E402  (bench/ is this script's folder)
from neuronmap.ablate.ablation import DeactivationValue, ablations_for, deactivation_for, evaluate, evaluate_sweep  # noqa: E402
from neuronmap.ablate.settings import EvaluationSettings  # noqa: E402
from neuronmap.extract.engine import Extraction, ExtractionOutputs, forward_without_logits  # noqa: E402
from neuronmap.extract.settings import ExtractionSettings  # noqa: E402
from neuronmap.model.architectures import MlpSites  # noqa: E402
from neuronmap.model.batching import encode, length_sorted_batches  # noqa: E402
from neuronmap.model.dispatch import input_device  # noqa: E402
from neuronmap.model.loading import load_model, prepare_model  # noqa: E402
from neuronmap.prepare.prompts import build_prompts  # noqa: E402
from neuronmap.prepare.relations import find_relation_file, load_relation  # noqa: E402
from neuronmap.prepare.settings import PromptSettings  # noqa: E402
from neuronmap.stats.decode import decode_neurons  # noqa: E402

RELATIONS = ["country_capital_city", "landmark_in_country", "star_constellation", "object_superclass",
             "verb_past_tense", "adj_comparative"]
LLAMA_2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=1024)
TOP_K = [100, 1000, 3000]
SEEDS = [1, 2, 3]


def char_tokenizer(path: Path) -> None:
    """A character-level tokenizer with a BOS token (ids 0-99), saved as tokenizer.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(path)


def random_model_dir(folder: Path, shape: dict, device: str, dtype: torch.dtype) -> Path:
    """A randomly initialized Llama of `shape`, saved as safetensors with a tokenizer, prepared."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    source = folder / "source"
    model.save_pretrained(source)
    del model
    char_tokenizer(source)
    prepare_model(str(source), folder / "model")
    return folder / "model"


def prompts(n: int, split: str) -> pl.DataFrame:
    relations = [load_relation(find_relation_file(REPO / "data" / "relations", r), r) for r in RELATIONS]
    frame = build_prompts(relations, PromptSettings.defaults(few_shot=3, max_facts=200, test_facts=50, seed=0))
    frame = frame.filter(pl.col("split") == split).sort("prompt_id")
    return frame.sample(min(n, frame.height), seed=0).sort("prompt_id")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(function, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def bare_forward(model, tokenizer, texts, settings: ExtractionSettings) -> None:
    """The same batches as extraction, through the model with nothing hooked."""
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    device = input_device(model)
    with torch.inference_mode():
        for batch in length_sorted_batches(lengths, settings.batch_size, settings.batch_tokens):
            forward_without_logits(model, encode(tokenizer, [texts[i] for i in batch], device, padding_side="right"))


def same_answers(swept: pl.DataFrame, one: list[list[str]], n: int) -> bool:
    """The sweep's answers (configuration-major, n prompts each) equal one configuration at a time."""
    return all(swept["generated"][i * n:(i + 1) * n].to_list() == answers for i, answers in enumerate(one))


@contextlib.contextmanager
def in_float32(model):
    """The model's floating-point parameters and buffers in float32 for the block, then back
    (bfloat16 -> float32 -> bfloat16 is exact). Tensor by tensor, so a dispatched model's
    tensors stay on their devices; on a 7B model it needs 4 bytes a parameter on the GPU."""
    tensors = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    dtypes = [t.dtype for t in tensors]
    for t in tensors:
        t.data = t.data.float()
    try:
        yield
    finally:
        for t, dtype in zip(tensors, dtypes):
            t.data = t.data.to(dtype)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def random_units(widths: dict[str, int], n_layers: int, count: int) -> pl.DataFrame:
    generator = torch.Generator().manual_seed(0)
    pool = [(site, layer) for site in ("gate", "up", "act", "down") for layer in range(n_layers)]
    picks = torch.randint(len(pool), (count,), generator=generator).tolist()
    rows = {}
    for i, pick in enumerate(picks):
        site, layer = pool[pick]
        unit = int(torch.randint(widths[site], (1,), generator=generator))
        rows.setdefault((site, layer, unit), i + 1)
    return pl.DataFrame({"site": [k[0] for k in rows], "layer": [k[1] for k in rows], "unit": [k[2] for k in rows],
                         "rank": list(range(1, len(rows) + 1))},
                        schema_overrides={"layer": pl.Int32, "unit": pl.Int32, "rank": pl.Int64})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU: checks the script runs")
    parser.add_argument("--prompts", type=int, default=256, help="identification prompts extracted")
    parser.add_argument("--test-prompts", type=int, default=64, help="test prompts per ablation configuration")
    parser.add_argument("--group", type=int, default=12, help="configurations per forward batch in the sweep")
    parser.add_argument("--device-map", default="single", choices=["single", "auto", "balanced"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--check-prompts", type=int, default=16,
                        help="test prompts of the equality check (in float32)")
    parser.add_argument("--study-relations", type=int, default=12)
    parser.add_argument("--study-prompts", type=int, default=1000, help="identification prompts per relation")
    parser.add_argument("--study-test-prompts", type=int, default=50, help="test prompts per relation")
    args = parser.parse_args()
    logging.disable(logging.INFO)
    if args.smoke:
        device, shape, dtype = "cpu", TINY, torch.float32
        args.prompts, args.test_prompts, args.repeats = min(args.prompts, 24), min(args.test_prompts, 8), 1
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/gpu.py needs a CUDA GPU (or --smoke)")
        device, shape, dtype = "cuda", LLAMA_2_7B, torch.bfloat16
    if args.group < 12:
        sys.exit("--group: the sweep is measured with at least 12 configurations per forward batch")

    with tempfile.TemporaryDirectory(prefix="neuronmap-bench-gpu-") as folder:
        model_dir = random_model_dir(Path(folder), shape, device, dtype)
        if device == "cuda":
            torch.cuda.empty_cache()
        start = time.perf_counter()
        model, tokenizer = load_model(model_dir, device, str(dtype).replace("torch.", ""),
                                      device_map=args.device_map)
        load_seconds = time.perf_counter() - start
        torch_device = input_device(model)
        sites = MlpSites(model)
        widths = {site: sites.width(site) for site in sites.available}

        # (b) extraction against the bare forward
        ident = prompts(args.prompts, "identification")
        texts, ids = ident["text"].to_list(), ident["prompt_id"].to_list()
        # The path of large shards, with three poolings as the docstring says (the default stores one).
        settings = ExtractionSettings.defaults(fused_statistics=True, poolings=("mean", "max", "last"))
        out = Path(folder) / "responses"

        def extraction(chosen):
            outputs = ExtractionOutputs(*(out.with_suffix(f".{kind}.parquet") for kind in ("r", "s", "t")))
            Extraction(model, tokenizer, chosen["prompt_id"].to_list(), chosen["text"].to_list(), settings).run(outputs)

        def measure(size: int) -> dict[str, float]:
            chosen = ident.head(size)
            return {"forward": timed(lambda: bare_forward(model, tokenizer, chosen["text"].to_list(), settings),
                                     torch_device),
                    "extract": timed(lambda: extraction(chosen), torch_device)}
        extraction(ident)  # compiles the fused statistics, warms the allocator
        sizes = (ident.height // 2, ident.height)
        medians = interleaved(measure, sizes, args.repeats)
        size_tokens = [sum(len(x) for x in tokenizer(ident.head(n)["text"].to_list())["input_ids"]) for n in sizes]
        extract_marginal = marginal(tuple(size_tokens), tuple(medians[n]["forward"] for n in sizes),
                                    tuple(medians[n]["extract"] for n in sizes))
        forward_s, extract_s = [medians[sizes[1]]["forward"]], [medians[sizes[1]]["extract"]]
        tokens = size_tokens[1]

        # (c) the batched sweep against one configuration at a time
        test = prompts(args.test_prompts, "test")
        evaluation = EvaluationSettings.defaults(max_new_tokens=2, batch_size=16)
        units = random_units(widths, sites.n_layers, max(TOP_K))
        plan = ablations_for("synthetic", units, TOP_K, SEEDS, widths)
        configs = [deactivation_for(a, DeactivationValue("zero")) for a in plan]
        one_s, sweep_s, same_in_dtype = [], [], []
        for _ in range(args.repeats):
            one, swept = [], None

            def one_at_a_time():
                one.extend(evaluate(model, tokenizer, test, a, evaluation)["generated"].to_list() for a in plan)

            def sweep():
                nonlocal swept
                swept = evaluate_sweep(model, tokenizer, test, plan, configs, evaluation, args.group)
            one_s.append(timed(one_at_a_time, torch_device))
            sweep_s.append(timed(sweep, torch_device))
            same_in_dtype.append(same_answers(swept, one, test.height))
        # The equality check in float32: in bfloat16 a batch of 12 x 16 rows rounds differently
        # from one of 16, and on random weights (near-tied logits) that flips greedy answers
        # without any difference in what the sweep computes.
        with in_float32(model):
            check = test.head(min(test.height, args.check_prompts))
            one = [evaluate(model, tokenizer, check, a, evaluation)["generated"].to_list() for a in plan]
            identical = same_answers(evaluate_sweep(model, tokenizer, check, plan, configs, evaluation, args.group),
                                     one, check.height)

        # (d) decoding every unit through the LM head
        decode_s = timed(lambda: decode_neurons(model, tokenizer), torch_device)

    forward, extract = statistics.median(forward_s), statistics.median(extract_s)
    one, sweep = statistics.median(one_s), statistics.median(sweep_s)
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (smoke)"
    # The reference study on one such GPU: extraction of every relation's prompts, one sweep of
    # 12 configurations per relation over every relation's test prompts, one decoding.
    per_prompt = extract / len(texts)
    per_evaluation = sweep / (len(plan) * test.height)
    projection = {
        "extract_hours": args.study_relations * args.study_prompts * per_prompt / 3600,
        "ablate_hours": args.study_relations * len(plan) * args.study_relations * args.study_test_prompts
        * per_evaluation / 3600,
        "decode_hours": decode_s / 3600,
    }
    projection["total_hours"] = sum(projection.values())
    rows = [("load (device_map " + args.device_map + ")", load_seconds, ""),
            (f"bare forward, {len(texts)} prompts", forward, f"{tokens / forward:,.0f} tokens/s"),
            ("extraction, same batches", extract, f"{extract / forward:.2f}x the forward"),
            (f"ablation, one configuration at a time ({len(plan)})", one, ""),
            (f"ablation sweep, {args.group} per batch", sweep, f"{one / sweep:.2f}x faster; identical: {identical}"),
            ("LM-head decoding of every unit", decode_s, "")]
    print(f"{gpu}, torch {torch.__version__}, {'tiny' if args.smoke else 'Llama-2-7B'} shape "
          f"({shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}), {str(dtype).replace('torch.', '')}")
    for name, seconds, note in rows:
        print(f"{name:<48} {seconds:9.2f} s  {note}")
    print(f"projection, reference study ({args.study_relations} relations) on one such device: "
          f"{projection['total_hours']:.1f} h (extraction {projection['extract_hours']:.1f} h, ablation "
          f"{projection['ablate_hours']:.1f} h, decoding {projection['decode_hours']:.2f} h)")
    print(json.dumps({
        "bench": "gpu", "smoke": args.smoke, "gpu": gpu, "torch": torch.__version__, "device_map": args.device_map,
        "load_seconds": round(load_seconds, 2), "forward_seconds": round(forward, 3),
        "extract_seconds": round(extract, 3), "extract_ratio": round(extract / forward, 2),
        "extract_marginal_ratio": extract_marginal["marginal_ratio"], "extract_fixed_s": extract_marginal["fixed_s"],
        "forward_fixed_s": extract_marginal["floor_fixed_s"], "extract_tokens": extract_marginal["marginal_tokens"],
        "sweep_seconds": round(sweep, 3), "one_at_a_time_seconds": round(one, 3),
        "sweep_speedup": round(one / sweep, 2), "configurations": len(plan), "configs_per_batch": args.group,
        "identical_answers": identical, "identical_answers_in_model_dtype": all(same_in_dtype),
        "decode_seconds": round(decode_s, 2),
        "projection_hours": {key: round(value, 2) for key, value in projection.items()},
    }))
    if not identical:
        sys.exit("the sweep's answers differ from one configuration at a time")


if __name__ == "__main__":
    main()
