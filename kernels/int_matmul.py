"""Exact int8 x int8 -> int32 matrix multiply, with the implementation chosen for the device.

`torch._int_mm` is exact and fast where the CPU has VNNI (or AMX) int8 dot products, and on CUDA.
On CPUs without them (AVX2 only) oneDNN's int8 GEMM multiplies pairs with `vpmaddubsw`, whose
16-bit intermediate sums saturate: results are wrong by up to ~1e5 for full-range codes, and
about 16x slower than an fp32 GEMM. There the codes are multiplied in fp32 with k split into
chunks of 1024, so that every partial sum (|a*b| <= 2^14, 1024 of them) stays below 2^24 and is
exact, then the chunks are added in int32.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

#: implementations of int8_matmul, by name
KERNELS = ("int_mm", "fp32_split", "fp64")
#: the largest k chunk whose fp32 sums of int8 products are exact: 1024 * 2^14 = 2^24
EXACT_FP32_K = 1024
#: ISA names (ONEDNN_MAX_CPU_ISA) that have no int8 dot product instruction
_ISAS_WITHOUT_VNNI = ("SSE41", "AVX", "AVX2", "AVX512_CORE")


@functools.cache
def cpu_has_int8_dot() -> bool:
    """True when this CPU has VNNI or AMX int8 dot products that oneDNN may use (read from
    /proc/cpuinfo, capped by ONEDNN_MAX_CPU_ISA when that names an ISA without them)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap in _ISAS_WITHOUT_VNNI:
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False  # unknown CPU (not Linux): the exact float path is always correct
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def default_kernel(device: torch.device) -> str:
    """The fastest exact int8_matmul implementation on `device`."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_int8_dot()):
        return "int_mm"
    return "fp32_split" if device.type == "cpu" else "fp64"


def int8_matmul(a: torch.Tensor, b: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
    """a int8 [m, k] @ b int8 [k, n] -> int32 [m, n], accumulated exactly.

    kernel: one of KERNELS, or None for default_kernel(a.device). "int_mm" falls back to "fp64"
    when the backend rejects the shapes (torch._int_mm wants m > 16 on some builds).
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_matmul takes int8 operands, got {a.dtype} and {b.dtype}")
    kernel = kernel or default_kernel(a.device)
    if kernel == "int_mm":
        try:
            return torch._int_mm(a, b)
        except RuntimeError:
            kernel = "fp64"
    if kernel == "fp32_split":
        k = a.shape[1]
        if k <= EXACT_FP32_K:
            return (a.float() @ b.float()).to(torch.int32)
        out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32, device=a.device)
        for start in range(0, k, EXACT_FP32_K):
            stop = start + EXACT_FP32_K
            out += (a[:, start:stop].float() @ b[start:stop].float()).to(torch.int32)
        return out
    if kernel == "fp64":
        return (a.double() @ b.double()).to(torch.int32)
    raise ValueError(f"unknown int8_matmul kernel {kernel!r}; valid: {', '.join(KERNELS)}")


class _CodeMatmul(torch.autograd.Function):
    """code_matmul with straight-through gradients: the forward is the exact integer
    accumulation, the backward that of (xc - zx) @ wc^T + qbias in float."""

    @staticmethod
    def forward(ctx, xc, wc, zx, qbias, kernel):  # noqa: D102
        ctx.save_for_backward(xc, wc)
        ctx.zx = zx
        return _accumulate(xc, wc, zx, qbias, kernel)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        xc, wc = ctx.saved_tensors
        grad_qbias = grad.sum(dim=0) if ctx.needs_input_grad[3] else None
        return grad @ wc, grad.t() @ (xc - ctx.zx), None, grad_qbias, None


def _accumulate(xc, wc, zx: int, qbias, kernel: str | None) -> torch.Tensor:
    acc = int8_matmul(xc.to(torch.int8), wc.to(torch.int8).t(), kernel)
    if zx:
        acc = acc - zx * wc.to(torch.int32).sum(dim=1)
    if qbias is not None:
        acc = acc + qbias.to(torch.int32)
    return acc.float()


def code_matmul(xc: torch.Tensor, wc: torch.Tensor, zx: int = 0, qbias: torch.Tensor | None = None,
                kernel: str | None = None) -> torch.Tensor:
    """(xc - zx) @ wc^T + qbias, accumulated exactly in int32 and returned as float32 [m, n].

    xc float [m, k] and wc float [n, k] hold int8 codes (integer-valued, in [-128, 127]); zx is the
    activation zero point; qbias float [n] an integer-valued bias on the accumulator's grid. With
    gradients enabled the values are the same, and gradients pass straight through to xc, wc and
    qbias, so training sees the deployed arithmetic.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (xc, wc, qbias)):
        return _CodeMatmul.apply(xc, wc, int(zx), qbias, kernel)
    return _accumulate(xc, wc, int(zx), qbias, kernel)
