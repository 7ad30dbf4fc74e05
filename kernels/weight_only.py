"""Weight-only layers: integer weight codes in compact storage, dequantized where they are used.

4-bit codes are stored two per byte (uint8 [n, k / 2], low nibble first); 8-bit codes as int8.
Eager, a layer dequantizes its codes and runs one float GEMM. Under torch.compile, inputs with
few rows (decode: one token per sequence) take the form of a broadcast multiply and a sum over k
(weight_only_gemv), which inductor fuses into one GEMV that reads the compact codes once, instead
of writing a float weight and reading it back.
"""

from __future__ import annotations

import torch

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


def is_gemv(x: torch.Tensor) -> bool:
    """True when x [..., k] should take the fused GEMV form: under torch.compile, at most
    GEMV_MAX_ROWS rows."""
    return torch.compiler.is_compiling() and x.numel() <= GEMV_MAX_ROWS * x.shape[-1]


def weight_only_gemv(x: torch.Tensor, stored: torch.Tensor, bits: int, out_features: int,
                     scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., k] @ dequantized(stored)^T (+ bias) -> [..., n], written for inductor to fuse into one
    pass over the stored codes (for inputs of few rows, under torch.compile).

    stored: pack_codes output (int8 [n, k], or uint8 [n, k / 2] for 4 bits); scale, zero: float
    [n] (per channel) or [n, groups] (per group along k). Each group's sum of x * (code - zero) is
    scaled once; this differs from dequantize-then-GEMM only by float rounding.
    """
    n = out_features
    scale = scale.reshape(n, -1).to(x.dtype)
    zero = zero.reshape(n, -1).to(x.dtype)
    groups = scale.shape[1]
    lead = x.shape[:-1]
    if bits == 8:
        codes = stored.reshape(n, groups, -1).to(x.dtype) - zero[..., None]      # [n, G, g]
        xg = x.reshape(*lead, 1, groups, codes.shape[-1])                          # [..., 1, G, g]
        partial = (xg * codes).sum(-1)                                             # [..., n, G]
    else:
        half = stored.reshape(n, groups, -1)                                       # [n, G, g / 2]
        low = (half & 15).to(x.dtype) - 8 - zero[..., None]
        high = (half >> 4).to(x.dtype) - 8 - zero[..., None]
        pairs = x.reshape(*lead, 1, groups, half.shape[-1], 2)                     # even / odd columns
        partial = (pairs[..., 0] * low + pairs[..., 1] * high).sum(-1)
    y = (partial * scale).sum(-1)
    return y if bias is None else y + bias
