"""Reference implementations of the torch_npu quantization ops that vllm-ascend calls.

They follow the documented semantics exactly (integer accumulation in int32, then scaling), so
that Ascend lowering and Ascend checkpoints can be run and tested where torch_npu is absent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .int_matmul import int8_matmul


def _round_clamp_int8(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(x), -128, 127).to(torch.int8)


def decode_scale(scale: torch.Tensor) -> torch.Tensor:
    """float32 view of a quant scale: int64 scales hold the fp32 bit pattern in their low 32 bits
    (the form npu_trans_quant_param produces); float scales are returned as float32."""
    if scale.dtype == torch.int64:
        return (scale & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    return scale.float()


def encode_scale_int64(scale: torch.Tensor) -> torch.Tensor:
    """int64 tensor holding the fp32 bits of `scale` (what npu_trans_quant_param returns)."""
    return scale.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def npu_quantize(x: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                 dtype: torch.dtype = torch.qint8, axis: int = -1, div_mode: bool = True) -> torch.Tensor:
    """int8 round(x / scales + zero_points) (div_mode) or round(x * scales + zero_points), clamped.

    scales / zero_points: [1] or per-`axis` vectors; x any float shape.
    """
    if dtype not in (torch.qint8, torch.int8):
        raise NotImplementedError(f"reference npu_quantize supports qint8/int8, got {dtype}")
    shape = [1] * x.dim()
    if scales.numel() > 1:
        shape[axis] = -1
    s = scales.float().reshape(shape)
    y = x.float() / s if div_mode else x.float() * s
    if zero_points is not None:
        y = y + zero_points.float().reshape(shape)
    return _round_clamp_int8(y)


def npu_dynamic_quant(x: torch.Tensor, smooth_scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token int8: scale = max|x_row| / 127 (float32, x.shape[:-1]); q = round(x / scale)."""
    xf = x.float()
    if smooth_scales is not None:
        xf = xf * smooth_scales.float()
    scale = torch.clamp(xf.abs().amax(dim=-1) / 127.0, min=1e-8)
    return _round_clamp_int8(xf / scale.unsqueeze(-1)), scale


def npu_quant_matmul(x1: torch.Tensor, x2: torch.Tensor, scale: torch.Tensor, *,
                     offset: torch.Tensor | None = None, pertoken_scale: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None, output_dtype: torch.dtype | None = None) -> torch.Tensor:
    """int8 x1 [..., m, k] @ int8 x2 [k, n] accumulated in int32, plus an int32 bias, times `scale`
    [n] or [1] (float32, bfloat16, or int64 fp32 bits) and `pertoken_scale` [m...]; a float bias is
    added after scaling. output_dtype None / int8 requantizes with `offset`."""
    acc = int8_matmul(x1.reshape(-1, x1.shape[-1]), x2)
    return scale_int32_sums(acc, scale, offset=offset, pertoken_scale=pertoken_scale, bias=bias,
                            output_dtype=output_dtype).reshape(*x1.shape[:-1], x2.shape[-1])


def scale_int32_sums(acc: torch.Tensor, scale: torch.Tensor, *, offset: torch.Tensor | None = None,
                     pertoken_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                     output_dtype: torch.dtype | None = None) -> torch.Tensor:
    """npu_quant_matmul's steps after the product, for its int32 sums acc [m, n] (arguments as
    there), which it consumes: [m, n] in output_dtype. The steps run in place on acc and on one
    float32 copy (a fresh [m, n] tensor per step cost more in page faults than the product of a
    512-row layer)."""
    if bias is not None and bias.dtype == torch.int32:
        acc.add_(bias.reshape(-1))
    y = acc.float().mul_(decode_scale(scale).reshape(-1))
    del acc
    if pertoken_scale is not None:
        y.mul_(pertoken_scale.float().reshape(-1, 1))
    if bias is not None and bias.dtype != torch.int32:
        y.add_(bias.float().reshape(-1))
    if output_dtype in (None, torch.int8):
        if offset is not None:
            y = y + offset.float()
        return _round_clamp_int8(y)
    return y.to(output_dtype)


def npu_weight_quant_batchmatmul(x: torch.Tensor, weight: torch.Tensor, antiquant_scale: torch.Tensor,
                                 antiquant_offset: torch.Tensor | None = None,
                                 quant_scale: torch.Tensor | None = None,
                                 quant_offset: torch.Tensor | None = None,
                                 bias: torch.Tensor | None = None,
                                 antiquant_group_size: int = 0) -> torch.Tensor:
    """x [..., k] @ ((weight [k, n] + antiquant_offset) * antiquant_scale) (+ bias), in x's dtype:
    the dequantized weight is rounded to x's dtype (exact float32 products of codes and scales
    given in x's dtype) and multiplied there, as the NPU op dequantizes into x's dtype.

    antiquant_scale / offset: [n] or [1, n] per channel, or [k / group, n] per group.
    """
    if quant_scale is not None or quant_offset is not None:
        raise NotImplementedError("reference npu_weight_quant_batchmatmul has no output quantization")
    k, n = weight.shape
    groups = k // antiquant_group_size if antiquant_group_size else 1
    offset = None if antiquant_offset is None else antiquant_offset.reshape(groups, n).t()
    w = dequantize_rows(weight.t(), antiquant_scale.reshape(groups, n).t(), offset)  # [n, k]
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """(codes + offset) * scale as float32 [n, k] for integer codes [n, k] and scale / offset
    [n, groups] (each group: k / groups consecutive columns of a row), computed in place on one
    float copy of the codes (a fresh weight-sized tensor per step costs page faults)."""
    n, k = codes.shape
    groups = scale.shape[-1]
    w = codes.to(torch.float32, copy=True).reshape(n, groups, k // groups)
    if offset is not None:
        w.add_(offset.float().reshape(n, groups, 1))
    return w.mul_(scale.float().reshape(n, groups, 1)).reshape(n, k)
