"""`neuronmap` subcommands of the stats stage: expertise (a map job per block of layers, a reduce
job per relation), overlaps between relations, and the analyses of the units themselves (LM-head
decoding, sparsity)."""

from __future__ import annotations

import logging

from .settings import (
    BlockSettings,
    ChoiceSettings,
    DecodeSettings,
    LabelingBlockSettings,
    OverlapSettings,
    SelectionSettings,
    SparsitySettings,
    StabilitySettings,
    VersatilitySettings,
)

log = logging.getLogger("neuronmap")

SETTINGS = {"stats-block": BlockSettings, "stats": SelectionSettings, "overlap": OverlapSettings,
            "shared-units": OverlapSettings, "decode": DecodeSettings, "sparsity": SparsitySettings,
            "labeling-block": LabelingBlockSettings, "versatility": VersatilitySettings,
            "stability": StabilitySettings}


def _chosen_prompts(path: str, relations, choice: ChoiceSettings) -> dict:
    from ..io.parquet import read_table
    return _chosen_from(read_table(path), relations, choice)


def _chosen_from(prompts, relations, choice: ChoiceSettings) -> dict:
    from .expertise import choose_prompts
    return {relation: choose_prompts(prompts, relation, choice.negatives_per_positive, choice.seed)
            for relation in relations}


def cmd_stats_block(args) -> None:
    """expertise (AP) of one block of layers' units for every relation"""
    from ..io import tables
    from ..io.parquet import write_table
    from ..io.responses import ResponseReader
    from .expertise import expertise_block
    settings = args.settings
    chosen = _chosen_prompts(args.prompts, settings.relations, settings.choice)
    table = expertise_block(ResponseReader(args.responses), chosen, settings.pooling, args.block, settings.blocks)
    write_table(table, args.out, tables.EXPERTISE_BLOCK)


def args_stats_block(p) -> None:
    p.add_argument("--prompts", required=True)
    p.add_argument("--responses", nargs="+", required=True)
    p.add_argument("--block", type=int, required=True)
    p.add_argument("--out", required=True)


def cmd_stats(args) -> None:
    """rank every unit for one relation and select its top-k"""
    import polars as pl

    from ..io import tables
    from ..io.parquet import read_table, write_table
    from ..maths.expertise import top_ties
    from .expertise import rank_units, selected_units
    settings = args.settings
    chosen = _chosen_prompts(args.prompts, [args.relation], settings.choice)[args.relation]
    scores = pl.concat([read_table(path).filter(pl.col("relation") == args.relation) for path in args.blocks])
    expertise = rank_units(scores)
    selected = selected_units(expertise, args.relation, settings.top_k)
    write_table(chosen, args.out_prompts, tables.EXPERTISE_PROMPTS)
    write_table(selected, args.out_units, tables.SELECTED_UNITS)
    write_table(expertise, args.out_expertise, tables.EXPERTISE)
    cutoff = expertise["ap"][max(settings.top_k) - 1]
    ties = top_ties(expertise)
    log.info("%s: %d units ranked; top AP %.4f shared by %d units (%d of them still tied after separation); "
             "%d units at the top-%d cutoff AP %.4f; selected by site:\n%s",
             args.relation, expertise.height, expertise["ap"][0], ties["at_top_ap"], ties["unresolved"],
             (expertise["ap"] == cutoff).sum(), max(settings.top_k), cutoff,
             selected.group_by("site").len().sort("site"))


def args_stats(p) -> None:
    p.add_argument("--prompts", required=True)
    p.add_argument("--blocks", nargs="+", required=True, help="the stats-block outputs")
    p.add_argument("--relation", required=True)
    p.add_argument("--out-expertise", required=True)
    p.add_argument("--out-prompts", required=True)
    p.add_argument("--out-units", required=True)


def _selected(paths):
    import polars as pl

    from ..io.parquet import read_table
    return pl.concat([read_table(path) for path in paths])


def cmd_overlap(args) -> None:
    """units shared between relations: counts and Jaccard index per pair and k"""
    from ..io import tables
    from ..io.parquet import write_table
    from .overlap import unit_overlap
    write_table(unit_overlap(_selected(args.units), args.settings.top_k), args.out, tables.OVERLAP)


def args_overlap(p) -> None:
    p.add_argument("--units", nargs="+", required=True)
    p.add_argument("--out", required=True)


def cmd_shared_units(args) -> None:
    """the units each pair of relations shares, per k"""
    from ..io import tables
    from ..io.parquet import write_table
    from .overlap import shared_units
    table = shared_units(_selected(args.units), args.settings.top_k)
    write_table(table, args.out, tables.SHARED_UNITS)
    log.info("%d shared (pair, unit) rows over k in %s", table.height, list(args.settings.top_k))


def args_shared_units(p) -> None:
    p.add_argument("--units", nargs="+", required=True)
    p.add_argument("--out", required=True)


def cmd_decode(args) -> None:
    """every neuron's weight vectors through the unembedding -> top tokens"""
    import torch

    from ..io import tables
    from ..io.parquet import write_table
    from ..model.host_memory import return_large_buffers_to_the_os
    from ..model.loading import load_for_job
    from .decode import decode_neurons
    settings = args.settings
    # Else glibc keeps each chunk's few-MB top-k buffers on a heap that the decoded rows pin: on
    # SmolLM2-135M the peak grew 100 MB a layer (3.8 GB in all); with this, 11 MB (the layer's weights).
    return_large_buffers_to_the_os()
    model, tokenizer = load_for_job(args.model_dir, settings.model, args.threads)
    with torch.inference_mode():
        table = decode_neurons(model, tokenizer, settings.sites, settings.norm_gain, settings.top_n,
                               search=settings.search)
    write_table(table, args.out, tables.DECODED)
    log.info("wrote %d decoded unit vectors to %s", table.num_rows, args.out)


