"""bench/gpu.py runs (a tiny shape on the CPU), so the GPU benchmark cannot rot between GPU runs."""

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
    assert line["configurations"] >= 12 and line["configs_per_batch"] >= 12
    for key in ("extract_ratio", "sweep_speedup", "decode_seconds", "load_seconds"):
        assert line[key] > 0, key
    assert {"gpu", "torch", "projection_hours"} <= set(line)
