"""neuronmap plan: the table and plan.json from a model's config alone (a Llama-2-7B-shaped config
without weights), a placement that keeps decoder layers whole, a refusal of what does not fit,
and the memory estimate of an extraction job against the peak measured on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from neuronmap.cli import main
from neuronmap.workflow.checks import check_plan
from neuronmap.config.schema import validated
from neuronmap.errors import NeuronmapError
from neuronmap.plan.settings import PlanSettings
from conftest import REPO

LLAMA_2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
              "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096}
RELATIONS = {"names": ["country_capital_city", "verb_past_tense"], "max_facts": 40}


@pytest.fixture(scope="module")
def llama_2_7b(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-2-7b")
    (path / "config.json").write_text(json.dumps(LLAMA_2_7B))
    return path


def run_plan(config: dict, out, model_dir=None) -> int:
    settings = PlanSettings.from_config(validated(config)).to_json()
    return main(["plan", "--settings", settings, "--out", str(out)] + (["--model-dir", str(model_dir)] if model_dir else []))


def test_plan_of_a_7b_config_without_weights(llama_2_7b, tmp_path, capsys):
    assert run_plan({"model": str(llama_2_7b), "device": "cuda", "relations": RELATIONS}, tmp_path / "plan.json") == 0
    table = capsys.readouterr().out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert "llama: 6.74B parameters, 32 layers, on cuda in bfloat16" in table
    assert [job["kind"] for job in plan["jobs"]] == ["extract", "baseline", "ablate", "decode", "calibrate"]
    assert "\ncalibrate " in table
    extract = plan["jobs"][0]
    assert extract["jobs"] == 2 and extract["gpus_per_job"] == 1
    # bfloat16, all on the one GPU (and the rotary embedding's small float32 buffer)
    assert list(extract["weights_bytes"]) == ["0"]
    assert 0 <= extract["weights_bytes"]["0"] - plan["parameters"] * 2 < 1024
    assert plan["parameters"] == 6_738_415_616  # Llama-2-7B's published count
    # Forward FLOPs: about 2 per parameter of the decoder layers and token, attention on top.
    layers = plan["parameters"] - 2 * 32000 * 4096
    assert 2 * layers * extract["forward_tokens"] <= extract["flops"] <= 2.2 * layers * extract["forward_tokens"]
    assert extract["seconds"] == pytest.approx(extract["flops"] / 100e12)
    # Responses: every prompt x 1 pooling (the default) x 32 layers x (3 x 11008 + 4096) units x 2 bytes.
    assert extract["written_bytes"] == plan["prompts"]["identification"] * 1 * 32 * (3 * 11008 + 4096) * 2


def test_balanced_over_gpus_keeps_layers_whole(llama_2_7b, tmp_path):
    config = {"model": str(llama_2_7b), "device": "cuda", "relations": RELATIONS, "device_map": "balanced",
              "gpus_per_job": 2, "plan": {"gpu_memory": 16}}
    assert run_plan(config, tmp_path / "plan.json") == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    weights = plan["jobs"][0]["weights_bytes"]
    assert set(weights) == {"0", "1"} and abs(weights["0"] - weights["1"]) < 0.25 * weights["0"]
    assert all(name.count(".") <= 2 for name in plan["placement"])  # model.layers.<i>, never inside one


@pytest.mark.parametrize("change, message", [
    ({"plan": {"gpu_memory": 10}}, "plan.gpu_memory: the extract job needs 13.3 GiB on GPU 0"),
    ({"device_map": "auto", "max_memory": {0: "6GiB", 1: "6GiB"}},
     "max_memory: the model does not fit the memory given to its devices with offload: none"),
])
def test_oversize_config_is_refused_at_parse_time(llama_2_7b, change, message):
    config = validated({"model": str(llama_2_7b), "device": "cuda", "relations": RELATIONS, **change})
    with pytest.raises(NeuronmapError, match=message):
        check_plan(config)


MEASURE = """
import resource, sys
import polars as pl
from neuronmap.config.schema import validated
from neuronmap.extract.engine import ExtractionOutputs, extract_shard
from neuronmap.extract.settings import ExtractionSettings
from neuronmap.model.host_memory import reuse_freed_buffers
from neuronmap.model.loading import load_for_job
from neuronmap.prepare.prompts import relation_prompts
from neuronmap.prepare.relations import find_relation_file, load_relation
from neuronmap.prepare.settings import PrepareSettings
config = validated(__import__("json").loads(sys.argv[1]))
relation = config["relations"]["names"][0]
prompts = relation_prompts(load_relation(find_relation_file(config["relations"]["dir"], relation), relation),
                           PrepareSettings.from_config(config).prompts)
