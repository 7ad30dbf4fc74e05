"""Exact int8 x int8 -> int32 matrix multiply."""

from __future__ import annotations

import torch


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a int8 [m, k] @ b int8 [k, n] -> int32 [m, n], accumulated exactly.

    Uses `torch._int_mm` (CPU and CUDA) and falls back to float64 accumulation, which is exact for
    int8 operands while k < 2**37, when the backend rejects the shapes.
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_matmul takes int8 operands, got {a.dtype} and {b.dtype}")
    try:
        return torch._int_mm(a, b)
    except RuntimeError:
        return (a.double() @ b.double()).to(torch.int32)
