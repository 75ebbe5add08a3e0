"""Settings of the extract stage's commands."""

from __future__ import annotations

from dataclasses import dataclass

from ..config.settings import Settings, setting
from ..model.settings import ModelSettings


@dataclass(frozen=True)
class ExtractionSettings(Settings):
    model: ModelSettings
    sites: tuple[str, ...]
    poolings: tuple[str, ...]
    batch_size: int
    batch_tokens: int
    response_dtype: str
    top_n: int = setting("top_activations")
    active_threshold: float
    pool_span: str
    include_bos: bool
    fused_statistics: bool | str


@dataclass(frozen=True)
class NeuronStatsSettings(Settings):
    top_n: int = setting("top_activations")


@dataclass(frozen=True)
class CalibrationSettings(Settings):
    """What the stages' forward passes look like, so that the calibration forwards the same
    (model/cost.py's `calibration`)."""
    model: ModelSettings
    batch_size: int
    batch_tokens: int
    pool_span: str
    max_new_tokens: int = setting("evaluation.max_new_tokens")
    configs_per_batch: int | str = setting("ablation.configs_per_batch")
