"""Static per-tensor activation codes as uint8: the input of the integer convolution."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

from . import c_kernels


def uint8_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                rounding: str = "half_even", offset_in_rounding: bool = False, shift: int = 0) -> torch.Tensor:
    """clamp(round(x / scale) + zero_point, qmin, qmax) + shift (offset_in_rounding: the zero point
    added before rounding) as uint8, x's shape and strides: fake_quant.quantize_codes' integers,
    shifted (shift = 128 turns int8 codes into uint8 ones with the zero point moved by 128; qmin +
    shift >= 0, qmax + shift <= 255). scale and zero_point are 0-d float32. For inference (no
    gradient): in one pass by the C kernel where it builds and x is float32 and dense, else by torch
    ops in place on one float buffer."""
    native = None if torch.compiler.is_compiling() else _native_uint8_codes()
    if native is not None and x.dtype == torch.float32 and x.device.type == "cpu" and _dense(x):
        out = torch.empty_like(x, dtype=torch.uint8)
        if out.stride() == x.stride():
            native(x.data_ptr(), x.numel(), float(scale), float(zero_point), float(qmin), float(qmax),
                   int(rounding != "half_even"), int(offset_in_rounding), float(shift), out.data_ptr())
            return out
    codes = x.float() / scale
    if offset_in_rounding:
        codes.add_(zero_point)
    codes = codes.round_() if rounding == "half_even" else codes.add_(0.5).floor_()
    codes.add_(shift if offset_in_rounding else zero_point + shift)
    return codes.clamp_(qmin + shift, qmax + shift).to(torch.uint8)


def _dense(x: torch.Tensor) -> bool:
    """True when x's elements fill its span of memory in some order of dimensions (contiguous or
    channels-last), so that an elementwise pass over memory is one over the elements."""
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def _native_uint8_codes() -> Callable[..., None] | None:
    """csrc/uint8_codes.c's fxq_uint8_codes, or None where it does not build."""
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    return c_kernels.function("uint8_codes", "fxq_uint8_codes",
                              (ptr, i64, f32, f32, f32, f32, ctypes.c_int, ctypes.c_int, f32, ptr), None)
