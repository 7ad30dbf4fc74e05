"""Exact int8 x int8 -> int32 matrix multiply, with the implementation chosen for the device.

`torch._int_mm` is exact and fast where the CPU has VNNI (or AMX) int8 dot products, and on CUDA.
On CPUs without them (AVX2 only) oneDNN's int8 GEMM multiplies pairs with `vpmaddubsw`, whose
16-bit intermediate sums saturate: results are wrong by up to ~1e5 for full-range codes, and
about 16x slower than an fp32 GEMM. There oneDNN's u8 x s8 kernel runs on 7-bit parts of the
codes and the few large codes are added back exactly ("onednn_split", kernels/onednn_split.py).
Without oneDNN, the codes are multiplied in fp32 with k split into chunks of 1024, so that every
partial sum (|a*b| <= 2^14, 1024 of them) stays below 2^24 and is exact, then the chunks are added
in int32 ("fp32_split").
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch

from . import onednn_split
from .onednn_split import EXACT_FP32_K, SplitPackedWeight, code_row_sums, split_codes_matmul

#: implementations of int8_matmul, by name
KERNELS = ("int_mm", "onednn_split", "fp32_split", "fp64")
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


#: kernels whose CPU implementation is oneDNN's int8 GEMM / convolution: exact on x86 only with
#: int8 dot products (without them the 16-bit pair sums of `vpmaddubsw` saturate)
INT8_DOT_KERNELS = ("int_mm", "onednn_qconv")


@functools.cache
def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _saturating_cpu() -> bool:
    """True on an x86 CPU without int8 dot products, where INT8_DOT_KERNELS compute wrong sums."""
    return _x86() and not cpu_has_int8_dot()


def exact_kernels(device: torch.device, names: tuple[str, ...] = KERNELS) -> tuple[str, ...]:
    """The kernels of `names` that give exact sums on `device`."""
    saturating = device.type == "cpu" and _saturating_cpu()
    return tuple(k for k in names if not (saturating and k in INT8_DOT_KERNELS))


def check_exact(kernel: str, device: torch.device, names: tuple[str, ...] = KERNELS) -> None:
    """Raise ValueError where `kernel` would compute wrong sums on `device`, naming the exact ones."""
    if device.type == "cpu" and kernel in INT8_DOT_KERNELS and _saturating_cpu():
        raise ValueError(f"kernel {kernel!r} is not exact on this CPU: fxquant finds no VNNI / AMX int8 dot products "
                         f"(/proc/cpuinfo, ONEDNN_MAX_CPU_ISA), without which oneDNN's 16-bit pair sums saturate; "
                         f"exact here: {', '.join(exact_kernels(device, names))}")


def default_kernel(device: torch.device) -> str:
    """The fastest exact int8_matmul implementation on `device`."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_int8_dot()):
        return "int_mm"
    if device.type == "cpu":
        return "onednn_split" if onednn_split.available() else "fp32_split"
    return "fp64"


