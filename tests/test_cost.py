"""What a run cost: forwarded token positions are counted as the model sees them, and
cost.parquet's rates and ratio are those of the jobs' own numbers."""

import polars as pl
import pytest
import torch

from neuronmap.io import tables
from neuronmap.model.cost import (ForwardCount, cached_generation, cached_queries, calibration, cost_table,
                                 counting_forwards, job_cost)


def test_every_forward_pass_is_counted_and_the_hook_removed(tiny_llama):
    with counting_forwards(tiny_llama) as count:
        tiny_llama(input_ids=torch.ones(3, 7, dtype=torch.long))
        tiny_llama.generate(torch.ones(2, 5, dtype=torch.long), max_new_tokens=3, do_sample=False, pad_token_id=0)
    # 3 x 7, then a prefill of 2 x 5 and two one-token steps of 2 rows.
    assert (count.tokens, count.forwards) == (21 + 10 + 2 + 2, 4)
    assert count.seconds > 0
    with counting_forwards(tiny_llama) as again:
        pass
    tiny_llama(input_ids=torch.ones(1, 4, dtype=torch.long))
    assert again.tokens == 0 and count.tokens == 35


def test_cost_table_rates_and_ratio_to_bare_forward():
    jobs = pl.concat([
        job_cost("extract", "a-0", 10, type("C", (), {"tokens": 300, "forwards": 5, "seconds": 2.0})()),
        job_cost("extract", "a-1", 10, type("C", (), {"tokens": 100, "forwards": 3, "seconds": 2.0})()),
        job_cost("ablate", "a", 40, type("C", (), {"tokens": 1000, "forwards": 9, "seconds": 20.0})()),
    ])
    bare = job_cost("bare", "calibrate", 8, type("C", (), {"tokens": 500, "forwards": 2, "seconds": 1.0})())
    cost = cost_table(jobs, bare)
    assert cost.columns == tables.COST.names
    extract = cost.row(0, named=True)
    assert (extract["stage"], extract["jobs"], extract["tokens"], extract["seconds"]) == ("extract", 2, 400, 4.0)
    assert extract["tokens_per_s"] == pytest.approx(100.0) and extract["tokens_per_prompt"] == pytest.approx(20.0)
    assert extract["ratio_to_bare"] == pytest.approx(5.0)  # 500 tokens/s bare against 100
    assert cost.row(1, named=True)["ratio_to_bare"] == pytest.approx(10.0)


PEAK_PROBE = """
from neuronmap.model.cost import job_cost
count = type("C", (), {"tokens": 1, "forwards": 1, "seconds": 1.0})()
before = job_cost("extract", "a", 1, count)
buffer = bytearray(200 * 2**20)
buffer[::4096] = b"x" * len(buffer[::4096])  # touch every page
del buffer
after = job_cost("extract", "b", 1, count)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(before["peak_rss_mib"][0], after["peak_rss_mib"][0], int(hwm.split()[1]) / 1024)
"""


