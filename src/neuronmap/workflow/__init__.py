"""The workflow façade: what the workflow asks the package while it is parsed (rules/common.smk):
the validated config, the checks across keys and files (checks.py), each command's settings and
code fingerprint (fingerprint.py), and the files a rule reads.

It sits on the top floor, beside the command line: it may import any stage, and nothing below
imports it (tests/test_layers.py)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from .. import cli
from ..config.schema import validated
from .checks import check_config
from .fingerprint import code_fingerprint

__all__ = ["validated", "check_config", "settings_json", "code_fingerprint", "relation_file", "translation_files",
           "shell_prefix", "gpus_per_job", "gpus_here", "corpus_files", "labels_active"]


def settings_json(command: str, config: dict) -> str:
    """The settings `command` reads, as the JSON its --settings option takes."""
    return cli.stage_module(command).SETTINGS[command].from_config(config).to_json()


def relation_file(config: dict, name: str) -> str:
    from ..prepare.relations import find_relation_file
    return str(find_relation_file(config["relations"]["dir"], name))


def translation_files(config: dict) -> list[str]:
    from ..prepare.languages import translation_files as files
    return [str(path) for path in
            files(config["languages"]["dir"], config["languages"]["evaluate"], config["relations"]["names"])]


def corpus_files(config: dict) -> list[str]:
    """The files the corpus pass reads (none without corpus.path)."""
    from ..corpus.reading import corpus_files as files
    return [str(path) for path, _ in files(config["corpus"]["path"])] if config["corpus"]["path"] else []


def labels_active(config: dict) -> bool:
    """Whether the labels stage runs: a corpus with labels (a folder of two files or more, or a
    label column) and labels.enabled. The corpus_contexts job checks that two labels really occur."""
    if not (config["corpus"]["path"] and config["labels"]["enabled"]):
        return False
    from ..corpus.reading import corpus_files as files
    listed = files(config["corpus"]["path"])
    return len(listed) >= 2 or config["corpus"]["label_column"] is not None


def shell_prefix() -> str:
    """What every job's shell runs first: Snakemake's strict mode, and `neuronmap` defined as the
    package run by the interpreter that runs Snakemake, so that a job finds it whether or not its
    environment is activated or on PATH (on a cluster node too: the job reruns Snakemake with it)."""
    # Doubled braces: Snakemake formats the prefix like a shell command.
    return "set -euo pipefail; neuronmap() {{ " + shlex.quote(sys.executable) + ' -m neuronmap "$@"; }}; '


def gpus_per_job(config: dict, prepared: str | None = None) -> int:
    """GPUs a model-running job asks for (resources gpu=N): gpus_per_job, or (auto) 1 with
    device_map single, the GPUs max_memory names, or as many as the plan needs."""
    if config["gpus_per_job"] != "auto":
        return int(config["gpus_per_job"])
    if config["device_map"] == "single":
        return 1
    named = [key for key in config["max_memory"] if key != "cpu"]
    if named:
        return len(named)
    # Only here: the plan imports torch (a second of every parse, and every SLURM job parses).
    from ..plan.estimate import parse_time_plan
    plan = parse_time_plan(config, prepared)
    return plan["gpus_per_job"] if plan and plan["device"] == "cuda" else 1


def gpus_here(config: dict, gpus: int) -> int:
    """What a model-running job asks for when it runs on this machine: none when it computes on
    the CPU (device cpu, or auto on a machine without a GPU) and gpus_per_job is auto. It holds
    no GPU, so the workstation profile's pool of one GPU does not make CPU jobs wait for each
    other."""
    if config["gpus_per_job"] == "auto" and runs_on_cpu(config["device"]):
        return 0
    return gpus


# Device nodes of the drivers through which torch finds a GPU on Linux: NVIDIA's, AMD's (ROCm)
# and WSL's. Without any of them, torch.cuda.is_available() is False.
GPU_DRIVER_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


def runs_on_cpu(device: str) -> bool:
    """Whether `device` resolves to the CPU on this machine."""
    if device != "auto":
        return device == "cpu"
    if "torch" not in sys.modules and sys.platform == "linux" and \
            not any(Path(node).exists() for node in GPU_DRIVER_NODES):
        return True  # no GPU driver: the CPU, known without importing torch (seconds of every parse)
    from ..model.loading import pick_device
    return pick_device("auto").type == "cpu"
