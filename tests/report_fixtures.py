"""Stand-ins for the run's analysis files (per-token statistics, top activations, decoded tokens,
paired significance, sweep, sparsity, languages, perplexity), in the columns those stages write,
built around a real run: the report is then shown with what a small run rarely has (significant
cells, several languages, tokens on every atlas unit). Tokens and prompts are real (the run's
prompts through the run's tokenizer, exactly as extraction records a peak token); the numbers
are random, except the accuracies, which are the run's own (significance.parquet)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from neuronmap.ablate.sweep import sweep_table
from neuronmap.io import tables
from neuronmap.io.parquet import write_table
from neuronmap.model.loading import load_tokenizer

KEY = ["site", "layer", "unit"]

NEURON_STATS = pa.schema([("site", pa.string()), ("layer", pa.int32()), ("unit", pa.int32()),
                          ("count", pa.int64()), ("mean", pa.float64()), ("var", pa.float64()),
                          ("min", pa.float32()), ("max", pa.float32()), ("frac_positive", pa.float64()),
                          ("frac_active", pa.float64())])
TOP_ACTIVATIONS = pa.schema([("site", pa.string()), ("layer", pa.int32()), ("unit", pa.int32()),
                             ("rank", pa.int32()), ("prompt_id", pa.string()), ("position", pa.int32()),
                             ("token", pa.string()), ("value", pa.float32())])


def write_later_analyses(run_dir: Path, out_dir: Path, units_per_relation: int = 200, per_unit: int = 5,
                         seed: int = 0) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    expertise = sorted((run_dir / "expertise").glob("*.parquet"))
    expertise = [p for p in expertise if not p.name.endswith(".prompts.parquet")]
    every_unit = pl.read_parquet(expertise[0], columns=KEY).sort(KEY)
    n = every_unit.height
    frac = rng.beta(2, 5, n)
    frac[rng.random(n) < 0.01] = 0.0
    stats = every_unit.with_columns(
        count=pl.lit(5000, pl.Int64), mean=pl.Series(rng.normal(0, 0.3, n)), var=pl.Series(rng.gamma(2, 0.05, n)),
        min=pl.Series(-rng.gamma(2, 0.5, n)), max=pl.Series(rng.gamma(2, 0.5, n)),
        frac_positive=pl.Series(frac), frac_active=pl.Series(frac * 0.7))
    paths = {"neuron_stats": out_dir / "neuron_stats.parquet"}
    write_table(stats, paths["neuron_stats"], NEURON_STATS)

    # Top activations and decoded tokens for every relation's top units (and some others).
    top_units = pl.concat([pl.read_parquet(p, columns=KEY + ["rank"]).filter(pl.col("rank") <= units_per_relation)
                           .select(KEY) for p in expertise]).unique().sort(KEY)
    top_units = pl.concat([top_units, every_unit.sample(50, seed=seed)]).unique().sort(KEY)
    prompts = pl.read_parquet(run_dir / "prompts.parquet").filter(pl.col("split") == "identification")
    tokenizer = load_tokenizer(run_dir / "model")
    token_ids = tokenizer(prompts["text"].to_list())["input_ids"]
    rows, decoded = [], []
    vocabulary = tokenizer.vocab_size
    for site, layer, unit in top_units.iter_rows():
        chosen = rng.choice(prompts.height, per_unit, replace=False)
        values = np.sort(rng.gamma(3, 1.0, per_unit))[::-1]
        for rank, (p, value) in enumerate(zip(chosen, values), start=1):
            position = int(rng.integers(1, len(token_ids[p])))
            rows.append((site, layer, unit, rank, prompts["prompt_id"][int(p)], position,
                         tokenizer.decode([token_ids[p][position]]), float(value)))
        for norm_gain in (False, True):
            ids = [int(i) for i in rng.choice(vocabulary, 6, replace=False)]
            decoded.append((site, layer, unit, norm_gain, ids, [tokenizer.decode([i]) for i in ids],
                            sorted(rng.random(6).tolist(), reverse=True)))
    paths["top_activations"] = out_dir / "top_activations.parquet"
    write_table(pl.DataFrame(rows, schema=TOP_ACTIVATIONS.names, orient="row"), paths["top_activations"],
                TOP_ACTIVATIONS)
    paths["decoded"] = out_dir / "decoded.parquet"
    pl.DataFrame(decoded, schema={"site": pl.String, "layer": pl.Int32, "unit": pl.Int32, "norm_gain": pl.Boolean,
                                  "token_ids": pl.List(pl.Int32), "tokens": pl.List(pl.String),
                                  "scores": pl.List(pl.Float32)}, orient="row").write_parquet(paths["decoded"])

    paths["sparsity"] = out_dir / "sparsity.parquet"
    stats.group_by("site", "layer").agg(
        units=pl.len().cast(pl.Int64), tokens=pl.col("count").first(),
        firing_rate_mean=pl.col("frac_positive").mean(), firing_rate_median=pl.col("frac_positive").median(),
        active_rate_mean=pl.col("frac_active").mean(), active_rate_median=pl.col("frac_active").median(),
        dead=(pl.col("frac_positive") == 0).sum().cast(pl.Int64), never_active=(pl.col("frac_active") == 0).sum()
        .cast(pl.Int64), rare=(pl.col("frac_positive") < 0.01).sum().cast(pl.Int64),
    ).sort("site", "layer").write_parquet(paths["sparsity"])

    # Random paired statistics over the run's real accuracies; the sweep from them, as the workflow does.
    significance = pl.read_parquet(run_dir / "significance.parquet")
    p_values = rng.random(significance.height) ** 3
    significance = significance.with_columns(
        p_value=pl.Series(p_values), q_value=pl.Series(np.minimum(1, p_values * 3)),
        significant=pl.Series(p_values * 3 < 0.05))
    paths["significance"] = out_dir / "significance.parquet"
    write_table(significance, paths["significance"], tables.SIGNIFICANCE)
    paths["sweep"] = out_dir / "sweep.parquet"
    write_table(sweep_table(significance), paths["sweep"], tables.SWEEP)

    top = significance.filter(pl.col("control") == "top_k")
    own = top.filter(pl.col("ablated_relation") == pl.col("eval_relation"))
    paths["languages"] = out_dir / "languages.parquet"
    pl.concat([own.with_columns(language=pl.lit(language), accuracy=pl.Series(rng.random(own.height)))
               for language in ("de", "fr", "es")]).with_columns(
        relative_drop=(pl.col("baseline_accuracy") - pl.col("accuracy")) / pl.col("baseline_accuracy"),
        significant=pl.Series(rng.random(3 * own.height) < 0.3)).write_parquet(paths["languages"])

    relations = significance["ablated_relation"].unique().sort()
    paths["perplexity"] = out_dir / "perplexity.parquet"
    perplexity = rng.uniform(20, 40, len(relations))
    pl.DataFrame({"ablated_relation": relations, "k": [int(significance["k"].max())] * len(relations),
                  "control": ["top_k"] * len(relations), "seed": [None] * len(relations),
                  "tokens": [500] * len(relations), "nll": np.log(perplexity), "perplexity": perplexity,
                  "baseline_perplexity": [20.0] * len(relations), "ratio": perplexity / 20.0},
                 schema_overrides={"seed": pl.Int64}).write_parquet(paths["perplexity"])
    paths["cost"] = run_dir / "cost.parquet"
    paths["plan"] = run_dir / "plan.json"
    return paths


LABELS = ("de", "en", "es")


def label_perplexity_table(label_units: pl.DataFrame, cells: dict, alpha: float = 0.05) -> pl.DataFrame:
    """tables.LABEL_PERPLEXITY from chosen numbers: `cells` maps (method, ablated label, evaluated
    label) to (excess, ci_low, ci_high, p_value); q-values are Benjamini-Hochberg over the
    matrix, the ratios follow from the excess (random ratio 1.01, selected = random * e^excess)."""
    from neuronmap.maths.significance import benjamini_hochberg
    sizes = {(method, label): n for method, label, n in label_units.group_by("method", "label").len().iter_rows()}
    rows = []
    for (method, ablated, evaluated), (excess, low, high, p) in sorted(cells.items()):
        units = sizes.get((method, ablated), 0)
        rows.append({"method": method, "ablated_label": ablated, "units": units, "eval_label": evaluated,
                     "contexts": 64, "tokens": 64 * 63, "baseline_perplexity": 30.0, "selected_ratio":
                     1.01 * float(np.exp(excess)), "random_ratio": 1.01, "excess": excess, "ci_low": low,
                     "ci_high": high, "p_value": p, "excess_per_unit": excess / units if units else float("nan")})
    frame = pl.DataFrame(rows)
    q = benjamini_hochberg(frame["p_value"].to_numpy())
    return frame.with_columns(q_value=pl.Series(q), significant=pl.Series(q < alpha))


def write_label_analyses(out_dir: Path, n_layers: int, width: int, labels=LABELS, per_label: int = 40,
                         seed: int = 0, cells: dict | None = None) -> dict[str, Path]:
    """The corpus pass's contexts and units and the labels stage's files for a labelled corpus of
    `labels`, in the stages' schemas, with random numbers: each label's LAPE and AP selections
    (`per_label` gate units each, a quarter shared), their overlap as the stage defines it (a
    hypergeometric tail), and the perplexity matrix (`cells`, or random: the own label's excess
    clearly positive, the others' near 0). Returns the paths by their names in neuronmap.report.inputs."""
    from scipy.stats import hypergeom
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / file for name, file in (
        ("contexts", "contexts.parquet"), ("corpus_units", "units.parquet"),
        ("label_records", "label_records.parquet"), ("label_units", "label_units.parquet"),
        ("label_overlap", "overlap.parquet"), ("label_perplexity", "perplexity.parquet"))}

    rows = []
    for i, label in enumerate(labels):
        for d in range(12 + 4 * i):
            for part in range(int(rng.integers(1, 4))):
                n_tokens = int(rng.integers(8, 33))
                rows.append({"document": f"{label}-{d}", "label": label, "part": part, "n_tokens": n_tokens,
                             "token_ids": rng.integers(0, 49152, n_tokens).tolist(), "heldout": d % 5 == 0})
    contexts = pl.DataFrame(rows).with_row_index("context_id").with_columns(
        pl.col("context_id").cast(pl.Int64), shard=pl.col("document").hash().mod(2).cast(pl.Int32))
    write_table(contexts.select(tables.CONTEXTS.names), paths["contexts"], tables.CONTEXTS)

    sites = {"gate": width, "down": 576}
    keys = pl.concat([pl.DataFrame({"site": site, "layer": np.repeat(np.arange(n_layers, dtype=np.int32), w),
                                    "unit": np.tile(np.arange(w, dtype=np.int32), n_layers)})
                      for site, w in sites.items()])
    n = keys.height
    records = keys.with_columns(
        count=pl.lit(4000, pl.Int64), mean=pl.Series(rng.normal(0, 0.2, n)), var=pl.Series(rng.gamma(2, 0.05, n)),
        skewness=pl.lit(0.0), kurtosis=pl.lit(3.0), min=pl.lit(-1.0, pl.Float32), max=pl.lit(1.0, pl.Float32),
        frac_positive=pl.Series(rng.beta(2, 5, n)), frac_active=pl.lit(0.1),
        **{q: pl.lit(0.0) for q in tables.RECORD_QUANTILES},
        hist_bins=pl.lit([], pl.List(pl.Int16)), hist_counts=pl.lit([], pl.List(pl.Int64)))
    write_table(records.select(tables.UNIT_RECORDS.names), paths["corpus_units"], tables.UNIT_RECORDS)

    gate = keys.filter(pl.col("site") == "gate")
    heldin = contexts.filter(~pl.col("heldout")).group_by("label").agg(
        contexts=pl.len().cast(pl.Int64), tokens=pl.col("n_tokens").sum().cast(pl.Int64))
    label_records = pl.concat([gate.with_columns(label=pl.lit(label)) for label in labels]).join(
        heldin, on="label").with_columns(firing_rate=pl.Series(rng.beta(2, 6, gate.height * len(labels))),
                                         mean=pl.Series(rng.normal(0, 0.2, gate.height * len(labels))))
    label_records = label_records.with_columns(
        n_positive=(pl.col("firing_rate") * pl.col("tokens")).round().cast(pl.Int64)).with_columns(
        firing_rate=pl.col("n_positive") / pl.col("tokens"))
    write_table(label_records.select(tables.LABEL_RECORDS.names), paths["label_records"], tables.LABEL_RECORDS)

    # Each label's selections in a band of layers of its own, so the placement chart differs by label.
    selections = []
    for i, label in enumerate(labels):
        band = gate.filter(pl.col("layer").is_between(3 * i, n_layers - 1 - 2 * i))
        lape = band.sample(per_label, seed=seed + i)
        ap = pl.concat([lape.head(per_label // 4), band.join(lape, on=KEY, how="anti").sample(
            per_label - per_label // 4, seed=seed + 100 + i)])
        for method, chosen in (("lape", lape), ("ap", ap)):
            selections.append(chosen.with_columns(
                method=pl.lit(method), label=pl.lit(label), score=pl.Series(np.sort(rng.random(per_label))),
                rank=pl.int_range(1, per_label + 1, dtype=pl.Int32)))
    label_units = pl.concat(selections)
    write_table(label_units.select(tables.LABEL_UNITS.names), paths["label_units"], tables.LABEL_UNITS)

    overlap = []
    for label in labels:
        sets = {m: set(label_units.filter((pl.col("method") == m) & (pl.col("label") == label))
                       .select(KEY).iter_rows()) for m in ("lape", "ap")}
        shared, population = len(sets["lape"] & sets["ap"]), gate.height
        overlap.append({"label": label, "lape_units": len(sets["lape"]), "ap_units": len(sets["ap"]),
                        "shared": shared, "population": population,
                        "expected": len(sets["lape"]) * len(sets["ap"]) / population,
                        "p_value": float(hypergeom.sf(shared - 1, population, len(sets["ap"]), len(sets["lape"])))})
    write_table(pl.DataFrame(overlap), paths["label_overlap"], tables.LABEL_OVERLAP)

    if cells is None:
        cells = {}
        for method in ("lape", "ap"):
            for ablated in labels:
                for evaluated in labels:
                    excess = rng.uniform(0.05, 0.4) if ablated == evaluated else rng.normal(0, 0.01)
                    half = rng.uniform(0.01, 0.05)
                    cells[method, ablated, evaluated] = (excess, excess - half, excess + half,
                                                         float(rng.random() ** (6 if ablated == evaluated else 1)))
    write_table(label_perplexity_table(label_units, cells), paths["label_perplexity"], tables.LABEL_PERPLEXITY)
    return paths
