"""The Parquet contracts between stages. docs/parquet.md describes every column; the tests
check that every file the workflow writes has exactly these schemas."""

import numpy as np
import pyarrow as pa

PROMPTS = pa.schema([
    ("prompt_id", pa.string()),
    ("relation", pa.string()),
    ("subject", pa.string()),
    ("object", pa.string()),
    ("objects", pa.list_(pa.string())),
    ("template", pa.int32()),
    ("demo_set", pa.int32()),
    ("prefix", pa.string()),
    ("query", pa.string()),
    ("text", pa.string()),
    ("split", pa.string()),
    ("shard", pa.int32()),
])

# A prompt_id is `<relation>/<fact index>/t<template>`: the prompts of one fact share the rest.
FACT_OF_PROMPT = r"/t\d+$"


def responses(value_type: pa.DataType, widths: dict[str, int], n_layers: int, poolings) -> pa.Schema:
    """prompt_id, n_tokens, then `<pooling>/<site>/<layer>` columns: each value is the
    little-endian array of one prompt's unit responses, as fixed-size binary (docs/parquet.md)."""
    dtype = np.dtype(value_type.to_pandas_dtype())
    fields = [pa.field("prompt_id", pa.string()), pa.field("n_tokens", pa.int32())]
    for pooling in poolings:
        for site, width in widths.items():
            metadata = {"dtype": dtype.name, "units": str(width)}
            fields += [pa.field(f"{pooling}/{site}/{layer:03d}", pa.binary(width * dtype.itemsize),
                                nullable=False, metadata=metadata) for layer in range(n_layers)]
    return pa.schema(fields)


# One unit's expertise for one relation: a block's rows carry the relation, a relation's file the rank.
_UNIT_EXPERTISE = [
    ("site", pa.string()),
    ("layer", pa.int32()),
    ("unit", pa.int32()),
    ("ap", pa.float64()),
    ("separation", pa.float64()),
    ("on_p50", pa.float32()),
    ("on_p90", pa.float32()),
    ("off_mean", pa.float32()),
]

EXPERTISE_BLOCK = pa.schema([("relation", pa.string()), *_UNIT_EXPERTISE])

EXPERTISE = pa.schema([*_UNIT_EXPERTISE, ("rank", pa.int64())])

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
    ("separation", pa.float64()),
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

NEURON_STATS_PARTIAL = pa.schema([
    ("site", pa.string()),
    ("layer", pa.int32()),
    ("unit", pa.int32()),
    ("count", pa.int64()),
    ("mean", pa.float64()),
    ("m2", pa.float64()),
    ("min", pa.float32()),
    ("max", pa.float32()),
    ("n_positive", pa.int64()),
    ("n_active", pa.int64()),
])

NEURON_STATS = pa.schema([
    ("site", pa.string()),
    ("layer", pa.int32()),
    ("unit", pa.int32()),
    ("count", pa.int64()),
    ("mean", pa.float64()),
    ("var", pa.float64()),
    ("min", pa.float32()),
    ("max", pa.float32()),
    ("frac_positive", pa.float64()),
    ("frac_active", pa.float64()),
])

TOP_ACTIVATIONS_PARTIAL = pa.schema([
    ("site", pa.string()),
    ("layer", pa.int32()),
    ("unit", pa.int32()),
    ("value", pa.float32()),
    ("prompt_id", pa.string()),
    ("position", pa.int32()),
    ("token", pa.string()),
])

TOP_ACTIVATIONS = pa.schema([
    ("site", pa.string()),
    ("layer", pa.int32()),
    ("unit", pa.int32()),
    ("rank", pa.int32()),
    ("prompt_id", pa.string()),
    ("position", pa.int32()),
    ("token", pa.string()),
    ("value", pa.float32()),
])

# --- Analyses of ablations, languages, decoding and sparsity ---

LANGUAGE_PROMPTS = pa.schema(list(PROMPTS) + [("language", pa.string())])

LANGUAGE_PREDICTIONS = pa.schema(list(PREDICTIONS) + [("language", pa.string())])

