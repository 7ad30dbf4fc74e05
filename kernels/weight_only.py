"""Weight-only layers: integer weight codes in compact storage, dequantized where they are used.

4-bit codes are stored two per byte (uint8 [n, k / 2], low nibble first); 8-bit codes as int8.
Inputs of many rows dequantize the codes and run one float GEMM. Inputs of few rows (decode: one
token per sequence) run a GEMV that reads the compact codes once instead of writing a float weight
and reading it back: eager the C kernel csrc/codes_gemv.c (`native_codes_gemv`), under
torch.compile the form of a broadcast multiply and a sum over k (`codes_gemv`), which inductor
fuses with the dequantization into one loop.

For that GEMV a linear layer keeps its codes in the GEMV layout (`to_gemv_layout`): the bytes of
B output rows interleaved word by word, [n / B, k_bytes / 4, 4 B], B = `gemv_block()` (one vector
of floats). Inductor's generated loop then loads each int32 word of B rows as one vector, takes it
apart with shifts (4 int8 or 8 int4 codes) and multiplies it by one input value broadcast to the
vector, with no transposes. B and the dtype the words are loaded as depend on the CPU
(GEMV_BLOCKS, GEMV_WORD_DTYPES).
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import c_kernels
from .layer_cache import BoundRowKernel

#: inputs with at most this many rows take the fused GEMV form under torch.compile
GEMV_MAX_ROWS = 8
#: per CPU capability, the GEMV layout's rows per block: the float lanes of one vector of the ISA
#: inductor generates code for
GEMV_BLOCKS = {"AVX512": 16}
DEFAULT_GEMV_BLOCK = 8
#: per block size, the dtype codes_gemv loads the layout's words as (float32: then bit cast).
#: Measured at 576 -> 1536, one row, against an fp32 F.linear in cache: on AVX-512, blocks of 8
#: rows ran at 0.06x (a loop shorter than the vector), 16 rows loaded as float 0.25x (the bit cast
#: goes through a stack buffer), 16 rows loaded as int32 0.63x; on AVX2 (AMD EPYC) 8 rows loaded
#: as float 0.70-0.86x, where int32 loads went through a stack buffer, 4-5x slower.
GEMV_WORD_DTYPES = {8: torch.float32, 16: torch.int32}


def gemv_block() -> int:
    """Output rows per block of the GEMV layout on this CPU (honours ATEN_CPU_CAPABILITY, as
    inductor's choice of vector ISA does)."""
    return GEMV_BLOCKS.get(torch.backends.cpu.get_cpu_capability(), DEFAULT_GEMV_BLOCK)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (float or int, [n, ...], signed range of `bits`) in compact storage: int8 of
    the same shape for 8 bits; for 4 bits uint8 [n, numel / n / 2], two codes per byte."""
    if bits == 8:
        return codes.round().to(torch.int8)
    if bits != 4:
        raise ValueError(f"compact storage holds 4- or 8-bit codes, not {bits}-bit")
    flat = (codes.round().to(torch.int16) + 8).reshape(codes.shape[0], -1)  # [0, 15]
    if flat.shape[1] % 2:
        raise ValueError(f"4-bit codes pack in pairs; a row has {flat.shape[1]} codes")
    return (flat[:, 0::2] | (flat[:, 1::2] << 4)).to(torch.uint8)


def unpack_codes(stored: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The int8 codes of `shape` that pack_codes stored."""
    if bits == 8:
        return stored.reshape(shape)
    return (torch.stack((stored & 15, stored >> 4), dim=-1).view(torch.int8) - 8).reshape(shape)


def linear_from_weight(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x [..., k], weight [n, k], bias [n]) -> [..., n]; under torch.compile, for inputs of
    at most GEMV_MAX_ROWS rows, as a multiply-and-sum that inductor fuses with the ops that made
    `weight` (e.g. dequantizing int8 codes). The two forms differ only by float summation order."""
    if torch.compiler.is_compiling() and x.numel() <= GEMV_MAX_ROWS * x.shape[-1]:
        y = (x.unsqueeze(-2) * weight.to(x.dtype)).sum(-1)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def gemv_layout_ok(shape: tuple[int, ...], bits: int, group_size: int | None, block: int) -> bool:
    """True when codes of a weight of `shape` ([n, k]) fit the GEMV layout with `block` rows per
    block: n a multiple of block, whole int32 words per row (and per group), a little-endian machine."""
    per_word = 32 // bits
    return (len(shape) == 2 and bits in (4, 8) and sys.byteorder == "little" and shape[0] % block == 0
            and shape[1] % per_word == 0 and (group_size is None or group_size % per_word == 0))


def to_gemv_layout(stored: torch.Tensor, block: int) -> torch.Tensor:
    """pack_codes' storage [n, kb] (int8 [n, k] or uint8 [n, k / 2]) -> the same bytes as
    [n / B, kb / 4, 4 B] (B = block): 4-byte word j of rows B i .. B i + B - 1 side by side."""
    n, kb = stored.shape
    return (stored.reshape(n // block, block, kb // 4, 4).transpose(1, 2)
            .reshape(n // block, kb // 4, 4 * block).contiguous())


def from_gemv_layout(blocked: torch.Tensor) -> torch.Tensor:
    """Inverse of to_gemv_layout (B read from the shape): [n / B, w, 4 B] -> [n, 4 w], rows in
    order (a new tensor). The words move as int32 (10x faster than moving the bytes in runs of 4)."""
    nb, w, four_b = blocked.shape
    words = blocked.view(torch.int32).transpose(1, 2).reshape(nb * (four_b // 4), w).contiguous()
    return words.view(blocked.dtype)


def codes_gemv(x: torch.Tensor, blocked: torch.Tensor, bits: int, scale: torch.Tensor,
               zero_point: torch.Tensor | None = None, group_size: int | None = None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., k] @ dequantized(codes)^T + bias -> [..., n], as a multiply-and-sum over codes in the
    GEMV layout (to_gemv_layout of int8 [n, k] for bits 8, of pack_codes' uint8 [n, k / 2] for 4).

    scale and zero_point: [n] per channel (zero_point None: symmetric), or [n, k / group_size] per
    group. The weight is (code - zero_point) * scale; the result equals F.linear of it up to float
    rounding (sums in another order)."""
    per_word = 32 // bits
    # x as a buffer of its own: inductor would otherwise inline the ops that made it (the RMSNorm
    # before lm_head and q/k/v, SiLU * up before down_proj) into the loop over output blocks and
    # recompute them once per block (lm_head: 3072 times; its GEMV ran 3x slower). as_strided is a
    # view eager; inductor's lowering of it realizes its input.
    x = torch.as_strided(x, x.shape, x.stride())
    words = blocked.view(GEMV_WORD_DTYPES.get(blocked.shape[-1] // 4, torch.int32)).view(torch.int32)  # [n / B, w, B]
    nb, w, b = words.shape
    lead, k = x.shape[:-1], x.shape[-1]
    xt = x.reshape(-1, 1, w, per_word, 1).unbind(-2)  # per code t of a word: x [m, 1, w, 1]
    # 4-bit codes are summed as stored, code + 8 in [0, 15] (one op fewer per code), and the 8 is
    # taken off with the zero point. The codes of a word are summed four at a time, each four in
    # its own reduction: inductor keeps a sum of at most ~50 ops in the reduction's loop, and writes
    # a longer one out as a float buffer the size of the weight.
    offset = zero_point if bits == 8 else (8 if zero_point is None else zero_point + 8)
    groups = 1 if group_size is None else scale.shape[1]
    sums = None  # [m, n / B, B] per channel, [m, n / B, G, B] per group: sum of x * code
    for first in range(0, per_word, 4):
        inner = None  # [m, n / B, w, B]
        for t in range(first, first + 4):
            if bits == 8:
                code = words >> 24 if t == 3 else (words << (24 - 8 * t)) >> 24  # sign-extended byte t
            else:
                code = (words >> (4 * t) if t else words) & 15  # nibble t
            term = xt[t] * code.to(x.dtype)
            inner = term if inner is None else inner + term
        part = inner.sum(-2) if group_size is None else inner.unflatten(-2, (groups, w // groups)).sum(-2)
        sums = part if sums is None else sums + part
    if group_size is None:
        if offset is not None:
            off = offset if isinstance(offset, int) else offset.to(x.dtype).reshape(nb, b)
            sums = sums - off * x.sum(-1).reshape(-1, 1, 1)
        y = sums * scale.to(x.dtype).reshape(nb, b)
    else:
        if offset is not None:
            off = offset if isinstance(offset, int) else offset.to(x.dtype).reshape(nb, b, groups).transpose(-1, -2)
            sums = sums - off * x.reshape(-1, 1, groups, k // groups).sum(-1)[..., None]
        y = (sums * scale.to(x.dtype).reshape(nb, b, groups).transpose(-1, -2)).sum(-2)
    y = y.reshape(*lead, nb * b)
    return y if bias is None else y + bias


def gemv_offsets(bits: int, zero_point: torch.Tensor | None, n: int, groups: int) -> torch.Tensor | None:
    """What the stored codes carry above the real ones, float32 [n, groups]: the zero point, plus 8
    for 4-bit codes (stored as code + 8); None where that is 0 (symmetric 8-bit codes)."""
    if zero_point is None:
        return None if bits == 8 else torch.full((n, groups), 8.0)
    offset = zero_point.to(torch.float32).reshape(n, groups)
    return (offset if bits == 8 else offset + 8).contiguous()


class NativeGemv(BoundRowKernel):
    """codes_gemv's C kernel (csrc/codes_gemv.c) bound to one layer's operands, checked once: the
    GEMV layout `blocked` [n / B, w, 4 B], scale float32 [n, groups] (contiguous), offset from
    gemv_offsets and bias float32 [n] or None. Called with float32 x [..., k] of at most
    GEMV_MAX_ROWS rows: float32 [..., n]. It holds the operands while it holds their addresses,
    and, as every WeightCodesCache, a copy or an unpickled one is None (the addresses are this
    process's). Binding once per layer, not per call, saves about 3 us of a 12-43 us decode GEMV
    (benchmarks/gemv_overhead.py)."""

    name = "codes_gemv's C kernel"

    def __init__(self, run: Callable[..., int], blocked: torch.Tensor, bits: int, scale: torch.Tensor,
                 offset: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        super().__init__(blocked)
        nb, w, four_b = blocked.shape
        self.block, (self.n, self.groups) = four_b // 4, scale.shape
        self.k, self.bits = w * 32 // bits, bits
        operands_fit = (scale.dtype == torch.float32 and blocked.is_contiguous() and scale.is_contiguous()
                        and nb * self.block == self.n
                        and (offset is None or (offset.shape == scale.shape and offset.dtype == torch.float32
                                                and offset.is_contiguous()))
                        and (bias is None or (bias.shape == (self.n,) and bias.dtype == torch.float32
                                              and bias.is_contiguous())))
        if not operands_fit:
            raise ValueError(f"codes_gemv's C kernel takes contiguous codes [n / B, k * bits / 32, 4 B] and float32 "
                             f"scale / offset [n, groups], bias [n]; got codes {tuple(blocked.shape)}, {bits} bits, "
                             f"scale {scale.dtype} {tuple(scale.shape)}")
        self.run, self.operands = run, (blocked, scale, offset, bias)
        self.pointers = tuple(None if t is None else t.data_ptr() for t in (blocked, scale, offset, bias))

    def _run(self, x: int, rows: int, y: int) -> int:
        codes, scale, offset, bias = self.pointers
        return self.run(x, rows, self.k, codes, self.n, self.block, self.bits, self.groups, scale, offset, bias, y)


def bind_native_gemv(blocked: torch.Tensor, bits: int, scale: torch.Tensor, offset: torch.Tensor | None,
                     bias: torch.Tensor | None) -> NativeGemv | None:
    """NativeGemv for these operands; None where the C kernel does not build here (the caller
    takes another path)."""
    run = _native_codes_gemv()
    return None if run is None else NativeGemv(run, blocked, bits, scale, offset, bias)


def native_codes_gemv(x: torch.Tensor, blocked: torch.Tensor, bits: int, scale: torch.Tensor,
                      offset: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor | None:
    """codes_gemv by the C kernel for float32 x [..., k] of at most GEMV_MAX_ROWS rows and the
    operands NativeGemv takes: float32 [..., n]; None where the kernel does not build here."""
    gemv = bind_native_gemv(blocked, bits, scale, offset, bias)
    return None if gemv is None else gemv(x)


@functools.cache
def _native_codes_gemv() -> Callable[..., int] | None:
    """csrc/codes_gemv.c's fxq_codes_gemv, or None where it does not build."""
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    return c_kernels.function("codes_gemv", "fxq_codes_gemv",
                              (ptr, i64, i64, ptr, i64, i64, ctypes.c_int, i64, ptr, ptr, ptr, ptr))


def native_gemv_available() -> bool:
    """True where codes_gemv's C kernel builds on this machine."""
    return _native_codes_gemv() is not None
