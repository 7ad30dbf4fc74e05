"""Integer quantization arithmetic shared by simulation and deployment.

Codes are float tensors holding exact integers so that autograd can flow through them with a
straight-through estimator; `to_int8` turns them into real int8 for integer kernels.
"""

from __future__ import annotations

import torch

ROUNDING_MODES = ("half_even", "floor_add")
#: the smallest scale qparams_from_range gives (an all-zero range still gets a usable grid)
MIN_SCALE = 1e-8


class _RoundSTE(torch.autograd.Function):
    """Rounding whose forward is exact and whose backward is the identity (STE)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mode: str) -> torch.Tensor:  # noqa: D102
        if mode == "half_even":
            return torch.round(x)
        return torch.floor(x + 0.5)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return grad, None


def round_ste(x: torch.Tensor, mode: str = "half_even") -> torch.Tensor:
    """Round `x` (any shape, float) with `mode` in ROUNDING_MODES; gradient passes straight through."""
    if mode not in ROUNDING_MODES:
        raise ValueError(f"unknown rounding mode {mode!r}; valid: {', '.join(ROUNDING_MODES)}")
    if not (x.requires_grad and torch.is_grad_enabled()):
        return torch.round(x) if mode == "half_even" else torch.floor(x + 0.5)  # same values, no autograd node
    return _RoundSTE.apply(x, mode)


def qrange(bits: int, signed: bool = True) -> tuple[int, int]:
    """Integer code range of a `bits`-wide quantizer: (-2^(b-1), 2^(b-1)-1) or (0, 2^b-1)."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def quantize_codes(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    rounding: str = "half_even",
    offset_in_rounding: bool = False,
) -> torch.Tensor:
    """Integer codes as float; scale/zero_point broadcast to x.

    clamp(round(x / scale) + zero_point) as ONNX QuantizeLinear computes, or, with
    offset_in_rounding, clamp(round(x / scale + zero_point)) as Ascend's quantize does (the two
    differ on ties when the zero point is odd).
    """
    if offset_in_rounding:
        codes = round_ste(x / scale + zero_point, rounding)
    else:
        codes = round_ste(x / scale, rounding) + zero_point
    return torch.clamp(codes, qmin, qmax)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """(codes - zero_point) * scale, the float value a code stands for."""
    return (codes - zero_point) * scale


def qparams_from_range(
    lo: torch.Tensor,
    hi: torch.Tensor,
    bits: int,
    symmetric: bool,
    signed: bool = True,
    pow2_scale: bool = False,
    eps: float = MIN_SCALE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (same shape as lo/hi, float32) that map [lo, hi] onto the code range.

    Symmetric: scale = max(|lo|, |hi|) / qmax, zero point 0 (signed) or the mid code (unsigned).
    Asymmetric: scale = (hi - lo) / (qmax - qmin), zero point = round(qmin - lo / scale), clamped.
    The range is widened to include 0 so that 0 is exactly representable.
    """
    qmin, qmax = qrange(bits, signed)
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    if symmetric:
        amax = torch.maximum(-lo, hi)
        scale = amax / (float(qmax - qmin) / 2.0 if not signed else float(qmax))
        scale = torch.clamp(scale, min=eps)
        if pow2_scale:
            scale = torch.exp2(torch.ceil(torch.log2(scale)))
        zp = torch.zeros_like(scale) if signed else torch.full_like(scale, float((qmin + qmax + 1) // 2))
    else:
        scale = torch.clamp((hi - lo) / float(qmax - qmin), min=eps)
        if pow2_scale:
            scale = torch.exp2(torch.ceil(torch.log2(scale)))
        zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zp