prompts = prompts.filter(pl.col("split") == "identification")
reuse_freed_buffers()  # as `neuronmap extract` does
settings = ExtractionSettings.from_config(config)
model, tokenizer = load_for_job(sys.argv[2], settings.model, 2)
out = sys.argv[3]
outputs = ExtractionOutputs(*(__import__("pathlib").Path(f"{out}.{k}.parquet") for k in ("r", "s", "t")))
extract_shard(model, tokenizer, prompts, outputs, settings)
# VmHWM, not ru_maxrss: Linux carries the maxrss of the forking parent (a large pytest) over exec.
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def measured_and_planned(model_dir, tmp_path, config):
    """Peak RSS of one extraction job on the CPU, and the plan's peak for it."""
    # Twice: a first torch.compile on a machine whose compile cache is cold holds about 1.6 GiB more
    # (2227 MiB measured in a fresh CI run, against 582 MiB warm), which no plan can know; the
    # plan's figure is the warm one, as every job after a machine's first sees it.
    # A compile cache of its own, so the second run is warm whatever ran before.
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "HF_HUB_OFFLINE": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(config), str(model_dir),
                                 str(tmp_path / "x")], capture_output=True, text=True, cwd=REPO, timeout=900,
                                env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert run_plan(config, tmp_path / "plan.json", model_dir) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    return int(result.stdout.split()[-1]), plan["jobs"][0]["peak_bytes"]["cpu"]


@pytest.mark.e2e  # two extraction jobs as processes, each timed for its peak: make test only
def test_extraction_memory_estimate_is_within_a_quarter_of_the_measured_peak(tmp_path):
    from test_dispatch import char_tokenizer, tiny_config
    from transformers import AutoModelForCausalLM

    from neuronmap.model.loading import prepare_model
    source = tmp_path / "tiny"
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(source)
    char_tokenizer(source)
    prepare_model(str(source), tmp_path / "model")
    config = {"model": str(source), "device": "cpu", "relations": RELATIONS}
    measured, planned = measured_and_planned(tmp_path / "model", tmp_path, config)
    print(f"tiny Llama extraction: measured peak {measured / 2**20:.0f} MiB, planned {planned / 2**20:.0f} MiB")
    assert abs(planned - measured) <= 0.25 * measured


def test_a_local_run_on_the_cpu_asks_for_no_gpu(monkeypatch):
    import torch
    from neuronmap.workflow import gpus_here, gpus_per_job
    config = validated({"device": "cpu"})
    # A cluster job gets what its config asks for wherever the workflow was parsed ...
    assert gpus_per_job(config) == 1
    # ... and locally a CPU job holds no GPU, so the workstation's one-GPU pool must not serialize it.
    assert gpus_here(config, 1) == 0
    assert gpus_here({**config, "gpus_per_job": 2}, 2) == 2
    auto = validated({})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert gpus_here(auto, 1) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpus_here(auto, 1) == 1


def test_a_machine_without_a_gpu_driver_is_known_without_torch():
    """Every parse of the workflow asks (every SLURM job parses it): without a GPU driver's device
    node, torch's import (seconds) is spared and the answer is the CPU, as torch's would be."""
    from neuronmap.workflow import GPU_DRIVER_NODES
    if sys.platform != "linux" or any(Path(node).exists() for node in GPU_DRIVER_NODES):
        pytest.skip("this machine has a GPU driver")
    probe = "import sys; from neuronmap.workflow import runs_on_cpu; print(runs_on_cpu('auto'), 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.split() == ["True", "False"]


