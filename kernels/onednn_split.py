"""Exact int8 x int8 GEMM on CPUs without int8 dot products (AVX2 only), through oneDNN.

oneDNN's u8 x s8 kernel on AVX2 multiplies pairs of products with `vpmaddubsw`, whose 16-bit sums
saturate when both activations of a pair are large (measured: errors of ~1e5 with full-range
codes). With activations of 7 bits (u8 in [0, 127]) no pair sum passes 2 * 127 * 128 = 32512, so
the kernel is exact. Codes are therefore split:

    xc = small + big,   small = clamp(xc, -64, 63)   (exact in oneDNN, as u8 small + 64)
                        big = xc - small             (non-zero where |xc| > 63: about 1% of codes)

and the few large codes are added back exactly from a transposed byte table of the weight
(FBGEMM's rowwise embedding bag: for each row of xc, the weighted sum of the weight columns its
large codes select). Both parts return float32 sums, exact while |sums| < 2^24: k is cut into
chunks of CHUNK_K (2048 * 64 * 128 = 2^24), added in int32.
"""

from __future__ import annotations

import functools

import torch

#: the 7-bit range of the part of the codes that oneDNN multiplies, and its zero point
SMALL_MIN, SMALL_MAX, SMALL_ZERO = -64, 63, 64
#: the largest k whose float32 sums of either part are exact
CHUNK_K = 2048


def available() -> bool:
    """True when this torch has oneDNN's quantized linear and FBGEMM's embedding bag on CPU."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")
            and hasattr(torch.ops.quantized, "embedding_bag_byte_rowwise_offsets"))


class SplitPackedWeight:
    """The operands of one weight for split_codes_matmul, derived from its int8 codes [n, k], per
    chunk of CHUNK_K columns: oneDNN's packed weight and the byte table [k, n + 8] (codes + 128,
    then fp32 scale 1 and offset -128 per row). A cache of the layer: not saved, rebuilt by a copy
    on first use."""

    def __init__(self, codes: torch.Tensor) -> None:
        if codes.dtype != torch.int8 or codes.dim() != 2:
            raise TypeError(f"SplitPackedWeight takes int8 codes [n, k], got {codes.dtype} {tuple(codes.shape)}")
        _register_op()
        n, k = codes.shape
        self.source = (codes.data_ptr(), codes._version, tuple(codes.shape))
        self.ones, self.zeros = torch.ones(n), torch.zeros(n, dtype=torch.long)
        self.chunks = []  # (first column, packed weight, byte table) per chunk of k
        for start in range(0, k, CHUNK_K):
            part = codes[:, start:start + CHUNK_K].contiguous()
            row_params = torch.tensor([1.0, -128.0]).view(torch.uint8).expand(part.shape[1], 8)
            table = torch.cat([(part.t().to(torch.int16) + 128).to(torch.uint8), row_params], dim=1)
            self.chunks.append((start, torch.ops.onednn.qlinear_prepack(part, None), table.contiguous()))

    def matches(self, codes: torch.Tensor) -> bool:
        """True when built from these codes as they are now (same storage, version and shape)."""
        return self.source == (codes.data_ptr(), codes._version, tuple(codes.shape))

    def __deepcopy__(self, memo: dict) -> None:
        return None  # a copy rebuilds its own from its own codes

    def __reduce__(self) -> tuple:
        return _no_cache, ()  # pickled as None: oneDNN's packed layout is per process


def _no_cache() -> None:
    return None


def split_codes_matmul(xc: torch.Tensor, weight: SplitPackedWeight) -> torch.Tensor:
    """xc [m, k] (integer codes in [-128, 127], int8 or float) @ codes^T -> exact integer sums [m, n]:
    float32 for one chunk of k, int32 for more (see the module docstring)."""
    if len(weight.chunks) == 1:
        _, packed, table = weight.chunks[0]
        return torch.ops.fxquant.split_codes_mm(xc, packed, table, weight.ones, weight.zeros)
    out = None
    for start, packed, table in weight.chunks:
        part = torch.ops.fxquant.split_codes_mm(xc[:, start:start + CHUNK_K].contiguous(), packed, table,
                                                weight.ones, weight.zeros).to(torch.int32)
        out = part if out is None else out + part
    return out


def _split_codes_mm(xc: torch.Tensor, packed: torch.Tensor, table: torch.Tensor, ones: torch.Tensor,
                    zeros: torch.Tensor) -> torch.Tensor:
    small = xc.clamp(SMALL_MIN, SMALL_MAX)
    acc = torch.ops.onednn.qlinear_pointwise((small + SMALL_ZERO).to(torch.uint8), 1.0, SMALL_ZERO, packed, ones,
                                             zeros, None, 1.0, 0, torch.float32, "none", [], "")
    big = xc - small
    rows, cols = big.nonzero(as_tuple=True)
    if rows.numel():
        offsets = torch.searchsorted(rows, torch.arange(xc.shape[0], device=rows.device))
        acc += torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
            table, cols, offsets, False, 0, False, big[rows, cols].float(), None, False)
    return acc


@functools.cache
def _register_op() -> None:
    """Define fxquant::split_codes_mm once, on the first SplitPackedWeight (not at import): one
    opaque op for torch.compile, which cannot trace the data-dependent split."""
    op = torch.library.custom_op("fxquant::split_codes_mm", _split_codes_mm, mutates_args=())

    @op.register_fake
    def _(xc, packed, table, ones, zeros):  # noqa: ANN001, ANN202
        return xc.new_empty((xc.shape[0], ones.shape[0]), dtype=torch.float32)