def int8_matmul(a: torch.Tensor, b: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
    """a int8 [m, k] @ b int8 [k, n] -> int32 [m, n], accumulated exactly.

    kernel: one of KERNELS, or None for default_kernel(a.device). "int_mm" falls back to "fp64"
    when the backend rejects the shapes (torch._int_mm wants m > 16 on some builds).
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_matmul takes int8 operands, got {a.dtype} and {b.dtype}")
    kernel = kernel or default_kernel(a.device)
    if kernel == "onednn_split":
        return split_codes_matmul(a, SplitPackedWeight(b.t().contiguous())).to(torch.int32)
    return _plain_codes_matmul(a, b.t(), kernel).to(torch.int32)


def codes_matmul(xc: torch.Tensor, wc: torch.Tensor, kernel: str | None = None,
                 packed: SplitPackedWeight | None = None, zero: int = 0,
                 wsum: torch.Tensor | None = None) -> torch.Tensor:
    """(xc - zero) @ wc^T of integer codes xc [m, k], wc [n, k] (int8, or float holding integers in
    [-128, 127]) and a Python int zero point -> [m, n] exact sums: int32 where the kernel
    accumulates in integers (int_mm, k chunks) or the sums may pass 2^24, float32 where every sum
    is exact in float32.

    No round trip through int8 where the kernel computes in float: "fp32_split" multiplies float
    codes as they are, "int_mm" converts them to int8 once. `packed`: the layer's cached operands of
    wc for "onednn_split" (built here, per call, when missing or stale), which splits the codes
    around the zero point; wsum: int32 [n] row sums of wc when known.
    """
    kernel = kernel or default_kernel(xc.device)
    if kernel == "onednn_split":
        if torch.compiler.is_compiling():
            if packed is not None:
                return split_codes_matmul(xc, packed, zero)
            kernel = "fp32_split"  # packing cannot be traced: the exact float path
        else:
            if packed is None or not packed.matches(wc):
                packed = SplitPackedWeight(wc if wc.dtype == torch.int8 else wc.to(torch.int8))
            return split_codes_matmul(xc, packed, zero)
    acc = _plain_codes_matmul(xc, wc, kernel)
    if not zero:
        return acc
    return acc.to(torch.int32) - zero * (code_row_sums(wc) if wsum is None else wsum)


def _plain_codes_matmul(xc: torch.Tensor, wc: torch.Tensor, kernel: str) -> torch.Tensor:
    """xc @ wc^T, exact, by the kernels that take no zero point."""
    if kernel == "int_mm":
        if not torch.compiler.is_compiling():
            check_exact(kernel, xc.device)
        a = xc if xc.dtype == torch.int8 else xc.to(torch.int8)
        b = wc if wc.dtype == torch.int8 else wc.to(torch.int8)
        try:
            return torch._int_mm(a, b.t())
        except RuntimeError:
            kernel = "fp64"
    if kernel == "fp32_split":
        a, b = xc.float(), wc.float()
        k = a.shape[1]
        if k <= EXACT_FP32_K:
            return a @ b.t()
        out = None
        for start in range(0, k, EXACT_FP32_K):
            part = (a[:, start:start + EXACT_FP32_K] @ b[:, start:start + EXACT_FP32_K].t()).to(torch.int32)
            out = part if out is None else out + part
        return out
    if kernel == "fp64":
        return (xc.double() @ wc.double().t()).to(torch.int32)
    raise ValueError(f"unknown int8_matmul kernel {kernel!r}; valid: {', '.join(KERNELS)}")


class _CodeMatmul(torch.autograd.Function):
    """code_matmul with straight-through gradients: the forward is the exact integer
    accumulation, the backward that of (xc - zx) @ wc^T + qbias in float."""

    @staticmethod
    def forward(ctx, xc, wc, zx, qbias, kernel, wsum, packed):  # noqa: D102
        ctx.save_for_backward(xc, wc)
        ctx.zx = zx
        return _accumulate(xc, wc, zx, qbias, kernel, wsum, packed)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        xc, wc = ctx.saved_tensors
        grad_qbias = grad.sum(dim=0) if ctx.needs_input_grad[3] else None
        grad_x = grad @ wc.to(grad.dtype)
        grad_w = grad.t() @ (xc - ctx.zx) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None, grad_qbias, None, None, None


def _accumulate(xc, wc, zx: int, qbias, kernel: str | None, wsum, packed=None) -> torch.Tensor:
    acc = codes_matmul(xc, wc, kernel, packed, zx, wsum)
    if qbias is None:
        return acc.float()
    return (acc.to(torch.int32) + qbias.to(torch.int32)).float()  # in int32: sums may pass 2^24


def code_matmul(xc: torch.Tensor, wc: torch.Tensor, zx: int = 0, qbias: torch.Tensor | None = None,
                kernel: str | None = None, wsum: torch.Tensor | None = None,
                packed: SplitPackedWeight | None = None) -> torch.Tensor:
    """(xc - zx) @ wc^T + qbias, accumulated exactly and returned as float32 [m, n].

    xc [m, k] and wc [n, k] hold int8 codes (int8, or float integers in [-128, 127]); zx is the
    activation zero point (a Python int); qbias float [n] an integer-valued bias on the
    accumulator's grid; wsum int32 [n] the row sums of wc when known (saves a pass over wc). With
    gradients enabled the values are the same, and gradients pass straight through to xc, wc and
    qbias, so training sees the deployed arithmetic. packed: the layer's cached "onednn_split"
    operands of wc.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (xc, wc, qbias)):
        return _CodeMatmul.apply(xc, wc, int(zx), qbias, kernel, wsum, packed)
    return _accumulate(xc, wc, int(zx), qbias, kernel, wsum, packed)