def test_decode_memory_holds_the_vocabulary_products_and_the_decoded_rows():
    from types import SimpleNamespace

    from neuronmap.plan.estimate import (ARROW_POOL, DECODE_CHUNK, DECODED_ROW_BYTES, DECODED_ROW_TOKEN_BYTES,
                                         TOKEN_STRING_BYTES, decode_bytes, decode_host_bytes)
    shape = SimpleNamespace(n_layers=2, hidden=8, intermediate=10, vocab=100)
    settings = SimpleNamespace(decode_top_n=3, decode_sites=("up", "act"), norm_gain=(False, True))
    # float32, no search: a layer's three vectors, the chunk's scores and the grouped top-k's copy.
    assert decode_bytes(shape, 4, settings, searched=False) == 3 * 10 * 8 * 4 + 2 * DECODE_CHUNK * 100 * 4
    # A bfloat16 search: its copy of the unembedding, the chunk's coarse scores and float32
    # candidates, and the rows of max(4 x 3, 3 + 32) = 35 candidates gathered for rescoring.
    assert decode_bytes(shape, 4, settings, searched=True) == (3 * 10 * 8 * 4 + 100 * 8 * 2 + DECODE_CHUNK * 100 * 6
                                                             + DECODE_CHUNK * 35 * 8 * 4)
    rows = 2 * 10 * 2 * 2
    assert decode_host_bytes(shape, settings) == rows * (3 * DECODED_ROW_TOKEN_BYTES + DECODED_ROW_BYTES) \
        + 100 * TOKEN_STRING_BYTES + ARROW_POOL


def test_the_calibration_job_is_planned_as_its_largest_regime(llama_2_7b, tmp_path):
    """One calibrate job: the weights, no statistics' compile, and the largest of its bare regimes'
    activations (extraction's batches without the reductions, the ablate regime's generation of
    configs_per_batch copies, a batch of whole prompts); its tokens about 128 prompts per regime."""
    from types import SimpleNamespace

    from neuronmap.plan import estimate
    config = {"model": str(llama_2_7b), "device": "cuda", "relations": RELATIONS}
    assert run_plan(config, tmp_path / "plan.json") == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    jobs = {job["kind"]: job for job in plan["jobs"]}
    calibrate, extract = jobs["calibrate"], jobs["extract"]
    assert calibrate["jobs"] == 1 and calibrate["weights_bytes"] == extract["weights_bytes"]
    assert 0 < calibrate["activation_bytes"] < calibrate["peak_bytes"]["0"] - calibrate["weights_bytes"]["0"]
    # The host holds the runtime only (no COMPILE, which the extract job's fused statistics add).
    assert calibrate["peak_bytes"]["cpu"] == estimate.RUNTIME
    assert extract["peak_bytes"]["cpu"] == estimate.RUNTIME + estimate.COMPILE
    # On a GPU configs_per_batch (auto) is 12: the ablate regime's generation is the largest.
    shape = SimpleNamespace(hidden=4096, intermediate=11008, heads=32, n_layers=32, kv_width=4096, vocab=32000)
    settings = PlanSettings.from_config(validated(config))
    lengths = {**plan["prompts"], "test_by_relation": {}}
    generation = estimate._generation_bytes(shape, 2, 12 * settings.extraction.batch_size,
                                            lengths["test_max"] + settings.ablation.evaluation.max_new_tokens)
    assert calibrate["activation_bytes"] == generation
    assert 0 < calibrate["forward_tokens"] and calibrate["flops"] > 0


def test_the_calibration_job_on_the_cpu_holds_its_weights_and_working_set(tmp_path):
    """On the CPU: weights, RUNTIME and the CPU working set, as the other forwarding jobs."""
    from test_dispatch import tiny_config

    from neuronmap.plan.estimate import CPU_WORKING_SET, RUNTIME
    source = tmp_path / "tiny"
    source.mkdir()
    tiny_config("llama").to_json_file(source / "config.json")
    assert run_plan({"model": str(source), "device": "cpu", "relations": RELATIONS}, tmp_path / "plan.json") == 0
    calibrate = json.loads((tmp_path / "plan.json").read_text())["jobs"][4]
    weights = calibrate["weights_bytes"]["cpu"]
    assert calibrate["kind"] == "calibrate" and calibrate["peak_bytes"]["cpu"] >= weights > 0
    assert calibrate["peak_bytes"]["cpu"] == (weights + RUNTIME + int(CPU_WORKING_SET * weights)
                                              + calibrate["activation_bytes"])


