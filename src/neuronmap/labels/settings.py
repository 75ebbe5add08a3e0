"""Settings of the labels stage's commands."""

from __future__ import annotations

from dataclasses import dataclass

from ..config.settings import Settings, setting


@dataclass(frozen=True)
class SelectSettings(Settings):
    sites: tuple[str, ...] = setting("labels.sites")
    top_rate: float = setting("labels.top_rate")
    filter_rate: float = setting("labels.filter_rate")
    activation_bar_ratio: float = setting("labels.activation_bar_ratio")
    ap: bool = setting("labels.ap")
    ap_units: str | int = setting("labels.ap_units")
