"""Settings of the labels stage's commands."""

from __future__ import annotations

from dataclasses import dataclass

from ..ablate.settings import SignificanceSettings
from ..config.settings import Settings, setting
from ..model.settings import ModelSettings


@dataclass(frozen=True)
class SelectSettings(Settings):
    sites: tuple[str, ...] = setting("labels.sites")
    top_rate: float = setting("labels.top_rate")
    filter_rate: float = setting("labels.filter_rate")
    activation_bar_ratio: float = setting("labels.activation_bar_ratio")
    ap: bool = setting("labels.ap")
    ap_units: str | int = setting("labels.ap_units")


@dataclass(frozen=True)
class PerplexitySettings(Settings):
    model: ModelSettings
    significance: SignificanceSettings
    ap: bool = setting("labels.ap")
    contexts: int = setting("labels.perplexity_contexts")
    seeds: tuple[int, ...] = setting("labels.random_seeds")