# Accuracy of one configuration on one evaluated relation, computed by ablate.sweep.paired_table.
_ACCURACY_KEY = [
    ("ablated_relation", pa.string()),
    ("k", pa.int64()),
    ("control", pa.string()),
    ("seed", pa.int64()),
    ("eval_relation", pa.string()),
]
_ACCURACY = [
    ("n", pa.int64()),
    ("correct", pa.int64()),
    ("accuracy", pa.float64()),
    ("baseline_accuracy", pa.float64()),
    ("relative_drop", pa.float64()),
]

_PAIRED = [
    ("lost", pa.int64()),
    ("gained", pa.int64()),
    ("difference", pa.float64()),
    ("ci_low", pa.float64()),
    ("ci_high", pa.float64()),
    ("p_value", pa.float64()),
    ("q_value", pa.float64()),
    ("significant", pa.bool_()),
]

SIGNIFICANCE = pa.schema(_ACCURACY_KEY + _ACCURACY + _PAIRED)

LANGUAGE_ABLATION = pa.schema(_ACCURACY_KEY + [("language", pa.string())] + _ACCURACY + _PAIRED)

SWEEP = pa.schema([
    ("ablated_relation", pa.string()),
    ("eval_relation", pa.string()),
    ("k", pa.int64()),
    ("n", pa.int64()),
    ("baseline_accuracy", pa.float64()),
    ("top_accuracy", pa.float64()),
    ("top_relative_drop", pa.float64()),
    ("top_difference", pa.float64()),
    ("top_ci_low", pa.float64()),
    ("top_ci_high", pa.float64()),
    ("top_p_value", pa.float64()),
    ("top_q_value", pa.float64()),
    ("top_significant", pa.bool_()),
    ("random_seeds", pa.int64()),
    ("random_accuracy_mean", pa.float64()),
    ("random_accuracy_sd", pa.float64()),
    ("random_accuracy_min", pa.float64()),
    ("random_accuracy_max", pa.float64()),
    ("random_relative_drop_mean", pa.float64()),
    ("random_significant_seeds", pa.int64()),
])

# Per relation and k (and pooled: relation null), the top-k against the random controls on the
# same test prompts (ablate/verdicts.py).
VERDICTS = pa.schema([
    ("relation", pa.string()),
    ("k", pa.int64()),
    ("n", pa.int64()),
    ("facts", pa.int64()),
    ("seeds", pa.int64()),
    ("baseline_accuracy", pa.float64()),
    ("top_accuracy", pa.float64()),
    ("random_accuracy", pa.float64()),
    ("random_accuracy_sd", pa.float64()),
    ("excess_drop", pa.float64()),
    ("ci_low", pa.float64()),
    ("ci_high", pa.float64()),
    ("se", pa.float64()),
    ("p_value", pa.float64()),
    ("q_value", pa.float64()),
    ("verdict", pa.string()),
    ("detectable_drop", pa.float64()),
])

# The selection checks' map step (stats/labelings.py): per labeling other than the relations'
# own, its best units of one block of layers (every unit for a half).
LABELING_BLOCK = pa.schema([
    ("check", pa.string()),
    ("draw", pa.int32()),
    ("half", pa.int32()),
    ("relation", pa.string()),
    ("other", pa.string()),
    ("site", pa.string()),
    ("layer", pa.int32()),
    ("unit", pa.int32()),
    ("ap", pa.float64()),
    ("separation", pa.float64()),
])

VERSATILITY = pa.schema([
    ("reading", pa.string()),
    ("k", pa.int64()),
    ("relation_a", pa.string()),
    ("relation_b", pa.string()),
    ("shared", pa.int64()),
    ("expected_independent", pa.float64()),
    ("permutations", pa.int64()),
    ("null_mean", pa.float64()),
    ("null_sd", pa.float64()),
    ("null_min", pa.int64()),
    ("null_max", pa.int64()),
    ("p_value", pa.float64()),
    ("q_value", pa.float64()),
    ("verdict", pa.string()),
])

