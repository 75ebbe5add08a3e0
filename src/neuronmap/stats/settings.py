"""Settings of the stats stage's commands."""

from __future__ import annotations

from dataclasses import dataclass

from ..config.settings import Settings, setting
from ..model.settings import ModelSettings


@dataclass(frozen=True)
class ChoiceSettings(Settings):
    """Which prompts score a relation: its identification prompts and a seeded draw of negatives."""
    negatives_per_positive: int
    seed: int = setting("split.seed")


@dataclass(frozen=True)
class BlockSettings(Settings):
    choice: ChoiceSettings
    relations: tuple[str, ...] = setting("relations.names")
    pooling: str
    blocks: int = setting("stats_blocks")


@dataclass(frozen=True)
class SelectionSettings(Settings):
    choice: ChoiceSettings
    top_k: tuple[int, ...]


@dataclass(frozen=True)
class OverlapSettings(Settings):
    top_k: tuple[int, ...]


@dataclass(frozen=True)
class DecodeSettings(Settings):
    model: ModelSettings
    sites: tuple[str, ...] = setting("decode.sites")
    norm_gain: tuple[bool, ...] = setting("decode.norm_gain")
    top_n: int = setting("decode.top_n")
    search: str = setting("decode.search")


@dataclass(frozen=True)
class SparsitySettings(Settings):
    rare_rate: float = setting("sparsity.rare_rate")


@dataclass(frozen=True)
class LabelingBlockSettings(Settings):
    """The selection checks' map step: permuted labels, pairs, halves (stats/labelings.py)."""
    block: BlockSettings
    top_k: tuple[int, ...]
    permutations: int = setting("versatility.permutations")
    leave_pair_out: bool = setting("versatility.leave_pair_out")
    splits: int = setting("stability.splits")


@dataclass(frozen=True)
class VersatilitySettings(Settings):
    top_k: tuple[int, ...]
    alpha: float = setting("significance.alpha")


@dataclass(frozen=True)
class StabilitySettings(Settings):
    choice: ChoiceSettings
    relations: tuple[str, ...] = setting("relations.names")
    top_k: tuple[int, ...]
    splits: int = setting("stability.splits")
