"""Exact int8 x int8 GEMM on CPUs without int8 dot products (AVX2 only), through oneDNN.

oneDNN's u8 x s8 kernel on AVX2 multiplies pairs of products with `vpmaddubsw`, whose 16-bit sums
saturate when both activations of a pair are large (measured: errors of ~1e5 with full-range
codes). With activations of 7 bits (u8 in [0, 127]) no pair sum passes 2 * 127 * 128 = 32512, so
the kernel is exact. Codes are therefore split:

    xc = small + big,   small = clamp(xc, -64, 63)   (exact in oneDNN, as u8 small + 64)
                        big = xc - small             (non-zero where |xc| > 63: about 1% of codes)

and the few large codes are added back exactly from a transposed byte table of the weight: for
each row of xc, the weighted sum of the weight columns its large codes select (csrc/large_codes.c,
built on first use; FBGEMM's rowwise byte embedding bag where no C compiler is found). Each part
gives float32 sums, exact while |sums| <= 2^24: k is cut into chunks of CHUNK_K, and the parts are
added in int32 where their sum could pass 2^24.

Static activations with a zero point z are split around it (small = clamp(xc, c - 64, c + 63),
c = z clipped so that every part stays exact), so (xc - c) @ codes^T comes out of the split
itself: a per-tensor zero point far from 0 (SmolLM2's gated MLP products: -66) would otherwise
make most codes large (61% in that layer, 0.2% centred).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch

from . import c_kernels
from .layer_cache import WeightCodesCache

#: the 7-bit range of the part of the codes that oneDNN multiplies, and its zero point
SMALL_MIN, SMALL_MAX, SMALL_ZERO = -64, 63, 64
#: the largest k whose float32 sums of either part are exact (2048 * 64 * 128 = 2^24)
CHUNK_K = 2048
#: the largest k whose float32 sums of whole int8 products are exact (1024 * 128 * 128 = 2^24)
EXACT_FP32_K = 1024
#: float32 integers are exact up to this magnitude
FP32_EXACT = 2**24


def available() -> bool:
    """True when this torch has oneDNN's quantized linear and FBGEMM's embedding bag on CPU."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")
            and hasattr(torch.ops.quantized, "embedding_bag_byte_rowwise_offsets"))


def code_row_sums(wc: torch.Tensor) -> torch.Tensor:
    """Row sums of integer codes wc [n, k] (int8 or integer float) as int32 [n], 64 rows at a time:
    an int32 copy of the whole weight (4x its int8 size) would be a temporary that the allocator
    of whichever thread ran the cast may keep resident."""
    return torch.cat([rows.to(torch.int32).sum(dim=1, dtype=torch.int32) for rows in wc.split(64)])


class SplitPackedWeight(WeightCodesCache):
    """The operands of one weight for split_codes_matmul, derived from its int8 codes [n, k], per
    chunk of CHUNK_K columns: oneDNN's packed weight and the byte table [k, n + 8] (codes + 128,
    then fp32 scale 1 and offset -128 per row). A cache of the layer: never copied or saved; a
    copied or unpickled layer builds its own. native: add the large codes with the C kernel
    (None: where it builds; False: FBGEMM's embedding bag), decided here, not while tracing."""

    def __init__(self, codes: torch.Tensor, native: bool | None = None) -> None:
        if codes.dtype != torch.int8 or codes.dim() != 2:
            raise TypeError(f"SplitPackedWeight takes int8 codes [n, k], got {codes.dtype} {tuple(codes.shape)}")
        _register_op()
        n, k = codes.shape
        super().__init__(codes)
        self.ones, self.zeros = torch.ones(n), torch.zeros(n, dtype=torch.long)  # oneDNN's weight scales, zero points
        self.row_sums = code_row_sums(codes)  # [n], for zero points
        self.native = native_large_codes() if native is None else native and native_large_codes()
        self.k = k
        self.chunks = []  # (first column, packed weight, byte table) per chunk of k
        for start in range(0, k, CHUNK_K):
            part = codes[:, start:start + CHUNK_K].contiguous()
            row_params = torch.tensor([1.0, -128.0]).view(torch.uint8).expand(part.shape[1], 8)
            table = torch.cat([(part.t().to(torch.int16) + 128).to(torch.uint8), row_params], dim=1)
            self.chunks.append((start, torch.ops.onednn.qlinear_prepack(part, None), table.contiguous()))

    #: the layer kernel these operands serve
    kernel = "onednn_split"