def test_the_report_compares_the_calibration_peak_with_its_plan():
    """cost/calibrate.parquet: one row per regime, each holding the job's peak so far; the ablate
    row repeats the baseline's measurement where configs_per_batch is 1 (counted once)."""
    import polars as pl

    from neuronmap.report.data import plan_against_cost
    MiB = 2 ** 20
    plan = {"tflops": 1.0, "jobs": [
        {"kind": "calibrate", "jobs": 1, "peak_bytes": {"cpu": 1368 * MiB}, "forward_tokens": 11509, "seconds": 0.1}]}
    calibration = pl.DataFrame({"stage": ["bare"] * 4, "job": ["extract", "baseline", "ablate", "whole"],
                                "prompts": [203, 172, 172, 128], "tokens": [2420, 2193, 2193, 4656],
                                "forwards": [17, 23, 23, 8], "seconds": [9.0, 10.7, 10.7, 13.5],
                                "peak_rss_mib": [1274.6, 1278.8, 1278.8, 1278.8]})
    cost = pl.DataFrame({"stage": ["extract"], "tokens": [12], "seconds": [2.0], "peak_rss_mib": [1200.0]})
    # The benchmark's sampled max_rss is the fallback; the job's own peak wins.
    times = pl.DataFrame({"stage": ["calibrate"], "max_rss_mb": [900.0]})
    row = plan_against_cost(plan, cost, times, calibration).row(0, named=True)
    assert row["stage"] == "calibrate" and row["measured peak MiB"] == 1278.8
    assert row["measured tokens"] == 2420 + 2193 + 4656 and row["measured s"] == pytest.approx(9.0 + 10.7 + 13.5)
    assert row["measured / planned"] == pytest.approx(1278.8 / 1368) and row["memory"] == "ok"
    # Without the calibration file, the benchmark's max_rss (MB) stands in.
    assert plan_against_cost(plan, cost, times)["measured peak MiB"][0] == pytest.approx(900e6 / MiB)


def test_the_report_flags_a_job_whose_peak_is_more_than_a_quarter_off_its_plan():
    import polars as pl

    from neuronmap.report.data import plan_against_cost
    MiB = 2 ** 20
    plan = {"tflops": 1.0, "jobs": [
        {"kind": "extract", "jobs": 2, "peak_bytes": {"cpu": 1000 * MiB}, "forward_tokens": 10, "seconds": 1.0},
        {"kind": "decode", "jobs": 1, "peak_bytes": {"cpu": 1643 * MiB}, "forward_tokens": 0, "seconds": 1.0},
        {"kind": "baseline", "jobs": 1, "peak_bytes": {"0": 9000 * MiB, "cpu": 2000 * MiB}, "forward_tokens": 5,
         "seconds": 1.0},
        {"kind": "ablate", "jobs": 1, "peak_bytes": {"cpu": 100 * MiB}, "forward_tokens": 5, "seconds": 1.0}]}
    cost = pl.DataFrame({"stage": ["extract"], "tokens": [12], "seconds": [2.0], "peak_rss_mib": [1200.0]})
    times = pl.DataFrame({"stage": ["extract", "decode", "baseline"], "max_rss_mb": [1100.0, 3835.0, 1400.0]})
    table = plan_against_cost(plan, cost, times)
    # The host's planned peak against the job's own peak (cost.parquet), else the benchmark's
    # max_rss (MB, sampled); no measurement, no verdict.
    assert table["measured / planned"].to_list() == pytest.approx(
        [1.2, 3835e6 / 2**20 / 1643, 1400e6 / 2**20 / 2000, None], nan_ok=True)
    assert table["memory"].to_list() == ["ok", "off plan by more than 25%", "off plan by more than 25%", ""]
    assert "memory" not in plan_against_cost(plan, cost).columns


MEASURE_DECODE = """
import sys
import torch
from neuronmap.io import tables
from neuronmap.io.parquet import write_table
from neuronmap.model.host_memory import return_large_buffers_to_the_os
from neuronmap.model.loading import load_for_job
from neuronmap.stats.decode import decode_neurons
from neuronmap.stats.settings import DecodeSettings
def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
settings = DecodeSettings.from_json(sys.argv[1])
return_large_buffers_to_the_os()  # as `neuronmap decode` does
model, tokenizer = load_for_job(sys.argv[2], settings.model, 2)
loaded = status("VmRSS:")
with torch.inference_mode():
    table = decode_neurons(model, tokenizer, settings.sites, settings.norm_gain, settings.top_n, search=settings.search)
write_table(table, sys.argv[3], tables.DECODED)
print(loaded, status("VmHWM:"))
"""


