"""Weight-only layers: integer weight codes in compact storage, dequantized where they are used.

4-bit codes are stored two per byte (uint8 [n, k / 2], low nibble first); 8-bit codes as int8.
Eager, a layer dequantizes its codes and runs one float GEMM. Under torch.compile, inputs with
few rows (decode: one token per sequence) take the form of a broadcast multiply and a sum over k,
which inductor fuses with the dequantization into one GEMV that reads the compact codes once,
instead of writing a float weight and reading it back (`codes_gemv` for per-channel int8 codes:
the scale applied once to each sum). Inductor's CPU code for the 4-bit and per-group forms is
10-100x slower than an fp32 GEMV (nibble unpacking and group-scale gathers do not vectorize), so
4-bit layers stay a float GEMM of the dequantized weight.
"""

from __future__ import annotations

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


def codes_gemv(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., k] @ (codes * scale[:, None])^T + bias -> [..., n] from symmetric int8 codes [n, k]
    with one scale per output channel [n]: the multiply-and-sum over the stored codes that inductor
    fuses into one GEMV reading one byte per weight, scaled once per output. Equal to F.linear of
    the dequantized weight up to float rounding."""
    y = (x.unsqueeze(-2) * codes.to(x.dtype)).sum(-1) * scale.to(x.dtype)
    return y if bias is None else y + bias