STABILITY = pa.schema([
    ("relation", pa.string()),
    ("split", pa.int32()),
    ("k", pa.int64()),
    ("positives_a", pa.int64()),
    ("positives_b", pa.int64()),
    ("shared", pa.int64()),
    ("expected_independent", pa.float64()),
    ("fraction", pa.float64()),
    ("p_value", pa.float64()),
    ("ap_spearman", pa.float64()),
])

PERPLEXITY = pa.schema([
    ("ablated_relation", pa.string()),
    ("k", pa.int64()),
    ("control", pa.string()),
    ("seed", pa.int64()),
    ("tokens", pa.int64()),
    ("nll", pa.float64()),
    ("perplexity", pa.float64()),
    ("baseline_perplexity", pa.float64()),
    ("ratio", pa.float64()),
])

DECODED = pa.schema([
    ("site", pa.string()),
    ("layer", pa.int32()),
    ("unit", pa.int32()),
    ("norm_gain", pa.bool_()),
    ("token_ids", pa.list_(pa.int32())),
    ("tokens", pa.list_(pa.string())),
    ("scores", pa.list_(pa.float32())),
])

SHARED_UNITS = pa.schema([
    ("k", pa.int64()),
    ("relation_a", pa.string()),
    ("relation_b", pa.string()),
    ("site", pa.string()),
    ("layer", pa.int32()),
    ("unit", pa.int32()),
])

SPARSITY = pa.schema([
    ("site", pa.string()),
    ("layer", pa.int32()),
    ("units", pa.int64()),
    ("tokens", pa.int64()),
    ("firing_rate_mean", pa.float64()),
    ("firing_rate_median", pa.float64()),
    ("active_rate_mean", pa.float64()),
    ("active_rate_median", pa.float64()),
    ("dead", pa.int64()),
    ("never_active", pa.int64()),
    ("rare", pa.int64()),
])

DEAD_UNITS = pa.schema([
    ("site", pa.string()),
    ("layer", pa.int32()),
    ("unit", pa.int32()),
    ("count", pa.int64()),
    ("max", pa.float32()),
    ("frac_positive", pa.float64()),
    ("frac_active", pa.float64()),
    ("dead", pa.bool_()),
    ("never_active", pa.bool_()),
])

# What one model-running job forwarded and how long it took (model/cost.py); the calibration
# job's row (stage "bare") is a bare forward pass over prompts.
JOB_COST = pa.schema([
    ("stage", pa.string()),
    ("job", pa.string()),
    ("prompts", pa.int64()),
    ("tokens", pa.int64()),
    ("forwards", pa.int64()),
    ("seconds", pa.float64()),
    ("peak_rss_mib", pa.float64()),
])

COST = pa.schema([
    ("stage", pa.string()),
    ("jobs", pa.int64()),
    ("prompts", pa.int64()),
    ("tokens", pa.int64()),
    ("forwards", pa.int64()),
    ("seconds", pa.float64()),
    ("tokens_per_prompt", pa.float64()),
    ("tokens_per_s", pa.float64()),
    ("floor", pa.string()),
    ("bare_tokens_per_s", pa.float64()),
    ("ratio_to_bare", pa.float64()),
    ("peak_rss_mib", pa.float64()),
])


# The corpus pass (docs/parquet.md, "Corpus records").
CONTEXTS = pa.schema([
    ("context_id", pa.int64()),
    ("document", pa.string()),
    ("label", pa.string()),
    ("part", pa.int32()),
    ("shard", pa.int32()),
    ("n_tokens", pa.int32()),
    ("token_ids", pa.list_(pa.int32())),
    ("heldout", pa.bool_()),
])

_UNIT_KEY = [("site", pa.string()), ("layer", pa.int32()), ("unit", pa.int32())]
_HISTOGRAM = [("hist_bins", pa.list_(pa.int16())), ("hist_counts", pa.list_(pa.int64()))]