@pytest.mark.e2e  # a decode job as a process, timed for its peak: make test only
def test_decode_memory_estimate_is_within_a_quarter_of_the_measured_peak(tmp_path):
    """A small model whose vocabulary products outweigh its weights (64,000 tokens), so that the
    estimate of what decoding holds is what is checked: the growth past the loaded model, and
    the whole peak."""
    import transformers as tf
    from test_dispatch import char_tokenizer

    from neuronmap.model.loading import prepare_model
    from neuronmap.plan.estimate import RUNTIME
    from neuronmap.stats.settings import DecodeSettings
    source = tmp_path / "tiny"
    config = tf.LlamaConfig(hidden_size=64, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=64000, max_position_embeddings=64, bos_token_id=1,
                            eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(source)
    char_tokenizer(source)
    prepare_model(str(source), tmp_path / "model")
    run = {"model": str(source), "device": "cpu", "relations": RELATIONS, "decode": {"search": "float32"}}
    settings = DecodeSettings.from_config(validated(run)).to_json()
    result = subprocess.run([sys.executable, "-c", MEASURE_DECODE, settings, str(tmp_path / "model"),
                             str(tmp_path / "decoded.parquet")], capture_output=True, text=True, cwd=REPO,
                            timeout=900, env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
                                              "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    loaded, peak = map(int, result.stdout.split()[-2:])
    assert run_plan(run, tmp_path / "plan.json", tmp_path / "model") == 0
    decode = json.loads((tmp_path / "plan.json").read_text())["jobs"][3]
    # What decoding holds beside the loaded model: its vocabulary products and its rows.
    planned_growth = decode["peak_bytes"]["cpu"] - decode["weights_bytes"]["cpu"] - RUNTIME
    print(f"decode: loaded {loaded / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB; planned peak "
          f"{decode['peak_bytes']['cpu'] / 2**20:.0f} MiB, planned growth {planned_growth / 2**20:.0f} MiB")
    assert abs(planned_growth - (peak - loaded)) <= 0.25 * (peak - loaded)
    # The whole peak of a 35 MiB model is mostly the runtime, which is not the model's: the same
    # process measured 438 MiB loaded here and 556 MiB in a CI clone (2026-12-07), against
    # RUNTIME's 330. The whole peaks of the default run's jobs are compared with their plan in its
    # report (plan_against_cost); here only a bound that catches a runtime grown out of hand.
    assert abs(decode["peak_bytes"]["cpu"] - peak) <= 0.4 * peak


def test_explain_cost_per_unit_follows_the_settings(tmp_path):
    """The explain stage's tokens per unit: the scorer's prompts are 3 descriptions x 2 x
    score_contexts, each one template, one excerpt and one description; a longer window adds
    2 tokens per shown excerpt and per scored prompt; time at the configured rate."""
    from neuronmap.config.schema import defaults
    from neuronmap.plan.explain_cost import explain_cost
    explain = {**defaults()["explain"], "enabled": True}
    (tmp_path / "t.txt").write_text("x" * 400)  # 100 tokens at 4 characters each
    explain |= {"prompt_template": str(tmp_path / "t.txt"), "score_template": str(tmp_path / "t.txt")}
    base = explain_cost(explain, parameters=10 ** 9, tflops=1.0)
    wider = explain_cost({**explain, "window": explain["window"] + 1}, parameters=10 ** 9, tflops=1.0)
    shown = explain["top_examples"] + explain["quantile_examples"]
    assert base["scorer_prompts"] == base["scorer_completion_tokens"] == 6 * explain["score_contexts"]
    assert wider["explainer_prompt_tokens"] - base["explainer_prompt_tokens"] == 2 * shown
    assert wider["scorer_prompt_tokens"] - base["scorer_prompt_tokens"] == 2 * base["scorer_prompts"]
    assert base["explainer_prompt_tokens"] > 100 + shown * (2 * explain["window"] + 1)
    assert base["tokens_per_second"] == 500.0 and base["rate_from"] == "plan.tflops"  # 1e12 / (2 x 1e9)
    total = sum(base[k] for k in ("explainer_prompt_tokens", "explainer_completion_tokens", "scorer_prompt_tokens",
                                  "scorer_completion_tokens"))
    assert base["seconds_per_unit"] == pytest.approx(total / 500.0)
    served = explain_cost({**explain, "tokens_per_second": 2000.0}, parameters=10 ** 9, tflops=1.0)
    assert served["rate_from"] == "explain.tokens_per_second" and served["seconds_per_unit"] == pytest.approx(total / 2000)
    shipped = explain_cost({**explain, "prompt_template": None, "score_template": None}, 10 ** 9, 1.0)
    assert shipped["scorer_prompt_tokens"] > base["scorer_prompts"] * (2 * explain["window"] + 1)
