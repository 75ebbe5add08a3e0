"""The numbers behind the report: small polars frames derived from the stage outputs.

Nothing here draws or writes HTML; every function takes frames and returns a frame (or plain
values), so each figure and table of the report can be checked against its inputs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path

import polars as pl

# Packages whose versions decide the numbers (or the look) of a run.
VERSIONED_PACKAGES = ("neuronmap", "torch", "transformers", "snakemake", "polars", "pyarrow", "numpy",
                      "altair", "vl-convert-python")


def config_digest(config: dict) -> str:
    """sha256 of the validated config as canonical JSON: `json.dumps(config, sort_keys=True)`,
    the text the report rule passes on the command line."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode("utf-8")).hexdigest()


def package_versions() -> pl.DataFrame:
    rows = [{"package": "python", "version": platform.python_version()}]
    for name in VERSIONED_PACKAGES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        rows.append({"package": name, "version": version})
    return pl.DataFrame(rows)


def prompt_counts(prompts: pl.DataFrame) -> pl.DataFrame:
    counts = prompts.group_by("relation", "split").len()
    return counts.pivot(on="split", index="relation", values="len").fill_null(0).sort("relation")


def baseline_accuracy(predictions: pl.DataFrame) -> pl.DataFrame:
    """Accuracy of the unmodified model on each relation's test prompts."""
    return predictions.group_by("eval_relation").agg(
        accuracy=pl.col("correct").mean(), n=pl.len(), correct=pl.col("correct").sum().cast(pl.Int64),
    ).rename({"eval_relation": "relation"}).sort("relation")


def cumulativity(sweep: pl.DataFrame, baseline: pl.DataFrame) -> pl.DataFrame:
    """Accuracy on a relation with its own units off, against k: the top-k units and the spread
    of the random controls over seeds, from sweep.parquet (one row per ablated relation,
    evaluated relation and k, the random controls already summarized over seeds). Both curves
    start at k = 0, the unmodified model."""
    own = sweep.filter(pl.col("ablated_relation") == pl.col("eval_relation"))
    top = own.select(pl.col("eval_relation").alias("relation"), "k", pl.lit("top_k").alias("control"),
                     pl.col("top_accuracy").alias("accuracy"), pl.col("top_accuracy").alias("accuracy_min"),
                     pl.col("top_accuracy").alias("accuracy_max"), pl.lit(1, pl.Int64).alias("seeds"))
    random = own.filter(pl.col("random_seeds") > 0).select(
        pl.col("eval_relation").alias("relation"), "k", pl.lit("random").alias("control"),
        pl.col("random_accuracy_mean").alias("accuracy"), pl.col("random_accuracy_min").alias("accuracy_min"),
        pl.col("random_accuracy_max").alias("accuracy_max"), pl.col("random_seeds").alias("seeds"))
    curve = pl.concat([top, random])
    start = pl.concat([
        baseline.filter(pl.col("relation").is_in(curve["relation"].unique().to_list())).select(
            "relation", pl.lit(0, pl.Int64).alias("k"), pl.lit(control).alias("control"), "accuracy",
            pl.col("accuracy").alias("accuracy_min"), pl.col("accuracy").alias("accuracy_max"),
            pl.lit(1, pl.Int64).alias("seeds"))
        for control in curve["control"].unique().sort().to_list()])
    return pl.concat([start, curve]).sort("relation", "control", "k")


def recall_summary(baseline: pl.DataFrame, curve: pl.DataFrame) -> pl.DataFrame:
    """One row per relation: test prompts, baseline accuracy, accuracy under each ablation."""
    wide = curve.filter(pl.col("k") > 0).with_columns(
        column=pl.when(pl.col("control") == "top_k").then(pl.lit("top "))
        .otherwise(pl.col("control") + pl.lit(" ")) + pl.col("k").cast(pl.String))
    order = wide.sort("control", descending=True).sort("k", maintain_order=True)["column"].unique(
        maintain_order=True).to_list()
    pivot = wide.pivot(on="column", index="relation", values="accuracy")
    return baseline.select("relation", pl.col("n").alias("test prompts"), pl.col("accuracy").alias("baseline")) \
        .join(pivot.select("relation", *order), on="relation", how="left").sort("relation")


SIGNIFICANCE_RULE = "* the paired test of per-prompt predictions finds the change significant"


def drop_cells(significance: pl.DataFrame) -> pl.DataFrame:
    """The ablated × evaluated matrix per k, from significance.parquet: relative drop of the
    top-k ablation, the mean drop of its random controls beside it, and "*" where the paired
    test finds the change significant (see SIGNIFICANCE_RULE)."""
    cell = ["ablated_relation", "eval_relation", "k"]
    top = significance.filter(pl.col("control") == "top_k")
    random = significance.filter(pl.col("control") == "random").group_by(cell) \
        .agg(random_drop=pl.col("relative_drop").mean())
    mark = pl.when(pl.col("significant")).then(pl.lit("*")).otherwise(pl.lit(""))
    label = pl.when(pl.col("relative_drop").is_null()).then(pl.lit("n/a")) \
        .otherwise(pl.col("relative_drop").round(2).cast(pl.String)) + pl.col("mark")
    return top.join(random, on=cell, how="left").select(
        *cell, "relative_drop", "accuracy", "baseline_accuracy", "n", "random_drop", mark.alias("mark"),
        "p_value", "q_value").with_columns(label=label).sort("k", "ablated_relation", "eval_relation")


