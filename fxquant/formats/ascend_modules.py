"""Runtime modules for Ascend-format layers: they compute with the torch_npu ops vllm-ascend uses
(or their exact references from fxquant.kernels when torch_npu is absent).

Linear modules take x [..., k] and return [..., n] in x's dtype; weights are stored transposed
[k, n] as the NPU matmuls expect. Convolution modules take x [b, c, *spatial].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fxquant.kernels import AscendOps, ascend_ops, decode_scale

from ..conv_padding import padding_sides
from ..errors import FxquantError


class _AscendLinear(torch.nn.Module):
    quant_type = ""

    def __init__(self, tensors: dict[str, torch.Tensor], ops: AscendOps | None = None) -> None:
        super().__init__()
        self.ops = ops or ascend_ops()
        weight = tensors["weight"]
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise FxquantError(f"{self.quant_type} weight must be int8 [n, k], got {weight.dtype} {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight_t", weight.t().contiguous())
        self.register_buffer("bias", tensors.get("bias"))

    def extra_repr(self) -> str:
        return f"{self.quant_type}, in={self.in_features}, out={self.out_features}, backend={self.ops.backend}"


class AscendW8A8Linear(_AscendLinear):
    """Static W8A8: xq = npu_quantize(x, input_scale, input_offset); y = (xq @ Wq + quant_bias) * deq_scale."""

    quant_type = "W8A8"

    def __init__(self, tensors: dict[str, torch.Tensor], ops: AscendOps | None = None) -> None:
        super().__init__(tensors, ops)
        self.register_buffer("input_scale", tensors["input_scale"].float().reshape(1))
        self.register_buffer("input_offset", tensors["input_offset"].float().reshape(1))
        self.register_buffer("quant_bias", tensors["quant_bias"].to(torch.int32))
        self.register_buffer("deq_scale", tensors["deq_scale"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = self.ops.npu_quantize(x, self.input_scale, self.input_offset, torch.qint8, -1, True)
        return self.ops.npu_quant_matmul(xq, self.weight_t, self.deq_scale, bias=self.quant_bias,
                                         output_dtype=x.dtype)


class AscendW8A8DynamicLinear(_AscendLinear):
    """Dynamic W8A8: xq, s = npu_dynamic_quant(x); y = (xq @ Wq) * weight_scale * s (+ bias)."""

    quant_type = "W8A8_DYNAMIC"

    def __init__(self, tensors: dict[str, torch.Tensor], ops: AscendOps | None = None) -> None:
        super().__init__(tensors, ops)
        self.register_buffer("weight_scale", tensors["weight_scale"].float().reshape(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xq, s = self.ops.npu_dynamic_quant(x.reshape(-1, x.shape[-1]))
        y = self.ops.npu_quant_matmul(xq, self.weight_t, self.weight_scale, pertoken_scale=s,
                                      bias=self.bias, output_dtype=x.dtype)
        return y.reshape(*lead, self.out_features)


class AscendWeightOnlyLinear(_AscendLinear):
    """W8A16 / W4A16: y = x @ ((Wq + weight_offset) * weight_scale)^T (+ bias), per channel or group."""

    def __init__(self, tensors: dict[str, torch.Tensor], ops: AscendOps | None = None,
                 quant_type: str = "W8A16") -> None:
        super().__init__(tensors, ops)
        self.quant_type = quant_type
        scale, offset = tensors["weight_scale"], tensors["weight_offset"]
        groups = scale.shape[1] if scale.dim() == 2 else 1
        self.group_size = self.in_features // groups if groups > 1 else 0
        self.register_buffer("antiquant_scale", scale.t().contiguous())   # [k/g, n] or [1, n]
        self.register_buffer("antiquant_offset", offset.t().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.antiquant_scale if self.group_size else self.antiquant_scale.reshape(-1)
        offset = self.antiquant_offset if self.group_size else self.antiquant_offset.reshape(-1)
        return self.ops.npu_weight_quant_batchmatmul(x, self.weight_t, scale.to(x.dtype), offset.to(x.dtype),
                                                     bias=self.bias, antiquant_group_size=self.group_size)


class AscendConv(torch.nn.Module):
    """A saved W8A8 or W8A16 convolution with the geometry (stride, padding, dilation, groups) of
    the float `conv` it replaces.

    W8A8: xq = npu_quantize(x, input_scale, input_offset) (int8), padded with input_offset (the
    code of 0.0); y = (conv(xq, Wq) + quant_bias) * deq_scale, accumulated exactly (float64).
    W8A16: y = conv(x, (Wq + weight_offset) * weight_scale) + bias. The integer convolution is the
    reference arithmetic on every backend (torch_npu's quantized convolution is not wired here).
    """

    def __init__(self, quant_type: str, tensors: dict[str, torch.Tensor], conv: torch.nn.modules.conv._ConvNd,
                 ops: AscendOps | None = None) -> None:
        super().__init__()
        weight = tensors["weight"]
        if weight.dtype != torch.int8 or tuple(weight.shape) != tuple(conv.weight.shape):
            raise FxquantError(f"{quant_type} conv weight must be int8 {tuple(conv.weight.shape)}, got "
                               f"{weight.dtype} {tuple(weight.shape)}")
        self.quant_type = quant_type
        self.ops = ops or ascend_ops()
        self.conv_fn = F.conv1d if isinstance(conv, torch.nn.Conv1d) else F.conv2d
        self.stride, self.dilation, self.groups = conv.stride, conv.dilation, conv.groups
        self.pad = _explicit_padding(conv)
        n = weight.shape[0]
        shape = [1, n] + [1] * (weight.dim() - 2)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", tensors.get("bias"))
        if quant_type == "W8A8":
            self.register_buffer("input_scale", tensors["input_scale"].float().reshape(1))
            self.register_buffer("input_offset", tensors["input_offset"].float().reshape(1))
            self.register_buffer("quant_bias", tensors["quant_bias"].to(torch.int32).reshape(shape))
            self.register_buffer("deq_scale", decode_scale(tensors["deq_scale"]).reshape(shape))
        elif quant_type == "W8A16":
            wshape = [n] + [1] * (weight.dim() - 1)
            self.register_buffer("weight_scale", tensors["weight_scale"].float().reshape(wshape))
            self.register_buffer("weight_offset", tensors["weight_offset"].float().reshape(wshape))
        else:
            raise FxquantError(f"no Ascend runtime for a convolution of type {quant_type!r}; valid: W8A8, W8A16")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_type == "W8A16":
            w = ((self.weight.float() + self.weight_offset) * self.weight_scale).to(x.dtype)
            x = F.pad(x, self.pad)
            return self.conv_fn(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        xq = self.ops.npu_quantize(x, self.input_scale, self.input_offset, torch.qint8, -1, True)
        xq = F.pad(xq.double(), self.pad, value=float(self.input_offset))
        acc = self.conv_fn(xq, self.weight.double(), None, self.stride, 0, self.dilation, self.groups)
        return ((acc + self.quant_bias).float() * self.deq_scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.quant_type}, weight={tuple(self.weight.shape)}, backend={self.ops.backend}"


def _explicit_padding(conv: torch.nn.modules.conv._ConvNd) -> list[int]:
    """F.pad's list (last spatial dim first, left then right) for the conv's padding ('same',
    'valid' or per-dim ints); 'same' puts the odd extra on the right, as torch does."""
    if conv.padding_mode != "zeros":
        raise FxquantError(f"padding_mode={conv.padding_mode!r} has no Ascend runtime; only 'zeros'")
    pads: list[int] = []
    for before, after in reversed(padding_sides(conv)):
        pads += [before, after]
    return pads


def build_ascend_layer(quant_type: str, tensors: dict[str, torch.Tensor], float_layer: torch.nn.Module,
                       ops: AscendOps | None = None) -> torch.nn.Module:
    """The runtime module of one saved layer of type `quant_type` that replaces `float_layer`
    (a Linear, Conv1d or Conv2d of the float architecture, whose shape the weight must match)."""
    if isinstance(float_layer, (torch.nn.Conv1d, torch.nn.Conv2d)):
        return AscendConv(quant_type, tensors, float_layer, ops)
    if not isinstance(float_layer, torch.nn.Linear) or tuple(tensors["weight"].shape) != tuple(float_layer.weight.shape):
        raise FxquantError(f"saved {quant_type} weight {tuple(tensors['weight'].shape)} does not match the model's "
                           f"{type(float_layer).__name__} {tuple(getattr(float_layer, 'weight', torch.empty(0)).shape)}")
    return build_ascend_linear(quant_type, tensors, ops)


def build_ascend_linear(quant_type: str, tensors: dict[str, torch.Tensor],
                        ops: AscendOps | None = None) -> torch.nn.Module:
    """The runtime module of one saved linear layer of type `quant_type`."""
    if quant_type == "W8A8":
        return AscendW8A8Linear(tensors, ops)
    if quant_type == "W8A8_DYNAMIC":
        return AscendW8A8DynamicLinear(tensors, ops)
    if quant_type in ("W8A16", "W4A16"):
        return AscendWeightOnlyLinear(tensors, ops, quant_type)
    raise FxquantError(f"no Ascend runtime for layer type {quant_type!r}; valid: W8A8, W8A8_DYNAMIC, W8A16, W4A16")


#: every runtime module load_ascend installs
ASCEND_MODULES = (_AscendLinear, AscendConv)
