"""The bases of a layer's cache of operands derived from its stored weight codes (oneDNN's packed
weights, C kernels bound to them): tied to the codes it was built from, never copied or saved."""

from __future__ import annotations

import torch


class WeightCodesCache:
    """Operands derived from one stored codes tensor, for one process. `matches` says whether they
    are still those of the codes; a deep copy or an unpickled copy is None, so that the copied
    layer builds its own from its own codes (oneDNN's packed layouts are per process)."""

    def __init__(self, source: torch.Tensor) -> None:
        self.source = (source.data_ptr(), source._version, tuple(source.shape))

    def matches(self, source: torch.Tensor) -> bool:
        """True when built from these stored codes as they are now (same storage, version and shape)."""
        return self.source == (source.data_ptr(), source._version, tuple(source.shape))

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self) -> tuple:
        return _no_cache, ()


def _no_cache() -> None:
    return None


class BoundRowKernel(WeightCodesCache):
    """A C kernel bound to one layer's operands (`operands`: the tensors whose addresses it holds,
    kept alive with it), taking float32 x [..., k] of a few rows to float32 [..., n]. Subclasses
    set `name`, `n`, `k` and run the kernel in `_run`; a copy or an unpickled one is None."""

    name = "C kernel"
    n: int
    k: int

    def _run(self, x: int, rows: int, y: int) -> int:
        """Run the kernel on x float32 [rows, k] into y float32 [rows, n] (addresses); 0 on success."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.shape[-1] != self.k:
            raise ValueError(f"{self.name} takes float32 x [..., {self.k}]; got {x.dtype} {tuple(x.shape)}")
        if not x.is_contiguous():
            x = x.contiguous()
        y = torch.empty((*x.shape[:-1], self.n), dtype=torch.float32)  # no reshapes: each costs ~1 us
        status = self._run(x.data_ptr(), x.numel() // self.k, y.data_ptr())
        if status:
            raise ValueError(f"{self.name} refused x {tuple(x.shape)} for [{self.n}, {self.k}] (status {status})")
        return y


def float32_rows(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """A per-row operand of a C kernel: float32 [n], contiguous, detached (one value per tensor
    broadcast to the n rows); None stays None."""
    return None if t is None else t.detach().reshape(-1).expand(n).to(torch.float32).contiguous()
