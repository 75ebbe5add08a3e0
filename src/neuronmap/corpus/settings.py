"""Settings of the corpus stage's commands."""

from __future__ import annotations

from dataclasses import dataclass

from ..config.settings import Settings, setting
from ..model.settings import ModelSettings


@dataclass(frozen=True)
class ContextsSettings(Settings):
    path: str = setting("corpus.path")
    text_column: str = setting("corpus.text_column")
    label_column: str | None = setting("corpus.label_column")
    context_tokens: int = setting("corpus.context_tokens")
    shards: int = setting("corpus.shards")
    heldout_fraction: float = setting("corpus.heldout_fraction")
    labels: bool = setting("labels.enabled")


@dataclass(frozen=True)
class RecordsSettings(Settings):
    model: ModelSettings
    sites: tuple[str, ...]
    active_threshold: float
    batch_size: int = setting("corpus.batch_size")
    examples: int = setting("corpus.examples")
    peak_token_contexts: int = setting("corpus.peak_token_contexts")
    checkpoint_minutes: float = setting("corpus.checkpoint_minutes")
    label_sites: tuple[str, ...] = setting("labels.sites")
    ap_max_gb: float = setting("labels.ap_max_gb")


@dataclass(frozen=True)
class MergeSettings(Settings):
    examples: int = setting("corpus.examples")
    window: int = setting("corpus.window")
    peak_tokens: int = setting("corpus.peak_tokens")
    peak_token_contexts: int = setting("corpus.peak_token_contexts")