def _required(fields) -> pa.Schema:
    """Columns (and list items) that never hold a null, written as Parquet's `required`: without
    definition levels, which took a third of the time to write a records job's 9.3 M extreme rows."""
    def field(name, kind):
        if pa.types.is_list(kind):
            kind = pa.list_(pa.field("element", kind.value_type, nullable=False))
        return pa.field(name, kind, nullable=False)
    return pa.schema([field(name, kind) for name, kind in fields])


# A records job's histograms as runs: the counts of every bin from a unit's first non-empty bin to
# its last (empty bins between included, 7% of them on the default model), so one list per unit,
# not two. int32: a shard holds at most 2^31 - 1 tokens (corpus/engine.py).
RECORDS_PARTIAL = _required([
    *_UNIT_KEY,
    ("count", pa.int64()),
    ("mean", pa.float64()),
    ("m2", pa.float64()),
    ("m3", pa.float64()),
    ("m4", pa.float64()),
    ("min", pa.float32()),
    ("max", pa.float32()),
    ("n_positive", pa.int64()),
    ("n_active", pa.int64()),
    ("hist_first", pa.int16()),
    ("hist_run", pa.list_(pa.int32())),
])

EXTREMES_PARTIAL = _required([
    *_UNIT_KEY,
    ("kind", pa.string()),
    ("value", pa.float32()),
    ("context_id", pa.int64()),
    ("position", pa.int32()),
])

RECORD_QUANTILES = ("p1", "p10", "p50", "p90", "p99", "p99_9", "p99_99")

UNIT_RECORDS = pa.schema([
    *_UNIT_KEY,
    ("count", pa.int64()),
    ("mean", pa.float64()),
    ("var", pa.float64()),
    ("skewness", pa.float64()),
    ("kurtosis", pa.float64()),
    ("min", pa.float32()),
    ("max", pa.float32()),
    ("frac_positive", pa.float64()),
    ("frac_active", pa.float64()),
    *[(name, pa.float64()) for name in RECORD_QUANTILES],
    *_HISTOGRAM,
])

UNIT_EXAMPLES = pa.schema([
    *_UNIT_KEY,
    ("kind", pa.string()),
    ("rank", pa.int32()),
    ("value", pa.float32()),
    ("context_id", pa.int64()),
    ("document", pa.string()),
    ("label", pa.string()),
    ("position", pa.int32()),
    ("token_id", pa.int32()),
    ("token", pa.string()),
    ("before", pa.string()),
    ("after", pa.string()),
])

PEAK_TOKENS = pa.schema([
    *_UNIT_KEY,
    ("rank", pa.int32()),
    ("token_id", pa.int32()),
    ("token", pa.string()),
    ("contexts", pa.int64()),
    ("mean_value", pa.float64()),
])

# Labelled corpora (labels stage): per label and unit, merged exactly like the other records.
LABEL_RECORDS_PARTIAL = pa.schema([
    *_UNIT_KEY,
    ("label", pa.string()),
    ("tokens", pa.int64()),
    ("contexts", pa.int64()),
    ("sum", pa.float64()),
    ("n_positive", pa.int64()),
])

LABEL_RECORDS = pa.schema([
    *_UNIT_KEY,
    ("label", pa.string()),
    ("tokens", pa.int64()),
    ("contexts", pa.int64()),
    ("mean", pa.float64()),
    ("firing_rate", pa.float64()),
    ("n_positive", pa.int64()),
])

LABEL_EXPERTISE = pa.schema([
    *_UNIT_KEY,
    ("label", pa.string()),
    ("ap", pa.float64()),
    ("separation", pa.float64()),
    ("rank", pa.int64()),
])

LABEL_UNITS = pa.schema([
    ("method", pa.string()),
    ("label", pa.string()),
    *_UNIT_KEY,
    ("score", pa.float64()),
    ("rank", pa.int32()),
])

LABEL_OVERLAP = pa.schema([
    ("label", pa.string()),
    ("lape_units", pa.int64()),
    ("ap_units", pa.int64()),
    ("shared", pa.int64()),
    ("population", pa.int64()),
    ("expected", pa.float64()),
    ("p_value", pa.float64()),
])

