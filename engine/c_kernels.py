"""C kernels compiled at first use: a C source beside its Python module, built with the system
compiler (`cc`, or $CC) into the cache directory (incstream.paths.kernels_dir) and loaded with
ctypes.

Why C: on a CPU, the fast mode's few-row work costs microseconds of dispatch per tensor
operation for nanoseconds of arithmetic, and its few-row products read weights faster in a
layout oneDNN has no kernel for. A kernel is built once per source, flags, compiler and CPU
(-march=native), in about a second. Where no compiler works, `load` returns None and the
caller keeps its PyTorch version, which stays the reference each kernel is tested against.
"""

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
from pathlib import Path

from incstream.paths import kernels_dir

log = logging.getLogger(__name__)

# -march=native: the loops vectorize for this CPU (F16C conversions, AVX-512 where present).
# Reassociation lets the dot products vectorize; no -ffast-math, whose startup code would
# switch the whole process to flush-to-zero.
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
         "-fno-trapping-math", "-shared", "-fPIC")

_loaded: dict[tuple[Path, tuple[str, ...]], ctypes.CDLL | None] = {}  # per process


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def library_path(source: Path, defines: tuple[str, ...] = ()) -> Path:
    """Where `source` compiled with `defines` lives: keyed by the source and the headers it
    includes with quotes (engine/kernel_math.h), the flags, the compiler and the machine, so
    that an edited source or header, or another CPU, gets its own build."""
    text = source.read_bytes()
    headers = [(source.parent / name.decode()).read_bytes()
               for name in re.findall(rb'^#include "([^"]+)"', text, flags=re.MULTILINE)]
    key = hashlib.sha256(b"".join([text, *headers]) + " ".join(
        [compiler() or "none", *FLAGS, *defines, platform.machine(), _cpu_model()]).encode())
    return kernels_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(line for line in f if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        return platform.processor()


def _build(source: Path, defines: tuple[str, ...], target: Path) -> None:
    cc = compiler()
    if cc is None:
        raise OSError("no C compiler (cc or $CC) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: two processes building at once never load half a file.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        subprocess.run([cc, *FLAGS, *defines, "-o", str(out), str(source), "-lm"], check=True,
                       capture_output=True, timeout=120)
        os.replace(out, target)


def load(source: Path, defines: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled library of `source` (built the first time), or None where it cannot be
    built here (logged once, with the compiler's message)."""
    if (source, defines) in _loaded:
        return _loaded[source, defines]
    target = library_path(source, defines)
    try:
        if not target.exists():
            _build(source, defines, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as e:
        detail = (getattr(e, "stderr", b"") or b"").decode(errors="replace")[:500]
        log.warning("%s: compiled kernel unavailable (%s %s); running the PyTorch version",
                    source.name, e, detail)
        lib = None
    _loaded[source, defines] = lib
    return lib
