"""Settings of the plan stage: everything that decides how much a run's model-running jobs need."""

from __future__ import annotations

from dataclasses import dataclass

from ..ablate.settings import AblationSettings
from ..config.settings import Settings, setting
from ..extract.settings import ExtractionSettings
from ..prepare.settings import PrepareSettings


@dataclass(frozen=True)
class PlanSettings(Settings):
    spec: str = setting("model")
    extraction: ExtractionSettings
    ablation: AblationSettings
    prepare: PrepareSettings
    relations: tuple[str, ...] = setting("relations.names")
    relations_dir: str = setting("relations.dir")
    decode_sites: tuple[str, ...] = setting("decode.sites")
    norm_gain: tuple[bool, ...] = setting("decode.norm_gain")
    decode_top_n: int = setting("decode.top_n")
    decode_search: str = setting("decode.search")
    gpus_per_job: int | str
    gpu_memory: float = setting("plan.gpu_memory")
    tflops: float = setting("plan.tflops")
    explain: dict = setting("explain")
