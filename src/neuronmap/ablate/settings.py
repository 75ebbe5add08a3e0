"""Settings of the ablate stage's commands."""

from __future__ import annotations

from dataclasses import dataclass

from ..config.settings import Settings, setting
from ..model.settings import ModelSettings


@dataclass(frozen=True)
class EvaluationSettings(Settings):
    """Greedy generation on the test prompts and the rule that marks an answer correct."""
    max_new_tokens: int = setting("evaluation.max_new_tokens")
    match: str = setting("evaluation.match")
    case_sensitive: bool = setting("evaluation.case_sensitive")
    batch_size: int


@dataclass(frozen=True)
class BaselineSettings(Settings):
    model: ModelSettings
    evaluation: EvaluationSettings
    source_language: str = setting("languages.source")


@dataclass(frozen=True)
class AblationSettings(Settings):
    model: ModelSettings
    evaluation: EvaluationSettings
    source_language: str = setting("languages.source")
    top_k: tuple[int, ...]
    seeds: tuple[int, ...] = setting("random_seeds")
    value: str = setting("ablation.value")
    clamp_value: float = setting("ablation.clamp_value")
    configs_per_batch: int | str = setting("ablation.configs_per_batch")
    random_eval: str = setting("ablation.random_eval")
    perplexity_max_tokens: int = setting("perplexity.max_tokens")


@dataclass(frozen=True)
class SignificanceSettings(Settings):
    bootstrap_resamples: int = setting("significance.bootstrap_resamples")
    confidence: float = setting("significance.confidence")
    alpha: float = setting("significance.alpha")
    seed: int = setting("significance.seed")


@dataclass(frozen=True)
class VerdictSettings(Settings):
    significance: SignificanceSettings
    power: float = setting("significance.power")
    power_simulations: int = setting("significance.power_simulations")
