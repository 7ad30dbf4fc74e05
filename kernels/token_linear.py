"""Eager decode of dynamic per-token W8A8 layers: csrc/token_codes_linear.c quantizes a few rows
per token and sums their codes against the int8 weight codes in int32, in one C call.

At one row the torch path (DynamicQuantizer.quantize, torch._int_mm, two scalings and a bias:
about 20 ATen ops) took 85 us for SmolLM2's 576 -> 1536 layer against 72 us for the fp32
F.linear with its weight in cache; the C call does the same float32 operations in the same order,
so the outputs are the same floats.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch

from . import c_kernels
from .layer_cache import WeightCodesCache

#: the most rows (tokens) the kernel takes: decode's
TOKEN_LINEAR_MAX_ROWS = 8
#: rounding modes of fake_quant.ROUNDING_MODES, as the kernel numbers them
_ROUNDING = {"half_even": 0, "floor_add": 1}


class NativeTokenLinear(WeightCodesCache):
    """The C kernel bound to one layer's operands: weight codes int8 [n, k] (contiguous), weight
    scale float32 [n], bias float32 [n] or None, the input codes' range [qmin, qmax], smallest
    scale and rounding mode. Called with float32 x [..., k] of at most TOKEN_LINEAR_MAX_ROWS rows:
    float32 [..., n]. Like every WeightCodesCache, a copy or an unpickled one is None (it holds
    this process's addresses)."""

    def __init__(self, run: Callable[..., int], codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 qmin: int, qmax: int, min_scale: float, rounding: str) -> None:
        super().__init__(codes)
        self.n, self.k = codes.shape
        fits = (codes.dtype == torch.int8 and codes.is_contiguous() and w_scale.dtype == torch.float32
                and w_scale.shape == (self.n,) and w_scale.is_contiguous() and rounding in _ROUNDING
                and (bias is None or (bias.dtype == torch.float32 and bias.shape == (self.n,) and bias.is_contiguous())))
        if not fits:
            raise ValueError(f"the token linear kernel takes int8 codes [n, k], float32 w_scale and bias [n] and a "
                             f"rounding of {', '.join(_ROUNDING)}; got codes {codes.dtype} {tuple(codes.shape)}, "
                             f"w_scale {w_scale.dtype} {tuple(w_scale.shape)}, rounding {rounding!r}")
        self.run, self.operands = run, (codes, w_scale, bias)
        self.pointers = (codes.data_ptr(), w_scale.data_ptr(), None if bias is None else bias.data_ptr())
        self.qrange, self.min_scale, self.mode = (float(qmin), float(qmax)), min_scale, _ROUNDING[rounding]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.shape[-1] != self.k:
            raise ValueError(f"the token linear kernel takes float32 x [..., {self.k}]; got {x.dtype} {tuple(x.shape)}")
        if not x.is_contiguous():
            x = x.contiguous()
        y = torch.empty((*x.shape[:-1], self.n), dtype=torch.float32)
        codes, w_scale, bias = self.pointers
        status = self.run(x.data_ptr(), x.numel() // self.k, self.k, codes, self.n, w_scale, bias, *self.qrange,
                          self.min_scale, self.mode, y.data_ptr())
        if status:
            raise ValueError(f"the token linear kernel refused x {tuple(x.shape)} for [{self.n}, {self.k}] "
                             f"(status {status})")
        return y


def bind_token_linear(codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, qmin: int, qmax: int,
                      min_scale: float, rounding: str) -> NativeTokenLinear | None:
    """NativeTokenLinear for these operands; None where the C kernel does not build here."""
    run = _native_token_linear()
    return None if run is None else NativeTokenLinear(run, codes, w_scale, bias, qmin, qmax, min_scale, rounding)


@functools.cache
def _native_token_linear() -> Callable[..., int] | None:
    """csrc/token_codes_linear.c's fxq_token_codes_linear, or None where it does not build."""
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    return c_kernels.function("token_codes_linear", "fxq_token_codes_linear",
                              (ptr, i64, i64, ptr, i64, ptr, ptr, f32, f32, f32, ctypes.c_int, ptr))


def token_linear_available() -> bool:
    """True where the token linear C kernel builds on this machine."""
    return _native_token_linear() is not None
