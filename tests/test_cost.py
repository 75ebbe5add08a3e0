"""What a run cost: forwarded token positions are counted as the model sees them, and
cost.parquet's rates and ratio are those of the jobs' own numbers."""

import polars as pl
import pytest
import torch

from neuronmap.io import tables
from neuronmap.model.cost import counting_forwards, cost_table, job_cost


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
