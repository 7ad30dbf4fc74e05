"""Memory a model holds and memory the process has used."""

from __future__ import annotations

import ctypes
import functools
import resource
from collections.abc import Callable
from pathlib import Path

import torch


def storage_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers of `module`, each storage counted once (tied weights too)."""
    seen: dict[int, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def peak_rss_bytes() -> int:
    """Peak resident memory of this process image in bytes.

    Reads VmHWM from /proc/self/status (Linux), which starts afresh at exec; ru_maxrss would
    include the memory of a large parent that forked this process (e.g. a test runner holding
    models). Falls back to ru_maxrss (KiB on Linux) elsewhere.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@functools.cache
def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc: nothing to release this way


def release_freed_memory() -> None:
    """Give the pages of freed heap memory back to the operating system (glibc's malloc_trim).

    Between two forward passes every tensor of the first is free, but glibc keeps freed heap
    pages resident, and the small tensors that live on (statistics, scales) pin the pages around
    them, so a loop of forwards grows the resident set well past what is live. Calibration loops
    call this after each sample; it changes no allocator setting. No-op off glibc.
    """
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)
