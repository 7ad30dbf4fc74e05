"""The msModelSlim / vllm-ascend weight format of one quantized linear (or convolution) layer.

For layer `P` (DESIGN.md, "Ascend-ready weight format"):

| type | tensors |
|---|---|
| W8A8 | weight int8 [n,k]; input_scale, input_offset [1] (model dtype); quant_bias int32 [n];
|      | deq_scale [n] (int64 holding fp32 bits for fp16/fp32 models, fp32 for bf16); weight_scale,
|      | weight_offset [n,1] |
| W8A8_DYNAMIC | weight int8; weight_scale fp32 [n,1]; weight_offset zeros [n,1] |
| W8A16 | weight int8; weight_scale, weight_offset [n,1] (model dtype; offset = -zero_point) |
| W4A16 | weight int8 holding int4 [n,k]; weight_scale, weight_offset [n, k/group] |

A layer's bias, if any, is saved as `P.bias` too (W8A8 also folds it into quant_bias).
Convolutions (W8A8, W8A16) use the same tensors with weight int8 [n, c/groups, *kernel]; the sum
in quant_bias runs over each output channel's whole kernel.
"""

from __future__ import annotations

import torch

from fxquant.kernels import code_row_sums, encode_scale_int64

from ..errors import ConfigError
from ..quant_conv import QConvNd
from ..quant_linear import QLinear
from ..quant_opr import QAttentionInput, QuantOpr
from ..weighted_quant_opr import WeightedQuantOpr

QUANT_TYPES = {"float": "FLOAT", "w8a8": "W8A8", "w8a8_dynamic": "W8A8_DYNAMIC", "w8a16": "W8A16",
               "w4a16": "W4A16", "w8a8_timestep": "W8A8_TIMESTEP"}


def quant_type(scheme: str) -> str:
    """Description-file type of a scheme name ("w8a8_dynamic" -> "W8A8_DYNAMIC")."""
    return QUANT_TYPES[scheme]


def deq_scale_dtype(model_dtype: torch.dtype) -> str:
    """"fp32" for bfloat16 models, "int64" (fp32 bits) for float16 / float32 models."""
    return "fp32" if model_dtype == torch.bfloat16 else "int64"


#: schemes each layer kind can be saved as (others are saved FLOAT, with a warning)
SAVABLE_SCHEMES = {QLinear: ("w8a8", "w8a8_dynamic", "w8a16", "w4a16", "w8a8_timestep"),
                   QConvNd: ("w8a8", "w8a16")}


def savable(qopr: QuantOpr) -> bool:
    """True when `qopr`'s layer kind and scheme have an Ascend weight format."""
    return any(isinstance(qopr, kind) and qopr.scheme in schemes for kind, schemes in SAVABLE_SCHEMES.items())


def _per_row(t: torch.Tensor, n: int) -> torch.Tensor:
    """Per-tensor [] or per-channel [n] qparams as [n, 1]; per-group [n, k/g] unchanged."""
    return t.reshape(-1).expand(n).reshape(n, 1).clone() if t.dim() <= 1 else t.clone()


@torch.no_grad()
def layer_tensors(qopr: QuantOpr, model_dtype: torch.dtype) -> tuple[str, dict[str, torch.Tensor]]:
    """(type, {suffix: tensor}) of a quantized linear or convolution layer, suffixes relative to
    its name."""
    if not isinstance(qopr, WeightedQuantOpr) or not savable(qopr):
        raise ConfigError(f"{type(qopr).__name__} with scheme {qopr.scheme!r} has no Ascend weight format; "
                          f"valid: Linear {SAVABLE_SCHEMES[QLinear]}, Conv {SAVABLE_SCHEMES[QConvNd]}")
    wq = qopr.weight_quantizer
    codes = qopr.weight_int8()
    n = codes.shape[0]
    scheme = qopr.scheme
    out: dict[str, torch.Tensor] = {"weight": codes}
    if qopr.bias is not None:
        out["bias"] = qopr.bias.detach().clone()
    if scheme in ("w8a16", "w4a16"):
        out["weight_scale"] = _per_row(wq.scale, n).to(model_dtype)
        out["weight_offset"] = _per_row(-wq.zero_point, n).to(model_dtype)
        return quant_type(scheme), out
    wscale = _per_row(wq.scale, n).float().reshape(-1)
    out["weight_scale"] = wscale.reshape(n, 1)
    out["weight_offset"] = torch.zeros(n, 1, dtype=torch.float32)
    if scheme == "w8a8_dynamic":
        return quant_type(scheme), out
    if scheme not in ("w8a8", "w8a8_timestep"):
        raise ConfigError(f"scheme {scheme!r} has no Ascend weight format")
    aq = qopr.input_quantizer
    input_scale = aq.scale.float().reshape(-1, 1)  # [1, 1], or [T, 1]: one row per timestep
    input_offset = aq.zero_point.float().reshape(-1, 1) - (0 if aq.spec.signed else 128)  # uint8 codes -> int8
    deq = input_scale * wscale[None, :]  # float32 [T, n], the exact product the integer path multiplies by
    on_grid = qopr.quantized_bias(deq)  # the same int32 bias the simulation adds
    on_grid = torch.zeros_like(deq) if on_grid is None else on_grid
    colsum = code_row_sums(codes.reshape(n, -1)).to(torch.int64)
    quant_bias = on_grid.to(torch.int64) - colsum[None, :] * input_offset.to(torch.int64)
    if scheme == "w8a8":  # [1], [n] as DESIGN's table
        input_scale, input_offset = input_scale.reshape(1), input_offset.reshape(1)
        deq, quant_bias = deq.reshape(n), quant_bias.reshape(n)
    out["input_scale"] = input_scale.to(model_dtype)
    out["input_offset"] = input_offset.to(model_dtype)
    out["quant_bias"] = quant_bias.to(torch.int32)
    out["deq_scale"] = encode_scale_int64(deq) if deq_scale_dtype(model_dtype) == "int64" else deq
    return quant_type(scheme), out


@torch.no_grad()
def attention_tensors(qopr: QAttentionInput) -> dict[str, torch.Tensor]:
    """FAKQuant tensors of one attention input: scale float32 [heads, 1], offset int8 zeros [heads, 1]."""
    scale = qopr.input_quantizer.scale.float().reshape(-1, 1).clone()
    return {"scale": scale, "offset": torch.zeros(scale.shape, dtype=torch.int8)}