def placement(units: pl.DataFrame, k: int) -> pl.DataFrame:
    """Selected units (rank <= k) per relation, layer and site."""
    return units.filter(pl.col("rank") <= k).group_by("relation", "layer", "site").len("units") \
        .with_columns(pl.col("units").cast(pl.Int64)).sort("relation", "layer", "site")


def expertise_summary(units: pl.DataFrame, top_k: list[int]) -> pl.DataFrame:
    """AP at each cutoff; many units at AP = 1 mean the ranking among them is a tie-break."""
    return units.group_by("relation").agg(
        *(pl.col("ap").filter(pl.col("rank") == k).first().alias(f"AP at rank {k}") for k in top_k),
        pl.col("ap").filter(pl.col("ap") >= 1.0).len().alias(f"units with AP = 1 (of top {top_k[-1]})"),
    ).sort("relation")


def sparsity(table: pl.DataFrame) -> pl.DataFrame:
    """Per site and layer, from sparsity.parquet: the mean firing rate (fraction of tokens > 0),
    the mean active rate (|value| above the configured threshold) and the dead units (never
    above 0 on any token seen)."""
    return table.select("site", "layer", pl.col("firing_rate_mean").alias("firing_rate"),
                        pl.col("active_rate_mean").alias("active_rate"), pl.col("dead").alias("dead_units"),
                        pl.col("units").cast(pl.Int64)).sort("site", "layer")


def language_cells(languages: pl.DataFrame) -> pl.DataFrame:
    """Recall of each relation in each language with its own top-k units off (identified in the
    source language): relative drop, and "*" where the paired test finds the change significant."""
    own = languages.filter((pl.col("ablated_relation") == pl.col("eval_relation")) & (pl.col("control") == "top_k"))
    mark = pl.when(pl.col("significant")).then(pl.lit("*")).otherwise(pl.lit(""))
    label = pl.when(pl.col("relative_drop").is_null()).then(pl.lit("n/a")) \
        .otherwise(pl.col("relative_drop").round(2).cast(pl.String)) + mark
    return own.select(pl.col("eval_relation").alias("relation"), "language", "k", "n", "accuracy",
                      "baseline_accuracy", "relative_drop", label.alias("label")).sort("k", "relation", "language")


def stage_times(benchmarks_dir: Path) -> pl.DataFrame:
    """Wall-clock and CPU seconds per workflow stage, summed over its jobs, from the rules'
    benchmark files (the report's own is written after it, so it is never among them)."""
    rows = []
    for path in sorted(Path(benchmarks_dir).rglob("*.tsv")):
        frame = pl.read_csv(path, separator="\t", infer_schema_length=0)
        if frame.height == 0:
            continue
        stage = path.relative_to(benchmarks_dir).parts[0].removesuffix(".tsv")
        if stage == "report":
            continue

        def number(column: str) -> float | None:
            if column not in frame.columns or frame[column][0] in (None, "", "-", "NA"):
                return None
            return float(frame[column][0])
        rows.append({"stage": stage, "seconds": number("s"), "cpu_seconds": number("cpu_time"),
                     "max_rss_mb": number("max_rss")})
    schema = {"stage": pl.String, "jobs": pl.Int64, "seconds": pl.Float64, "cpu_seconds": pl.Float64,
              "max_rss_mb": pl.Float64}
    if not rows:
        return pl.DataFrame(schema=schema)
    return pl.DataFrame(rows).group_by("stage", maintain_order=True).agg(
        jobs=pl.len().cast(pl.Int64), seconds=pl.col("seconds").sum(), cpu_seconds=pl.col("cpu_seconds").sum(),
        max_rss_mb=pl.col("max_rss_mb").max()).select(list(schema))


def cost_summary(cost: pl.DataFrame) -> pl.DataFrame:
    """cost.parquet as the summary shows it."""
    return cost.select("stage", "jobs", "prompts", "tokens", pl.col("tokens_per_prompt").alias("tokens/prompt"),
                       "seconds", pl.col("tokens_per_s").alias("tokens/s"),
                       pl.col("ratio_to_bare").alias("× bare forward time"),
                       *([pl.col("floor").alias("floor (calibration regime)")] if "floor" in cost.columns else []))


# A job whose measured peak memory is this far from its plan, either way, is flagged.
PEAK_TOLERANCE = 0.25