def args_decode(p) -> None:
    p.add_argument("--model-dir", required=True, help="directory written by prepare-model")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--out", required=True)


def cmd_sparsity(args) -> None:
    """firing rates per layer and dead units from neuron_stats.parquet"""
    import polars as pl

    from ..io import tables
    from ..io.parquet import read_table, write_table
    from .sparsity import NEEDED, check_columns, dead_units, per_layer
    stats = read_table(args.neuron_stats)
    check_columns(stats, args.neuron_stats)
    stats = stats.select(NEEDED)
    write_table(dead_units(stats), args.out_dead, tables.DEAD_UNITS)
    layers = per_layer(stats, args.settings.rare_rate)
    write_table(layers, args.out, tables.SPARSITY)
    log.info("firing rate (value > 0) per site, mean over layers, and dead units:\n%s",
             layers.group_by("site").agg(pl.col("firing_rate_mean").mean(), pl.col("dead").sum()).sort("site"))


def args_sparsity(p) -> None:
    p.add_argument("--neuron-stats", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--out-dead", required=True)


def _labeling_groups(prompts, settings: LabelingBlockSettings) -> list:
    """Every labeling the checks score: the permutations, the rounds of pairs, the splits."""
    from .stability import half_labelings
    from .versatility import pair_labelings, permutation_labelings
    block, choice = settings.block, settings.block.choice
    chosen = _chosen_from(prompts, block.relations, choice)
    groups = permutation_labelings(prompts, block.relations, choice.negatives_per_positive, choice.seed,
                                   settings.permutations)
    if settings.leave_pair_out:
        groups += pair_labelings(chosen, prompts)
    return groups + half_labelings(prompts, chosen, choice.seed, settings.splits)


def cmd_labeling_block(args) -> None:
    """one block of layers' units scored for permuted labels, pairs and halves (the checks' map)"""
    from ..io import tables
    from ..io.parquet import read_table, write_table
    from ..io.responses import ResponseReader
    from .labelings import score_block
    settings = args.settings
    groups = _labeling_groups(read_table(args.prompts), settings)
    table = score_block(ResponseReader(args.responses), groups, settings.block.pooling, args.block,
                        settings.block.blocks, max(settings.top_k))
    write_table(table, args.out, tables.LABELING_BLOCK)
    log.info("block %d: %d labelings in %d groups (one sort per unit for all)", args.block,
             sum(len(group) for group in groups), len(groups))


def args_labeling_block(p) -> None:
    p.add_argument("--prompts", required=True)
    p.add_argument("--responses", nargs="+", required=True)
    p.add_argument("--block", type=int, required=True)
    p.add_argument("--out", required=True)


def _ranked_labelings(paths, check: str, by: list[str]):
    import polars as pl

    from ..io.parquet import read_table
    from .labelings import ranked
    return ranked(pl.concat([read_table(path).filter(pl.col("check") == check) for path in paths]), by)


def cmd_versatility(args) -> None:
    """each pair of relations' shared units against the selection rerun on permuted labels"""
    import polars as pl

    from ..io import tables
    from ..io.parquet import read_table, write_table
    from .versatility import versatility_table
    null = _ranked_labelings(args.blocks, "permutation", ["draw", "relation"])
    pairs = _ranked_labelings(args.blocks, "leave_pair_out", ["relation", "other"])
    population = read_table(args.expertise, ["unit"]).height
    table = versatility_table(_selected(args.units), null, pairs if pairs.height else None, args.settings.top_k,
                              population, args.settings.alpha)
    write_table(table, args.out, tables.VERSATILITY)
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200):
        log.info("versatility:\n%s", table.filter(pl.col("reading") == "selection").select(
            "k", "relation_a", "relation_b", "shared", "expected_independent", "null_mean", "null_sd", "q_value",
            "verdict"))


def args_versatility(p) -> None:
    p.add_argument("--units", nargs="+", required=True, help="every relation's selected units")
    p.add_argument("--blocks", nargs="+", required=True, help="the labeling-block outputs")
    p.add_argument("--expertise", required=True, help="one relation's expertise (every unit: the population)")
    p.add_argument("--out", required=True)


def cmd_stability(args) -> None:
    """split-half stability of each relation's selection"""
    import polars as pl

    from ..io import tables
    from ..io.parquet import read_table, write_table
    from .stability import half_labelings, stability_table
    settings = args.settings
    prompts = read_table(args.prompts)
    groups = half_labelings(prompts, _chosen_from(prompts, settings.relations, settings.choice), settings.choice.seed,
                            settings.splits)
    positives = {(lab.relation, lab.draw, lab.half): len(lab.positives) for group in groups for lab in group}
    table = stability_table(_ranked_labelings(args.blocks, "half", ["draw", "half", "relation"]), positives,
                            settings.top_k)
    write_table(table, args.out, tables.STABILITY)
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200):
        log.info("split-half stability:\n%s", table)


def args_stability(p) -> None:
    p.add_argument("--prompts", required=True)
    p.add_argument("--blocks", nargs="+", required=True, help="the labeling-block outputs")
    p.add_argument("--out", required=True)
