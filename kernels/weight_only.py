"""Weight-only layers: integer weight codes in compact storage, dequantized where they are used.

4-bit codes are stored two per byte (uint8 [n, k / 2], low nibble first); 8-bit codes as int8.
Eager, a layer dequantizes its codes and runs one float GEMM. Under torch.compile, inputs with
few rows (decode: one token per sequence) take the form of a broadcast multiply and a sum over k
(`codes_gemv`), which inductor fuses with the dequantization into one GEMV that reads the compact
codes once instead of writing a float weight and reading it back. The codes are read as int32
words (a view of the same bytes, 4 int8 or 8 int4 codes each) and taken apart with shifts and
masks: inductor vectorizes whole-word loads and integer shifts on every x86 ISA, where its loads
of 8 int8 lanes (AVX2) or of nibbles do not vectorize (10-100x slower than an fp32 GEMV).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

#: inputs with at most this many rows take the fused GEMV form under torch.compile
GEMV_MAX_ROWS = 8


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
    low = (stored & 15).to(torch.int8) - 8
    high = (stored >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).reshape(shape)


def linear_from_weight(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x [..., k], weight [n, k], bias [n]) -> [..., n]; under torch.compile, for inputs of
    at most GEMV_MAX_ROWS rows, as a multiply-and-sum that inductor fuses with the ops that made
    `weight` (e.g. dequantizing int8 codes). The two forms differ only by float summation order."""
    if torch.compiler.is_compiling() and x.numel() <= GEMV_MAX_ROWS * x.shape[-1]:
        y = (x.unsqueeze(-2) * weight.to(x.dtype)).sum(-1)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def word_view_ok(stored: torch.Tensor, bits: int, group_size: int | None = None) -> bool:
    """True when codes_gemv can read `stored` (int8 [n, k] or packed uint8 [n, k / 2]) as int32
    words: contiguous, 4-byte aligned, whole words per row (and per group), little-endian."""
    per_word = 32 // bits
    # Dynamo cannot trace storage_offset() (a graph break before every layer); under torch.compile
    # the codes are a layer's own buffer (pack_codes' fresh tensor, or a copy into it), offset 0
    aligned = torch.compiler.is_compiling() or stored.storage_offset() % 4 == 0
    return (sys.byteorder == "little" and stored.is_contiguous() and aligned
            and stored.shape[-1] % 4 == 0 and (group_size is None or group_size % per_word == 0))


def codes_gemv(x: torch.Tensor, stored: torch.Tensor, bits: int, scale: torch.Tensor,
               zero_point: torch.Tensor | None = None, group_size: int | None = None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., k] @ dequantized(codes)^T + bias -> [..., n], as a multiply-and-sum over the stored
    codes read as int32 words (word_view_ok must hold).

    stored: int8 codes [n, k] (bits 8) or pack_codes' uint8 [n, k / 2] (bits 4). scale and
    zero_point: [n] per channel (zero_point None: symmetric), or [n, k / group_size] per group.
    The weight is (code - zero_point) * scale; the result equals F.linear of it up to float
    rounding (sums in another order)."""
    per_word = 32 // bits
    words = stored.view(torch.int32)  # [n, k / per_word]; code per_word * j + t in bits t*bits...
    n, w = words.shape
    xs = x.reshape(*x.shape[:-1], 1, w, per_word)
    inner = None  # [..., n, w]: sum over the codes of each word of x * code
    for t in range(per_word):
        if bits == 8:
            code = (words << (24 - 8 * t)) >> 24  # sign-extended byte t
        else:
            code = ((words >> (4 * t)) & 15) - 8  # nibble t; pack_codes stores code + 8
        term = xs[..., t] * code.to(x.dtype)
        inner = term if inner is None else inner + term
    if group_size is None:
        if zero_point is not None:
            inner = inner - zero_point.to(x.dtype)[:, None] * xs.sum(-1)
        y = inner.sum(-1) * scale.to(x.dtype)
    else:
        repeat = group_size // per_word  # words per group: the group's scale and offset, word by word
        s = scale.to(x.dtype)[:, :, None].expand(n, scale.shape[1], repeat).reshape(n, w)
        if zero_point is not None:
            z = zero_point.to(x.dtype)[:, :, None].expand(n, scale.shape[1], repeat).reshape(n, w)
            inner = inner - z * xs.sum(-1)
        y = (inner * s).sum(-1)
    return y if bias is None else y + bias
