"""The benchmark scripts run (tiny shapes on the CPU), so they cannot rot between GPU runs; the
marginal ratio and fixed cost they report are computed as documented."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.e2e  # a benchmark script as a process, the model loaded: make test only
def test_gpu_benchmark_smoke_mode_prints_its_json_line():
    result = subprocess.run([sys.executable, "bench/gpu.py", "--smoke"], cwd=REPO, capture_output=True, text=True,
                            timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["bench"] == "gpu" and line["smoke"] and line["identical_answers"]
    assert {"extract_marginal_ratio", "extract_fixed_s", "identical_answers_in_model_dtype"} <= set(line)
    assert line["configurations"] >= 12 and line["configs_per_batch"] >= 12
    for key in ("extract_ratio", "sweep_speedup", "decode_seconds", "load_seconds"):
        assert line[key] > 0, key
    assert {"gpu", "torch", "projection_hours"} <= set(line)


def run_bench(*args, timeout=900):
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_marginal_ratio_and_fixed_cost_from_two_sizes():
    sys.path.insert(0, str(REPO / "bench"))
    from marginal import interleaved, marginal
    # The floor: 1 s + 1 ms a token; the stage: 3 s + 1.5 ms a token.
    figures = marginal((1000, 3000), (2.0, 4.0), (4.5, 7.5))
    assert figures["marginal_ratio"] == pytest.approx(1.5) and figures["fixed_s"] == pytest.approx(3.0)
    assert figures["floor_fixed_s"] == pytest.approx(1.0) and figures["marginal_tokens"] == [1000, 3000]
    with pytest.raises(ValueError):
        marginal((10, 10), (1.0, 1.0), (1.0, 1.0))
    calls = []

    def measure(size):
        calls.append(size)
        return {"floor": size + len(calls) % 2, "stage": 2.0 * size}
    medians = interleaved(measure, (1, 2), repeats=3)
    assert calls == [1, 2, 1, 2, 1, 2]  # every size in every round: drifts hit both alike
    assert medians[1] == {"floor": 2, "stage": 2.0} and medians[2]["stage"] == 4.0


def test_gpu_check_script_is_valid_bash_and_names_the_three_shapes():
    script = (REPO / "bench" / "gpu_check.sh").read_text()
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_check.sh")]).returncode == 0
    for needle in ("bench/gpu.py --prompts", "llama-3.1-8b.json", "smollm2-135m.json", "NEURONMAP_GPU_CHECK"):
        assert needle in script


@pytest.mark.e2e  # a benchmark script as a process: make test only
def test_corpus_benchmark_reports_its_marginal_ratio_and_fixed_cost():
    line = run_bench("bench/corpus.py", "--random-config", "bench/configs/tiny-llama.json", "--contexts", "32",
                     "--repeats", "1")
    assert line["bench"] == "corpus" and line["records_ratio"] > 0
    assert {"marginal_records_ratio", "fixed_s", "floor_fixed_s", "marginal_tokens"} <= set(line)


@pytest.mark.e2e  # a benchmark script as a process, the model loaded: make test only
def test_extract_benchmark_reports_both_regimes():
    line = run_bench("bench/extract.py", "--prompts", "8", "--repeats", "1", "--rss-prompts", "0")
    assert set(line["regimes"]) == {"whole", "query"}
    for regime in line["regimes"].values():
        assert regime["ratio"] > 0 and {"marginal_ratio", "fixed_s", "floor_fixed_s"} <= set(regime)
        # The default pooling, and beside it three (three times the responses written).
        assert regime["ratio_three_poolings"] > 0 and {"marginal_ratio_three_poolings", "fixed_s_three_poolings"} <= set(regime)
    # The workflow's regime forwards fewer tokens: each prefix once.
    assert line["regimes"]["query"]["tokens"] < line["regimes"]["whole"]["tokens"]
