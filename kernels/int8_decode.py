"""Eager decode of W8A8 linear layers: csrc/int8_decode.c computes a few rows (per-token or
static per-tensor input codes, their int32 sums against the int8 weight codes, the output
scaling) in one C call, with the float32 operations of QLinear's torch path in its order: the
outputs are the same floats.

At one row the torch path (the input's quantizer, torch._int_mm, the scalings and the bias: about
20 ATen ops) took 81 us for SmolLM2's 576 -> 1536 layer, the C call 17 us, fp32 F.linear 75 us
with its weight in cache (AVX-512, 2 threads).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import c_kernels
from .layer_cache import BoundRowKernel

#: the most rows (tokens) the kernel takes: decode's
INT8_DECODE_MAX_ROWS = 8
#: rounding modes of fake_quant.ROUNDING_MODES, as the kernel numbers them
_ROUNDING = {"half_even": 0, "floor_add": 1}


class _Operands(ctypes.Structure):
    """struct fxq_int8_decode of csrc/int8_decode.c."""

    _fields_ = [("k", ctypes.c_int64), ("n", ctypes.c_int64), ("w", ctypes.c_void_p), ("out_scale", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("qbias", ctypes.c_void_p), ("per_token", ctypes.c_int32),
                ("mode", ctypes.c_int32), ("offset_in_rounding", ctypes.c_int32), ("centre", ctypes.c_int32),
                ("scale", ctypes.c_float), ("zero", ctypes.c_float), ("qmin", ctypes.c_float),
                ("qmax", ctypes.c_float), ("min_scale", ctypes.c_float)]


def _checked(t: torch.Tensor | None, dtype: torch.dtype, shape: tuple[int, ...], name: str) -> torch.Tensor | None:
    if t is not None and (t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous() or t.device.type != "cpu"):
        raise ValueError(f"the int8 decode kernel takes {name} as contiguous CPU {dtype} {list(shape)}; "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    return t


class Int8DecodeLinear(BoundRowKernel):
    """The C kernel bound to one layer's operands (build it with `per_token` or `static`). Called
    with float32 x [..., k] of at most INT8_DECODE_MAX_ROWS rows: float32 [..., n]. It holds the
    operands while it holds their addresses; like every WeightCodesCache, a copy or an unpickled
    one is None (the addresses are this process's)."""

    name = "the int8 decode kernel"

    def __init__(self, codes: torch.Tensor, out_scale: torch.Tensor, bias: torch.Tensor | None,
                 qbias: torch.Tensor | None, rounding: str, **fields: float) -> None:
        super().__init__(codes)
        if codes.dim() != 2 or rounding not in _ROUNDING:
            raise ValueError(f"the int8 decode kernel takes int8 codes [n, k] and a rounding of "
                             f"{', '.join(_ROUNDING)}; got codes {tuple(codes.shape)}, rounding {rounding!r}")
        n, k = codes.shape
        _checked(codes, torch.int8, (n, k), "codes")
        _checked(out_scale, torch.float32, (n,), "out_scale")
        _checked(bias, torch.float32, (n,), "bias")
        _checked(qbias, torch.int32, (n,), "qbias")
        self.n, self.k = n, k
        self.operands = (codes, out_scale, bias, qbias)  # kept alive while their addresses are used
        self.struct = _Operands(k=k, n=n, w=codes.data_ptr(), out_scale=out_scale.data_ptr(),
                                bias=None if bias is None else bias.data_ptr(),
                                qbias=None if qbias is None else qbias.data_ptr(), mode=_ROUNDING[rounding], **fields)
        self.pointer = ctypes.addressof(self.struct)

    @classmethod
    def per_token(cls, codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, qmin: int, qmax: int,
                  min_scale: float, rounding: str) -> Int8DecodeLinear:
        """Per-token symmetric input codes in [qmin, qmax], scale max|x| / qmax (at least
        min_scale): y = sums * w_scale [n] * the token's scale + bias [n]."""
        return cls(codes, w_scale, bias, None, rounding, per_token=1, qmin=qmin, qmax=qmax, min_scale=min_scale)

    @classmethod
    def static(cls, codes: torch.Tensor, deq: torch.Tensor, qbias: torch.Tensor | None, scale: float, zero: float,
               qmin: int, qmax: int, rounding: str, offset_in_rounding: bool, centre: int) -> Int8DecodeLinear:
        """Static per-tensor input codes (quantize_codes with scale, zero, [qmin, qmax]), less
        `centre`: y = (sums + qbias [n], int32) * deq [n]."""
        return cls(codes, deq, None, qbias, rounding, per_token=0, qmin=qmin, qmax=qmax, scale=scale, zero=zero,
                   offset_in_rounding=int(offset_in_rounding), centre=centre)

    def _run(self, x: int, rows: int, y: int) -> int:
        return _native_int8_decode()(self.pointer, x, rows, y)


@functools.cache
def _native_int8_decode():  # noqa: ANN202 (a ctypes function)
    """csrc/int8_decode.c's fxq_int8_decode, or None where it does not build."""
    ptr = ctypes.c_void_p
    return c_kernels.function("int8_decode", "fxq_int8_decode", (ptr, ptr, ctypes.c_int64, ptr))


def int8_decode_available() -> bool:
    """True where the int8 decode C kernel builds on this machine."""
    return _native_int8_decode() is not None
