"""Static per-tensor activation codes for convolutions: uint8 (integer kernels) or centred float32
(the exact float path)."""

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
    out = _native_codes("fxq_uint8_codes", torch.uint8, x, scale, zero_point, qmin, qmax, rounding, offset_in_rounding,
                        shift)
    if out is not None:
        return out
    return _torch_codes(x, scale, zero_point, qmin, qmax, rounding, offset_in_rounding).add_(shift).to(torch.uint8)


def centred_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                  rounding: str = "half_even", offset_in_rounding: bool = False,
                  centre: int | torch.Tensor = 0) -> torch.Tensor:
    """quantize_codes(x, ...) - centre as float32, x's shape and strides (centre = the zero point:
    the integer-valued input of an exact float convolution). For inference (no gradient): in one
    pass by the C kernel where it builds and x is float32 and dense, else by torch ops. centre: an
    integer, or a 0-d tensor holding one."""
    out = _native_codes("fxq_centred_codes", torch.float32, x, scale, zero_point, qmin, qmax, rounding,
                        offset_in_rounding, centre)
    if out is not None:
        return out
    return _torch_codes(x, scale, zero_point, qmin, qmax, rounding, offset_in_rounding).sub_(centre)


def _torch_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                 rounding: str, offset_in_rounding: bool) -> torch.Tensor:
    """quantize_codes' integers as a new float32 tensor, by torch ops in place on one buffer."""
    codes = x.float() / scale
    if offset_in_rounding:
        codes.add_(zero_point)
    codes = codes.round_() if rounding == "half_even" else codes.add_(0.5).floor_()
    if not offset_in_rounding:
        codes.add_(zero_point)
    return codes.clamp_(qmin, qmax)


def _native_codes(symbol: str, dtype: torch.dtype, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                  qmin: int, qmax: int, rounding: str, offset_in_rounding: bool,
                  last: int | torch.Tensor) -> torch.Tensor | None:
    """The codes by csrc/activation_codes.c's `symbol` into a new `dtype` tensor with x's strides,
    or None where the kernel does not take x (not float32 and dense on the CPU, traced, or no C
    compiler)."""
    if torch.compiler.is_compiling() or x.dtype != torch.float32 or x.device.type != "cpu" or not _dense(x):
        return None
    native = _native_function(symbol)
    out = torch.empty_like(x, dtype=dtype)
    if native is None or out.stride() != x.stride():
        return None
    native(x.data_ptr(), x.numel(), float(scale), float(zero_point), float(qmin), float(qmax),
           int(rounding != "half_even"), int(offset_in_rounding), float(last), out.data_ptr())
    return out


def _dense(x: torch.Tensor) -> bool:
    """True when x's elements fill its span of memory in some order of dimensions (contiguous or
    channels-last), so that an elementwise pass over memory is one over the elements."""
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def _native_function(symbol: str) -> Callable[..., None] | None:
    """csrc/activation_codes.c's `symbol` (fxq_uint8_codes or fxq_centred_codes), or None where it
    does not build."""
    f32, ptr = ctypes.c_float, ctypes.c_void_p
    return c_kernels.function("activation_codes", symbol,
                              (ptr, ctypes.c_int64, f32, f32, f32, f32, ctypes.c_int, ctypes.c_int, f32, ptr), None)