def plan_against_cost(plan: dict, cost: pl.DataFrame, times: pl.DataFrame | None = None,
                      calibration: pl.DataFrame | None = None) -> pl.DataFrame:
    """What plan.json projected for each model-running job kind beside what cost.parquet measured:
    forward tokens (the plan's exclude padding) and time (the plan's at its stated throughput);
    and, with `times` (stage_times), the planned host peak beside the largest measured one
    (cost.parquet's peak_rss_mib, which each job reads from the kernel; else the benchmark files'
    max_rss, sampled every 30 s: decode writes no cost file), flagged where it is more than
    PEAK_TOLERANCE off. The calibrate job's numbers come from `calibration` (cost/calibrate.parquet)
    where given: its regimes' tokens and seconds summed and their peak_rss_mib (each row holds the
    job's peak so far, so the largest is the job's)."""
    measured = {row["stage"]: row for row in cost.iter_rows(named=True)}
    if calibration is not None and calibration.height:
        measured["calibrate"] = calibration_measured(calibration)
    peaks = {} if times is None else {stage: mb * 1e6 / 2**20 if mb is not None else None  # MB -> MiB
                                      for stage, mb in zip(times["stage"], times["max_rss_mb"])}
    peaks |= {stage: row["peak_rss_mib"] for stage, row in measured.items() if row.get("peak_rss_mib")}
    rows = []
    for job in plan["jobs"]:
        seen = measured.get(job["kind"], {})
        row = {"stage": job["kind"], "jobs": job["jobs"],
               "planned peak MiB per job": max(job["peak_bytes"].values()) / 2**20,
               "planned tokens": job["forward_tokens"], "measured tokens": seen.get("tokens"),
               f"planned s at {plan['tflops']:g} TFLOP/s": job["seconds"], "measured s": seen.get("seconds")}
        if times is not None:
            planned, peak = job["peak_bytes"].get("cpu", 0) / 2**20, peaks.get(job["kind"])
            ratio = peak / planned if peak and planned else None
            row.update({"planned host peak MiB": planned, "measured peak MiB": peak, "measured / planned": ratio,
                        "memory": "" if ratio is None else
                        "ok" if abs(ratio - 1) <= PEAK_TOLERANCE else f"off plan by more than {PEAK_TOLERANCE:.0%}"})
        rows.append(row)
    return pl.DataFrame(rows, infer_schema_length=None)


def calibration_measured(calibration: pl.DataFrame) -> dict:
    """The calibrate job as one row of cost.parquet's: its regimes' tokens and seconds summed (the
    ablate row repeats the baseline's measurement where configs_per_batch is 1: counted once) and
    its peak."""
    regimes = calibration.unique(["tokens", "forwards", "seconds"], keep="first", maintain_order=True)
    peak = calibration["peak_rss_mib"].max() if "peak_rss_mib" in calibration.columns else None
    return {"stage": "calibrate", "tokens": int(regimes["tokens"].sum()), "seconds": float(regimes["seconds"].sum()),
            "peak_rss_mib": peak}


POOLED = "all relations"
ALL_PAIRS = "all pairs"


def verdict_rows(verdicts: pl.DataFrame) -> pl.DataFrame:
    """verdicts.parquet as the report shows it, numbers unchanged: per relation and k, then the
    pooled rows."""
    return verdicts.sort(pl.col("relation").is_null(), "relation", "k").select(
        pl.col("relation").fill_null(POOLED), "k", pl.col("n").alias("test prompts"),
        pl.col("baseline_accuracy").alias("baseline"), pl.col("top_accuracy").alias("top-k"),
        pl.col("random_accuracy").alias("random"), pl.col("random_accuracy_sd").alias("random sd"),
        pl.col("excess_drop").alias("excess drop"), pl.col("ci_low").alias("interval low"),
        pl.col("ci_high").alias("interval high"), "p_value", "q_value", "verdict",
        pl.col("detectable_drop").alias("detectable drop"))


def versatility_rows(versatility: pl.DataFrame) -> pl.DataFrame:
    """versatility.parquet as the report shows it, numbers unchanged."""
    pair = pl.when(pl.col("relation_a").is_null()).then(pl.lit(ALL_PAIRS)) \
        .otherwise(pl.format("{} & {}", "relation_a", "relation_b"))
    return versatility.sort("reading", "k", pl.col("relation_a").is_null(), "relation_a", "relation_b").select(
        "reading", "k", pair.alias("pair"), "shared", pl.col("null_mean").alias("permuted labels: mean"),
        pl.col("null_sd").alias("sd"), pl.col("expected_independent").alias("independent sets"),
        "p_value", "q_value", "verdict")


def stability_rows(stability: pl.DataFrame) -> pl.DataFrame:
    """stability.parquet per relation and k, over its splits (one split: its numbers unchanged)."""
    half = (pl.col("positives_a") + pl.col("positives_b")) / 2
    return stability.group_by("relation", "k").agg(
        pl.len().alias("splits"), half.mean().alias("prompts per half"), pl.col("shared").mean().alias("shared"),
        pl.col("fraction").mean().alias("fraction shared"), pl.col("fraction").min().alias("lowest fraction"),
        pl.col("expected_independent").first().alias("independent sets"), pl.col("p_value").max().alias("p_value"),
        pl.col("ap_spearman").mean().alias("AP Spearman"),
    ).sort("relation", "k")