LABEL_PERPLEXITY_CONTEXTS = pa.schema([
    ("method", pa.string()),
    ("ablated_label", pa.string()),
    ("control", pa.string()),
    ("seed", pa.int64()),
    ("units", pa.int64()),
    ("context_id", pa.int64()),
    ("eval_label", pa.string()),
    ("tokens", pa.int64()),
    ("nll", pa.float64()),
])

LABEL_PERPLEXITY = pa.schema([
    ("method", pa.string()),
    ("ablated_label", pa.string()),
    ("units", pa.int64()),
    ("eval_label", pa.string()),
    ("contexts", pa.int64()),
    ("tokens", pa.int64()),
    ("baseline_perplexity", pa.float64()),
    ("selected_ratio", pa.float64()),
    ("random_ratio", pa.float64()),
    ("excess", pa.float64()),
    ("ci_low", pa.float64()),
    ("ci_high", pa.float64()),
    ("p_value", pa.float64()),
    ("q_value", pa.float64()),
    ("significant", pa.bool_()),
    ("excess_per_unit", pa.float64()),
])

# The explain stage: each unit's description by each explainer, and each description's detection
# score on held-out contexts (docs/parquet.md, "Explanations").
EXPLANATIONS = pa.schema([
    *_UNIT_KEY,
    ("explainer", pa.string()),
    ("explanation", pa.string()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
])

# What an explain job hands its score job: each unit's held-out excerpts (docs/parquet.md).
EXPLAIN_SETS = pa.schema([
    *_UNIT_KEY,
    ("context_id", pa.int64()),
    ("activating", pa.bool_()),
    ("peak", pa.float32()),
    ("tokens", pa.list_(pa.string())),
])

EXPLAIN_SCORES = pa.schema([
    *_UNIT_KEY,
    ("explainer", pa.string()),
    ("explanation_of", pa.string()),
    ("scorer", pa.string()),
    ("contexts", pa.int32()),
    ("activating", pa.int32()),
    ("true_positive_rate", pa.float64()),
    ("true_negative_rate", pa.float64()),
    ("balanced_accuracy", pa.float64()),
    ("auc", pa.float64()),
])

# The atlas's index (atlas stage): one row per unit, with what every stage that ran says about it.
# The file also has the explanation, `ap:<relation>` and `rate:<label>` columns where those stages
# ran: atlas_units().
ATLAS_UNITS = pa.schema([
    *_UNIT_KEY,
    ("count", pa.int64()),
    ("mean", pa.float64()),
    ("var", pa.float64()),
    ("skewness", pa.float64()),
    ("kurtosis", pa.float64()),
    ("min", pa.float32()),
    ("max", pa.float32()),
    ("frac_positive", pa.float64()),
    ("frac_active", pa.float64()),
    *[(name, pa.float64()) for name in RECORD_QUANTILES],
    ("peak_token", pa.string()),
    ("peak_tokens", pa.list_(pa.string())),
    ("decoded_token", pa.string()),
    ("decoded_tokens", pa.list_(pa.string())),
    ("lape", pa.list_(pa.string())),
    ("ap_label", pa.list_(pa.string())),
])


# The atlas's columns from the explain stage, where it ran (after ATLAS_UNITS' own).
ATLAS_EXPLANATIONS = pa.schema([
    ("explanation", pa.string()),
    ("explanation_score", pa.float64()),
    ("baseline_explanation", pa.string()),
    ("baseline_score", pa.float64()),
])


def atlas_units(relations, labels, explained: bool = False) -> pa.Schema:
    """ATLAS_UNITS, the explanations where the explain stage ran, then the AP for each relation and
    the firing rate on each label."""
    return pa.schema([*ATLAS_UNITS, *(ATLAS_EXPLANATIONS if explained else []),
                      *[(f"ap:{r}", pa.float64()) for r in relations],
                      *[(f"rate:{label}", pa.float64()) for label in labels]])
