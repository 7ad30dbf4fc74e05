"""Memory a model holds and memory the process has used."""

from __future__ import annotations

import bisect
import ctypes
import functools
import gc
import logging
import resource
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


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
def _libc_function(name: str) -> Callable[..., int] | None:
    """glibc's function `name`, or None off glibc."""
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Give the pages of freed heap memory back to the operating system (glibc's malloc_trim).

    Between two forward passes every tensor of the first is free, but glibc keeps freed heap
    pages resident, and the small tensors that live on (statistics, scales) pin the pages around
    them, so a loop of forwards grows the resident set well past what is live. Calibration loops
    call this after each sample; it changes no allocator setting. No-op off glibc.
    """
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


def file_mapped_ranges() -> list[tuple[int, int]]:
    """Sorted [start, end) address ranges of this process mapped from regular files, read from
    /proc/self/maps (Linux); [] elsewhere. Shared-memory files (/dev/shm, memfd, deleted files)
    are not counted: tensors there were shared on purpose."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return []
    ranges = []
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not fields[5].startswith("/") or fields[5].startswith("/dev/"):
            continue
        if fields[5].endswith("(deleted)") or fields[4] == "0":
            continue
        start, end = (int(a, 16) for a in fields[0].split("-"))
        ranges.append((start, end))
    return sorted(ranges)


def copy_out_of_file_mappings(tensors: Iterable[torch.Tensor]) -> int:
    """Give each of `tensors` (a module's parameters and buffers) whose bytes lie in a file mapping
    its own memory.

    A checkpoint loaded with mmap (transformers' safetensors loading) keeps one mapping of the
    whole file alive while any of its tensors lives, and every page of it that calibration read
    stays resident: a quantized SmolLM2 whose float embedding still views the file keeps about
    400 MB of replaced float weights in its resident set. Tensors keep their identity (`.data` is
    swapped) and ties (one copy per tensor view). The file pages each copy read are handed back
    (madvise MADV_PAGEOUT, a reclaim hint that never loses data): while the mapping lives on, they
    would stay resident beside the copy. Returns the bytes copied.
    """
    ranges = file_mapped_ranges()
    if not ranges:
        return 0
    copies: dict[tuple, torch.Tensor] = {}
    for t in tensors:
        if not in_file_mapping(t, ranges):
            continue
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if key not in copies:
            copies[key] = t.detach().clone()
            source = t.untyped_storage()
            if not _has_private_copies(source.data_ptr(), source.nbytes()):
                _page_out(source.data_ptr(), source.nbytes())  # the pages the copy just read
        t.data = copies[key]
    copied = sum(t.nbytes for t in copies.values())
    if copied:
        log.info("copied %d tensors (%.1f MB) out of file mappings", len(copies), copied / 2**20)
    return copied


def in_file_mapping(t: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    """True when the storage of CPU tensor `t` starts inside one of `ranges` (file_mapped_ranges())."""
    if t.device.type != "cpu" or t.numel() == 0:
        return False
    address = t.untyped_storage().data_ptr()
    i = bisect.bisect_right(ranges, address, key=lambda r: r[0]) - 1  # the last range starting at or before it
    return i >= 0 and address < ranges[i][1]


def page_out_file_pages(t: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    """Hand back the resident file pages of `t`'s bytes when they lie in a file mapping (`ranges`:
    file_mapped_ranges()): a reclaim hint (MADV_PAGEOUT) that never changes a value, the pages are
    read again from the file if touched. For weights a pass has read for the last time, e.g. a
    layer calibration has finished with (with mmap loading, each read layer would otherwise stay
    resident until the end). Pages written in place (private copies) are left alone. Returns
    whether the pages were handed back."""
    if not in_file_mapping(t, ranges) or _has_private_copies(t.data_ptr(), t.nbytes):
        return False
    _page_out(t.data_ptr(), t.nbytes)
    return True


def _has_private_copies(address: int, nbytes: int) -> bool:
    """True when a page of [address, address + nbytes) is a private copy: written in a private file
    mapping (e.g. a smoothing fold in place), resident as anonymous memory or swapped out
    (/proc/self/pagemap: present without bit 61, "file page or shared anonymous", or bit 62).
    Paging such pages out would write them to swap rather than drop them. False where pagemap
    cannot be read (the hint still never loses data)."""
    page = resource.getpagesize()
    first, last = address // page, (address + nbytes - 1) // page
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(first * 8)
            entries = np.frombuffer(f.read((last - first + 1) * 8), dtype=np.uint64)
    except OSError:
        return False
    present, swapped, file_page = ((entries >> np.uint64(bit)) & np.uint64(1) for bit in (63, 62, 61))
    return bool(((present & (file_page ^ np.uint64(1))) | swapped).any())


_MADV_PAGEOUT = 21  # Linux 5.4+


def _page_out(address: int, nbytes: int) -> None:
    """Ask the kernel to reclaim the whole pages of [address, address + nbytes) (MADV_PAGEOUT):
    clean file pages leave the resident set and are read again from the file if touched; dirty
    private pages stay unless they can be swapped. No-op where madvise is unavailable."""
    madvise = _libc_function("madvise")
    page = resource.getpagesize()
    start, end = -(-address // page) * page, (address + nbytes) // page * page
    if madvise is not None and end > start:
        madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(_MADV_PAGEOUT))


def release_unused_memory(module: torch.nn.Module) -> None:
    """Free what a finished quantization (or checkpoint load) leaves behind, keeping `module` whole.

    Three steps: collect reference cycles (torch.export's module and graph refer to each other and
    hold the float model's weights until Python's next full collection, which may never come), copy
    `module`'s tensors out of file mappings (copy_out_of_file_mappings), give freed heap pages back
    (release_freed_memory). With the unmap_kept_tensors pass, this took SmolLM2 w8a8_dynamic's
    resident set after quantization from about 1.0 GB to 0.7 GB.
    """
    gc.collect()
    copy_out_of_file_mappings([*module.parameters(), *module.buffers()])
    release_freed_memory()