def test_a_job_reads_its_peak_memory_from_the_kernel():
    """The peak a job records is the process's high-water mark: it grows past a buffer just
    freed (which the benchmark files, sampling every 30 s, would miss in a short job). In a
    process of its own, as a job is: a test worker's mark may already be above anything this
    test adds; the child's starts afresh (getrusage's would carry the worker's over)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", PEAK_PROBE], capture_output=True, text=True, check=True).stdout
    before_mib, after_mib, kernel_mib = map(float, out.split())
    assert after_mib >= before_mib + 150 and after_mib == pytest.approx(kernel_mib, rel=0.01)
    count = type("C", (), {"tokens": 1, "forwards": 1, "seconds": 1.0})()
    before, after = (job_cost("extract", job, 1, count).with_columns(peak_rss_mib=pl.lit(mib))
                     for job, mib in (("a", before_mib), ("b", after_mib)))
    cost = cost_table(pl.concat([before, after]), before.with_columns(stage=pl.lit("bare")))
    assert cost["peak_rss_mib"][0] == after["peak_rss_mib"][0]


def _cost(stage, job, prompts, tokens, forwards, seconds):
    return job_cost(stage, job, prompts, ForwardCount(tokens, forwards, seconds))


def test_each_stage_is_compared_with_the_floor_of_its_own_regime():
    jobs = pl.concat([_cost("extract", "a-0", 10, 400, 5, 4.0), _cost("baseline", "baseline", 20, 300, 9, 3.0),
                      _cost("corpus", "shard-0", 5, 1000, 2, 2.0)])
    bare = pl.concat([_cost("bare", "extract", 10, 200, 5, 1.0), _cost("bare", "baseline", 20, 300, 9, 1.5),
                      _cost("bare", "ablate", 20, 300, 9, 1.5), _cost("bare", "whole", 8, 1000, 1, 1.0)])
    cost = cost_table(jobs, bare)
    assert cost.columns == tables.COST.names
    assert cost["floor"].to_list() == ["extract", "baseline", "whole"]
    assert cost["bare_tokens_per_s"].to_list() == pytest.approx([200.0, 200.0, 1000.0])
    assert cost["ratio_to_bare"].to_list() == pytest.approx([2.0, 2.0, 2.0])


@pytest.fixture(scope="module")
def run_prompts():
    from neuronmap.prepare.prompts import build_prompts
    from neuronmap.prepare.relations import find_relation_file, load_relation
    from neuronmap.prepare.settings import PromptSettings

    from conftest import RELATIONS
    relations = [load_relation(find_relation_file(RELATIONS, name), name)
                 for name in ("country_capital_city", "verb_past_tense")]
    return build_prompts(relations, PromptSettings.defaults(max_facts=24, test_facts=8)).sort("prompt_id")


def test_the_extract_floor_forwards_what_extraction_forwards(smollm2, run_prompts, tmp_path):
    from neuronmap.extract.engine import ExtractionOutputs, extract_shard
    from neuronmap.extract.settings import ExtractionSettings
    model, tokenizer = smollm2
    shard = run_prompts.filter((pl.col("split") == "identification") & (pl.col("relation") == "verb_past_tense"))
    settings = ExtractionSettings.defaults(sites=("act",), poolings=("mean",), batch_size=4)
    with counting_forwards(model) as stage:
        outputs = ExtractionOutputs(tmp_path / "r.parquet", tmp_path / "s.parquet", tmp_path / "t.parquet")
        extract_shard(model, tokenizer, shard, outputs, settings)
    with torch.inference_mode():
        bare = cached_queries(model, tokenizer, shard["prefix"].to_list(), shard["text"].to_list(), 4,
                              settings.batch_tokens)
    assert (bare.tokens, bare.forwards) == (stage.tokens, stage.forwards)


def test_the_evaluation_floor_forwards_what_the_sweep_forwards(smollm2, run_prompts):
    from neuronmap.ablate.evaluation import generate_sweep
    from neuronmap.ablate.settings import EvaluationSettings
    from neuronmap.model.deactivation import Deactivation
    model, tokenizer = smollm2
    test = run_prompts.filter(pl.col("split") == "test")
    settings = EvaluationSettings.defaults(batch_size=4, max_new_tokens=3)
    with counting_forwards(model) as stage:
        generate_sweep(model, tokenizer, test["prefix"].to_list(), test["text"].to_list(),
                       [Deactivation.constant({})] * 2, settings, configs_per_batch=2)
    with torch.inference_mode():
        bare = cached_generation(model, tokenizer, test["prefix"].to_list(), test["text"].to_list(), 4, 3, repeats=2)
    assert (bare.tokens, bare.forwards) == (stage.tokens, stage.forwards)


def test_calibration_writes_one_floor_per_regime(smollm2, run_prompts):
    from neuronmap.extract.settings import CalibrationSettings
    model, tokenizer = smollm2
    settings = CalibrationSettings.defaults(batch_size=4, max_new_tokens=2, configs_per_batch=2)
    bare = calibration(model, tokenizer, run_prompts, settings)
    assert bare.columns == tables.JOB_COST.names
    assert bare["stage"].to_list() == ["bare"] * 4
    assert bare["job"].to_list() == ["extract", "baseline", "ablate", "whole"]
    ablate, baseline = bare.row(2, named=True), bare.row(1, named=True)
    assert ablate["prompts"] == 2 * baseline["prompts"] and ablate["tokens"] > baseline["tokens"]
    assert (bare["seconds"] > 0).all() and (bare["tokens"] > 0).all()
