"""C kernels of kernels/csrc, compiled on first use with this machine's C compiler and loaded
with ctypes, as inductor compiles its own kernels.

A library is built once per source, compiler and CPU (`-march=native`: the CPU's own vector
instructions, capped on x86 at the capability ATen dispatches to, which ATEN_CPU_CAPABILITY may
lower, as inductor caps its own kernels), into $FXQUANT_KERNEL_CACHE or <user cache>/fxquant/kernels, written to a temporary
name and renamed when complete. Where there is no compiler or the build fails, `load` returns None
(logged once) and callers take their torch-op path: the results are the same.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = Path(__file__).resolve().parent / "csrc"
#: compiler flags; OpenMP resolves to the runtime torch has already loaded (libgomp.so.1)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")
#: on x86, per ATen CPU capability below AVX-512, the vector extensions the kernels may not use
ISA_CAPS = {"AVX2": ("-mno-avx512f",), "DEFAULT": ("-mno-avx",)}


def flags() -> tuple[str, ...]:
    """FLAGS, capped on x86 at torch.backends.cpu.get_cpu_capability() (AVX2: no AVX-512 even on
    a CPU that has it, so that ATEN_CPU_CAPABILITY=avx2 runs what an AVX2-only CPU runs)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
        return FLAGS
    return FLAGS + ISA_CAPS.get(torch.backends.cpu.get_cpu_capability(), ())


def compiler() -> str | None:
    """The C compiler: $CC, else cc, gcc or clang on PATH; None when there is none."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_dir() -> Path:
    """Where built libraries are kept: $FXQUANT_KERNEL_CACHE, else $XDG_CACHE_HOME (or ~/.cache)
    /fxquant/kernels."""
    if os.environ.get("FXQUANT_KERNEL_CACHE"):
        return Path(os.environ["FXQUANT_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fxquant" / "kernels"


def _cpu_identity() -> str:
    """The model name and flags of this CPU (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """csrc/<name>.c as a loaded library, built when missing; None (logged once) where it cannot be
    built here."""
    source = SOURCES / f"{name}.c"
    cc = compiler()
    if cc is None:
        logger.info("no C compiler found ($CC, cc, gcc, clang): %s runs as torch ops", name)
        return None
    options = flags()
    key = hashlib.sha256("\0".join([source.read_text(), cc, *options, _cpu_identity()]).encode()).hexdigest()[:16]
    try:
        return ctypes.CDLL(str(_built(source, cc, options, key)))
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        detail = getattr(err, "stderr", None) or err
        logger.warning("could not build the C kernel %s (%s): it runs as torch ops", name, str(detail).strip()[-500:])
        return None


@functools.cache
def function(name: str, symbol: str, argtypes: tuple, restype: type = ctypes.c_int) -> Callable[..., int] | None:
    """The C function `symbol` of csrc/<name>.c with its argument and result types, or None where
    the library does not build here."""
    lib = load(name)
    if lib is None:
        return None
    fn = getattr(lib, symbol)
    fn.argtypes, fn.restype = list(argtypes), restype
    return fn


def _built(source: Path, cc: str, options: tuple[str, ...], key: str) -> Path:
    """The library of `source` in cache_dir(), compiled when not there yet (to a temporary name in
    the same folder, renamed when complete: concurrent builds do not see half a file)."""
    folder = cache_dir()
    target = folder / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        subprocess.run([cc, *options, str(source), "-o", tmp], check=True, capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("built %s", target)
    return target
