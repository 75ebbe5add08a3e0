"""The Parquet contracts between stages. docs/parquet.md describes every column; the tests
check that every file the workflow writes has exactly these schemas."""

import pyarrow as pa

PROMPTS = pa.schema([
    ("prompt_id", pa.string()),
    ("relation", pa.string()),
    ("subject", pa.string()),
    ("object", pa.string()),
    ("objects", pa.list_(pa.string())),
    ("template", pa.int32()),
    ("text", pa.string()),
    ("split", pa.string()),
    ("shard", pa.int32()),
])


def responses(value_type: pa.DataType) -> pa.Schema:
    return pa.schema([
        ("site", pa.string()),
        ("layer", pa.int32()),
        ("prompt_id", pa.string()),
        ("n_tokens", pa.int32()),
        ("values", pa.list_(value_type)),
    ])


EXPERTISE = pa.schema([
    ("site", pa.string()),
    ("layer", pa.int32()),
    ("unit", pa.int32()),
    ("ap", pa.float64()),
    ("on_p50", pa.float32()),
    ("on_p90", pa.float32()),
    ("off_mean", pa.float32()),
    ("rank", pa.int64()),
])

EXPERTISE_PROMPTS = pa.schema([
    ("prompt_id", pa.string()),
    ("relation", pa.string()),
    ("label", pa.bool_()),
])

SELECTED_UNITS = pa.schema([
    ("relation", pa.string()),
    ("site", pa.string()),
    ("layer", pa.int32()),
    ("unit", pa.int32()),
    ("rank", pa.int64()),
    ("ap", pa.float64()),
])

OVERLAP = pa.schema([
    ("k", pa.int64()),
    ("relation_a", pa.string()),
    ("relation_b", pa.string()),
    ("shared", pa.int64()),
    ("jaccard", pa.float64()),
])

PREDICTIONS = pa.schema([
    ("ablated_relation", pa.string()),
    ("k", pa.int64()),
    ("control", pa.string()),
    ("seed", pa.int64()),
    ("prompt_id", pa.string()),
    ("eval_relation", pa.string()),
    ("generated", pa.string()),
    ("correct", pa.bool_()),
])

ABLATION = pa.schema([
    ("ablated_relation", pa.string()),
    ("k", pa.int64()),
    ("control", pa.string()),
    ("seed", pa.int64()),
    ("eval_relation", pa.string()),
    ("n", pa.int64()),
    ("correct", pa.int64()),
    ("accuracy", pa.float64()),
    ("baseline_accuracy", pa.float64()),
    ("relative_drop", pa.float64()),
])
