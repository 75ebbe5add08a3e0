"""Settings of the prepare stage's commands."""

from __future__ import annotations

from dataclasses import dataclass

from ..config.settings import Settings, setting


@dataclass(frozen=True)
class PromptSettings(Settings):
    """How a relation's facts become prompts, split by subject."""
    templates: str | list[int]
    test_templates: tuple[int, ...]
    few_shot: int
    few_shot_sets: int
    test_few_shot_sets: int
    max_facts: int = setting("relations.max_facts")
    test_facts: int = setting("split.test_facts")
    max_test_fraction: float = setting("split.max_test_fraction")
    seed: int = setting("split.seed")


@dataclass(frozen=True)
class PrepareSettings(Settings):
    prompts: PromptSettings
    shards: int
