"""Which model runs, and where."""

from __future__ import annotations

from dataclasses import dataclass

from ..config.settings import Settings


@dataclass(frozen=True)
class ModelSource(Settings):
    model: str
    trust_remote_code: bool


@dataclass(frozen=True)
class ModelSettings(Settings):
    device: str
    dtype: str
    trust_remote_code: bool
    device_map: str
    max_memory: dict[str, int | str]
    offload: str
