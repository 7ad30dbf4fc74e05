"""Which kernel a quantized layer runs: recorded per layer at freeze for the inspection tools."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fxquant.kernels import default_conv_kernel, default_kernel

from .quantizer import DynamicQuantizer, Quantizer, StaticQuantizer

if TYPE_CHECKING:
    from .weighted_quant_opr import WeightedQuantOpr

#: what the integer GEMM kernels of linear layers run for up to 8 rows (decode), eager on CPU
_DECODE = "; linear, up to 8 rows (decode) eager: input codes, int32 sums and scaling in one C call"
#: kernel names a layer may record, and what each computes
KERNEL_DESCRIPTIONS = {
    "int_mm": "int8 x int8 -> int32 GEMM (torch._int_mm: VNNI / AMX on CPU, CUDA)" + _DECODE,
    "onednn_split": ("oneDNN u8 x s8 GEMM / convolution on 7-bit parts of the codes, large codes added back "
                     "exactly (AVX2)" + _DECODE),
    "onednn_qconv": "oneDNN u8 x s8 convolution, int32 sums, scales and bias applied in one pass (VNNI / AMX)",
    "fp32_split": ("int8 codes multiplied in fp32, k (convolutions: the input channels) split so that every "
                   "partial sum is exact" + _DECODE),
    "fp64": "int8 codes multiplied in fp64 (exact)",
    "dequant_mm": ("int8 / packed int4 weight dequantized, one float GEMM; up to 8 rows (decode) a GEMV over "
                   "the codes (C kernel eager, fused by inductor when compiled)"),
    "float": "float weight and activations",
    "simulated": "fake-quantized float weight (not frozen yet)",
}


def is_int8_pair(wq: Quantizer, aq: Quantizer) -> bool:
    """True when weight and input quantizers describe an int8 x int8 GEMM with an int32
    accumulator: symmetric signed int8 weights per tensor or channel, int8 (or uint8 static)
    inputs per tensor (static) or per token (dynamic, symmetric)."""
    if not isinstance(wq, StaticQuantizer) or wq.spec.granularity == "group":
        return False
    if isinstance(aq, DynamicQuantizer) and not aq.spec.symmetric:
        return False  # per-token zero points are not folded into the accumulator
    return (wq.spec.bits == 8 and wq.spec.symmetric and wq.spec.signed and aq.spec.bits == 8
            and (aq.spec.signed or isinstance(aq, StaticQuantizer))
            and isinstance(aq, (StaticQuantizer, DynamicQuantizer)))


def layer_kernel(layer: WeightedQuantOpr, device: torch.device) -> str:
    """The KERNEL_DESCRIPTIONS name of what a frozen `layer` runs on `device`."""
    wq, aq = layer.weight_quantizer, layer.active_input_quantizer()
    if not wq.enabled:
        return "float"
    if aq.enabled and is_int8_pair(wq, aq):
        if len(layer.weight_shape) == 2:
            return default_kernel(device)
        if isinstance(aq, StaticQuantizer):
            return default_conv_kernel(device, layer.weight_shape, layer.padding)
    return "dequant_mm"
