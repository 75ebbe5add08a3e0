"""The records kernel (records_kernel.c), compiled once per machine with the C compiler that
torch.compile needs anyway and called through ctypes. Built with OpenMP where the compiler has
it: linked against libgomp.so.1, it binds to the copy torch has already loaded, so its threads
are torch's own (split by units), not a second team fighting torch's spinning workers for the
cores; without OpenMP it runs on one thread. Where no compiler works, `load()` returns None and
the records are computed by the torch code in reductions.py: the same numbers to float
rounding, only slower."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("records_kernel.c")
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno")

_library: ctypes.CDLL | None = None
_tried = False


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


def _build(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc, gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        pass
    try:
        for extra in (("-fopenmp",), ()):
            result = subprocess.run([compiler, *FLAGS, *extra, str(SOURCE), "-o", tmp.name, "-lm"],
                                    capture_output=True, text=True)
            if result.returncode == 0:
                if not extra:
                    log.warning("records kernel built without OpenMP: it runs on one thread")
                os.replace(tmp.name, target)  # concurrent jobs of one workflow may build at once
                return
        message = result.stderr.strip()
        raise OSError(message.splitlines()[-1] if message else f"{compiler} exited with {result.returncode}")
    finally:
        Path(tmp.name).unlink(missing_ok=True)


def load() -> ctypes.CDLL | None:
    """The compiled kernel, building it on first use; None where that fails (logged once)."""
    global _library, _tried
    if _tried:
        return _library
    _tried = True
    if os.environ.get("NEURONMAP_NATIVE", "1") == "0":
        return None
    import torch  # noqa: F401  (loaded first, its libgomp.so.1 is the one the kernel binds to)
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + platform.machine().encode()
                         + _cpu_identity().encode()).hexdigest()[:16]
    target = cache_dir() / f"records-{key}.so"
    try:
        if not target.exists():
            _build(target)
        library = ctypes.CDLL(str(target))
    except OSError as error:
        log.warning("records kernel not compiled (%s); computing records with torch", error)
        return None
    pointer, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    library.records_reduce.argtypes = ([pointer, i64, i64, i64, pointer, i64, f32] + [pointer] * 10
                                        + [i64, pointer, pointer, pointer, i64, pointer, pointer, pointer, i64]
                                        + [pointer, pointer])
    library.records_reduce.restype = ctypes.c_int
    _library = library
    return library