def split_center(zero: int, k: int, large_in_int32: bool = False) -> int:
    """The zero point, clipped to where the split stays exact for k columns: the large part of a
    code split around c reaches 64 + |c|, so |c| <= 63 (int8); where its sums are taken in float32
    (FBGEMM's embedding bag, not large_in_int32) they must also stay below 2^24 over a chunk of k."""
    limit = SMALL_MAX
    if not large_in_int32:
        limit = min(limit, FP32_EXACT // (128 * min(k, CHUNK_K)) - SMALL_ZERO)
    return max(-limit, min(limit, zero)) if limit > 0 else 0


def _split(xc: torch.Tensor, center: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, big): uint8 [m, k] codes of 7 bits (clamp(xc, c - 64, c + 63) - c + 64) and int8 [m, k]
    the rest (|big| <= 64 + |c|), for a center c with |c| <= 63."""
    small = xc.clamp(center + SMALL_MIN, center + SMALL_MAX)
    return (small + (SMALL_ZERO - center)).to(torch.uint8), (xc - small).to(torch.int8)


def split_codes_matmul(xc: torch.Tensor, weight: SplitPackedWeight, zero: int = 0) -> torch.Tensor:
    """(xc - zero) @ codes^T -> exact integer sums [m, n] for xc [m, k] (integer codes in
    [-128, 127], int8 or float) and a Python int zero point: float32 where every sum is below 2^24,
    else int32."""
    native = weight.native
    center = split_center(zero, weight.k, large_in_int32=native)
    low, big = _split(xc, center)
    k = xc.shape[1]
    in_float = zero == center and k * (128 + abs(center)) * 128 <= FP32_EXACT
    out = None
    for start, packed, table in weight.chunks:
        cols = slice(start, start + CHUNK_K)
        part = torch.ops.fxquant.split_mm(low[:, cols].contiguous(), big[:, cols].contiguous(), packed, table,
                                          weight.ones, weight.zeros, in_float, native)
        out = part if out is None else out + part
    if zero != center:
        out = out - (zero - center) * weight.row_sums
    return out


def _split_mm(low: torch.Tensor, big: torch.Tensor, packed: torch.Tensor, table: torch.Tensor,
              ones: torch.Tensor, zeros: torch.Tensor, in_float: bool, native: bool) -> torch.Tensor:
    """(low - 64) @ codes^T + big @ codes^T, exact integer sums [m, n]: low uint8 [m, k] of 7 bits
    (oneDNN), big int8 [m, k], mostly zero (add_large_codes over the byte table), ones float [n]
    and zeros int64 [n] (oneDNN's weight scales and zero points). float32 when in_float (every sum
    below 2^24), else int32 (each part is exact in float32, their sum may not be). native: the
    large codes by the C kernel."""
    out = torch.ops.onednn.qlinear_pointwise(low, 1.0, SMALL_ZERO, packed, ones, zeros, None, 1.0, 0,
                                             torch.float32, "none", [], "")
    return add_large_codes(out, big, table, in_float, native)


def add_large_codes(out: torch.Tensor, big: torch.Tensor, table: torch.Tensor, in_float: bool,
                    native: bool = True) -> torch.Tensor:
    """out + big @ codes^T for out float32 [m, n] (exact integers), big int8 [m, k] (mostly zero)
    and the byte table uint8 [k, n + 8] of the codes: float32 [m, n] (out itself, added to in place)
    when in_float, else int32 [m, n]. By the C kernel where it builds (native), else by FBGEMM's
    byte embedding bag over the non-zero entries: the same integers."""
    add = _native_add_large_codes() if native else None
    if add is not None:
        out, big, table = out.contiguous(), big.contiguous(), table.contiguous()
        m, k = big.shape
        result = None if in_float else torch.empty(out.shape, dtype=torch.int32)
        if add(big.data_ptr(), m, k, table.data_ptr(), table.shape[1], out.shape[1], out.data_ptr(),
               None if result is None else result.data_ptr()):
            raise MemoryError("the large-code kernel could not allocate its row buffer")
        return out if result is None else result
    rows, cols, values = _nonzero_entries(big)
    large = None
    if rows.numel():
        offsets = torch.searchsorted(rows, torch.arange(big.shape[0]))
        large = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
            table, cols, offsets, False, 0, False, values.float(), None, False)
    if not in_float:
        return out.to(torch.int32) if large is None else out.to(torch.int32) + large.to(torch.int32)
    return out if large is None else out.add_(large)


def native_large_codes() -> bool:
    """True where the C kernel of the large codes builds (else FBGEMM's embedding bag adds them)."""
    return _native_add_large_codes() is not None


def _native_add_large_codes() -> Callable[..., int] | None:
    """csrc/large_codes.c's fxq_add_large_codes, or None where it does not build."""
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    return c_kernels.function("large_codes", "fxq_add_large_codes", (ptr, i64, i64, ptr, i64, i64, ptr, ptr))


def _nonzero_entries(big: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, values) of the non-zero entries of int8 big [m, k], in row-major order. Where
    rows are whole 8-byte words, words are searched first (8x fewer elements; nonzero() over the
    bytes costs as much as a tenth of the GEMM), then the bytes of the few non-zero words."""
    m, k = big.shape
    if k % 8 or not big.is_contiguous() or big.storage_offset() % 8:
        rows, cols = big.nonzero(as_tuple=True)
        return rows, cols, big[rows, cols]
    word_rows, word_cols = big.view(torch.int64).nonzero(as_tuple=True)
    words = big.view(m, k // 8, 8)[word_rows, word_cols]  # [words, 8]
    which, byte = words.nonzero(as_tuple=True)
    return word_rows[which], word_cols[which] * 8 + byte, words[which, byte]


@functools.cache
def _register_op() -> None:
    """Define fxquant::split_mm once, on the first SplitPackedWeight (not at import): one opaque op
    for torch.compile, which can neither lower oneDNN's op on a weight that is not a graph constant
    nor trace the data-dependent gather."""
    op = torch.library.custom_op("fxquant::split_mm", _split_mm, mutates_args=())

    @op.register_fake
    def _(low, big, packed, table, ones, zeros, in_float, native):  # noqa: ANN001, ANN202
        return low.new_empty((low.shape[0], ones.shape[0]), dtype=torch.float32 if in_float else torch.int32)
