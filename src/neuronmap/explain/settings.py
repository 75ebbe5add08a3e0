"""Settings of the explain stage's commands."""

from __future__ import annotations

from dataclasses import dataclass

from ..config.settings import Settings, setting
from ..model.settings import ModelSettings
from .backends import BackendSettings


@dataclass(frozen=True)
class UnitsSettings(Settings):
    units: str = setting("explain.units")
    max_units: int | None = setting("explain.max_units")
    seed: int = setting("explain.seed")
    sites: tuple[str, ...] = setting("sites")


@dataclass(frozen=True)
class ExplainSettings(Settings):
    model: ModelSettings
    shards: int = setting("explain.shards")
    contexts: int = setting("explain.contexts")
    batch_size: int = setting("explain.batch_size")
    window: int = setting("explain.window")
    top_examples: int = setting("explain.top_examples")
    quantile_examples: int = setting("explain.quantile_examples")
    active_quantile: float = setting("explain.active_quantile")
    inactive_quantile: float = setting("explain.inactive_quantile")
    score_contexts: int = setting("explain.score_contexts")
    max_tokens: int = setting("explain.max_tokens")
    seed: int = setting("explain.seed")
    prompt_template: str | None = setting("explain.prompt_template")
    explainer: dict = setting("explain.explainer")

    @property
    def explainer_backend(self) -> BackendSettings:
        return BackendSettings.from_mapping(self.explainer)


@dataclass(frozen=True)
class ScoreSettings(Settings):
    model: ModelSettings
    shards: int = setting("explain.shards")
    batch_size: int = setting("explain.batch_size")
    seed: int = setting("explain.seed")
    score_template: str | None = setting("explain.score_template")
    scorer: dict = setting("explain.scorer")

    @property
    def scorer_backend(self) -> BackendSettings:
        return BackendSettings.from_mapping(self.scorer)


@dataclass(frozen=True)
class MergeSettings(Settings):
    bootstrap_resamples: int = setting("significance.bootstrap_resamples")
    confidence: float = setting("significance.confidence")
    seed: int = setting("significance.seed")
