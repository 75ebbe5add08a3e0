"""Settings of the atlas server (`neuronmap atlas`, which no rule calls: it reads them from the
config file it is given, or from the schema's defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config.settings import Settings, setting


@dataclass(frozen=True)
class AtlasSettings(Settings):
    host: str = setting("atlas.host")
    port: int = setting("atlas.port")
