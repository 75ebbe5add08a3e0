"""neuronmap's C kernels (records_kernel.c for the corpus records, statistics_kernel.c for the
per-token statistics of extraction), compiled once per machine with the C compiler that
torch.compile needs anyway and called through ctypes. Built with OpenMP where the compiler has
it: linked against libgomp.so.1, a kernel binds to the copy torch has already loaded, so its
threads are torch's own, not a second team fighting torch's spinning workers for the cores;
without OpenMP it runs on one thread. Where no compiler works, `compile_kernel` returns None and
the caller computes the same numbers with torch, only slower. NEURONMAP_NATIVE=0 turns the
kernels off."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno")

_loaded: dict[tuple[Path, tuple[str, ...]], ctypes.CDLL | None] = {}


def cache_dir() -> Path:
    root = os.environ.get("NEURONMAP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "neuronmap")
    return Path(root) / "native"


def _cpu_identity() -> str:
    # -march=native code may not run on another CPU: a cluster's home directory is shared by nodes.
    try:
        with open("/proc/cpuinfo") as info:
            return next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build(source: Path, target: Path, defines: tuple[str, ...]) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc, gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        pass
    try:
        for extra in (("-fopenmp",), ()):
            result = subprocess.run([compiler, *FLAGS, *defines, *extra, str(source), "-o", tmp.name, "-lm"],
                                    capture_output=True, text=True)
            if result.returncode == 0:
                if not extra:
                    log.warning("%s built without OpenMP: it runs on one thread", source.name)
                os.replace(tmp.name, target)  # concurrent jobs of one workflow may build at once
                return
        message = result.stderr.strip()
        raise OSError(message.splitlines()[-1] if message else f"{compiler} exited with {result.returncode}")
    finally:
        Path(tmp.name).unlink(missing_ok=True)


def kernel_text(source: Path) -> str:
    """A kernel's C source with the text of the local headers it includes (#include "…"): what
    its numbers depend on, for the build cache and the code fingerprints."""
    text = source.read_text()
    headers = re.findall(r'^#include "([^"]+)"', text, re.MULTILINE)
    return text + "".join(f"\n{name}\n{(source.parent / name).read_text()}" for name in headers)


def compile_kernel(source: Path, declare: Callable[[ctypes.CDLL], None],
                   defines: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled `source`, built on first use, its functions' signatures set by `declare`
    once; None where that fails (logged once). `defines` (-DNAME=value) override the source's
    choices: the tests build every vector width (-DLANES=4, 8, 16) on one machine."""
    if (source, defines) in _loaded:
        return _loaded[(source, defines)]
    _loaded[(source, defines)] = None
    if os.environ.get("NEURONMAP_NATIVE", "1") == "0":
        return None
    import torch  # noqa: F401  (loaded first, its libgomp.so.1 is the one the kernel binds to)
    key = hashlib.sha256(kernel_text(source).encode() + " ".join(FLAGS + defines).encode() + platform.machine().encode()
                         + _cpu_identity().encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    try:
        if not target.exists():
            _build(source, target, defines)
        library = ctypes.CDLL(str(target))
    except OSError as error:
        log.warning("%s not compiled (%s); computing with torch instead", source.name, error)
        return None
    declare(library)
    _loaded[(source, defines)] = library
    return library
