"""Runtime modules for Ascend-format layers: they compute with the torch_npu ops vllm-ascend uses
(or their exact references from fxquant.kernels when torch_npu is absent).

Linear modules take x [..., k] and return [..., n] in x's dtype. With torch_npu they keep the
weight transposed, [k, n], as the NPU matmuls expect. With the reference ops (a CPU) they keep it
in the layouts of fxquant's CPU kernels instead: float32 inputs of a few rows (decode), outside
autograd and torch.compile, run the C kernels (W8A8 and W8A8_DYNAMIC: csrc/int8_decode.c, the
reference ops' floats bit for bit; W8A16 / W4A16: csrc/codes_gemv.c over codes in the GEMV layout,
the same sums in another order), and W8A8 products of more rows run on the CPU's integer GEMM with
the layer's packed operands (the same integer sums). Convolution modules take x [b, c, *spatial].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fxquant.kernels import (
    AscendOps,
    ascend_ops,
    code_row_sums,
    codes_matmul,
    decode_scale,
    default_kernel,
)
from fxquant.kernels.int8_decode import (
    INT8_DECODE_MAX_ROWS,
    Int8DecodeLinear,
    int8_decode_available,
)
from fxquant.kernels.layer_cache import BoundRowKernel, float32_rows
from fxquant.kernels.npu_reference import dequantize_rows, scale_int32_sums
from fxquant.kernels.onednn_split import SplitPackedWeight
from fxquant.kernels.weight_only import (
    GEMV_MAX_ROWS,
    bind_native_gemv,
    from_gemv_layout,
    gemv_block,
    gemv_layout_ok,
    gemv_offsets,
    native_gemv_available,
    pack_codes,
    to_gemv_layout,
    unpack_codes,
)

from ..conv_padding import padding_sides
from ..errors import FxquantError
from ..fake_quant import MIN_SCALE


class _AscendLinear(torch.nn.Module):
    quant_type = ""
    #: the most rows of an input that row_kernel() runs
    max_kernel_rows = 0

    def __init__(self, tensors: dict[str, torch.Tensor], ops: AscendOps | None = None) -> None:
        super().__init__()
        self.ops = ops or ascend_ops()
        weight = tensors["weight"]
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise FxquantError(f"{self.quant_type} weight must be int8 [n, k], got {weight.dtype} {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        #: the reference ops run here (a CPU): the weight is kept in the C kernels' layout
        self.kernel_layout = self.ops.backend == "reference"
        #: run the C kernels on the inputs they take (False: the ops alone)
        self.row_kernels = True
        self.register_buffer("bias", tensors.get("bias"))
        self._keep_weight(weight)

    def _keep_weight(self, weight: torch.Tensor) -> None:
        """Keep the int8 weight [n, k]: transposed for the NPU matmuls, in row order for the C kernels."""
        if self.kernel_layout:
            self.register_buffer("weight", weight.contiguous())
        else:
            self.register_buffer("weight_t", weight.t().contiguous())

    def weight_codes(self) -> torch.Tensor:
        """The weight's int8 codes [n, k] in row order (a view where they are kept so)."""
        return self.weight if self.kernel_layout else self.weight_t.t()

    def _int32_sums(self, xq: torch.Tensor, zero: int = 0) -> torch.Tensor:
        """xq int8 [..., k] @ the weight's codes^T: the exact int32 sums [m, n] (m: xq's rows) by
        this CPU's integer kernel. onednn_split runs on the layer's packed operands (kept while the
        codes stay the same; npu_quant_matmul would pack them per call) and splits the codes around
        `zero`, the codes' zero point, as a QLinear does (fewer large codes)."""
        xq, kernel = xq.reshape(-1, self.in_features), default_kernel(xq.device)
        if kernel != "onednn_split":
            return codes_matmul(xq, self.weight, kernel).to(torch.int32)
        packed = self.__dict__.get("_packed")
        if not torch.compiler.is_compiling() and (packed is None or not packed.matches(self.weight)):
            packed = self.__dict__["_packed"] = SplitPackedWeight(self.weight)
        sums = codes_matmul(xq, self.weight, kernel, packed=packed, zero=zero).to(torch.int32)  # (xq - zero) @ W^T
        if zero:
            sums.add_(zero * (code_row_sums(self.weight) if packed is None else packed.row_sums).to(torch.int32))
        return sums

    def row_kernel(self, x: torch.Tensor) -> BoundRowKernel | None:
        """The C kernel bound to this layer's tensors where it takes this call (float32 CPU x of
        at most max_kernel_rows rows, no gradient wanted, not traced), else None. The binding is
        kept while the module's buffers stay the same tensors at the same versions."""
        if (not (self.row_kernels and self.kernel_layout) or x.dtype != torch.float32 or x.device.type != "cpu"
                or x.numel() > self.max_kernel_rows * self.in_features or x.numel() == 0
                or (torch.is_grad_enabled() and x.requires_grad) or torch.compiler.is_compiling()):
            return None
        state = [(name, None if t is None else (t.data_ptr(), t._version)) for name, t in self._buffers.items()]
        cached = self.__dict__.get("_row_kernel")
        if cached is None or cached[0] != state or cached[1] is None:
            cached = self.__dict__["_row_kernel"] = (state, self._bind())
        return cached[1]

    def _bind(self) -> BoundRowKernel | None:
        """The C kernel bound to the layer's tensors; None where it does not build or apply."""
        return None

    def extra_repr(self) -> str:
        return f"{self.quant_type}, in={self.in_features}, out={self.out_features}, backend={self.ops.backend}"


class AscendW8A8Linear(_AscendLinear):
    """Static W8A8: xq = npu_quantize(x, input_scale, input_offset); y = (xq @ Wq + quant_bias) * deq_scale."""

    quant_type = "W8A8"
    max_kernel_rows = INT8_DECODE_MAX_ROWS

    def __init__(self, tensors: dict[str, torch.Tensor], ops: AscendOps | None = None) -> None:
        super().__init__(tensors, ops)
        self.register_buffer("input_scale", tensors["input_scale"].float().reshape(1))
        self.register_buffer("input_offset", tensors["input_offset"].float().reshape(1))
        self.register_buffer("quant_bias", tensors["quant_bias"].to(torch.int32))
        self.register_buffer("deq_scale", tensors["deq_scale"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.row_kernel(x)
        if kernel is not None:
            return kernel(x)
        xq = self.ops.npu_quantize(x, self.input_scale, self.input_offset, torch.qint8, -1, True)
        if self.kernel_layout:  # the reference npu_quant_matmul, its product by _int32_sums
            sums = self._int32_sums(xq, int(self.input_offset))
            y = scale_int32_sums(sums, self.deq_scale, bias=self.quant_bias, output_dtype=x.dtype)
            return y.reshape(*x.shape[:-1], self.out_features)
        return self.ops.npu_quant_matmul(xq, self.weight_t, self.deq_scale, bias=self.quant_bias,
                                         output_dtype=x.dtype)

    def _bind(self) -> BoundRowKernel | None:
        if not int8_decode_available():
            return None
        n = self.out_features
        qbias = self.quant_bias.reshape(-1).expand(n).contiguous()
        # npu_quantize's codes: clamp(round(x / scale + offset)), half to even, uncentred
        return Int8DecodeLinear.static(self.weight, float32_rows(decode_scale(self.deq_scale), n), qbias,
                                       float(self.input_scale), float(self.input_offset), -128, 127,
                                       "half_even", True, 0)


class AscendW8A8DynamicLinear(_AscendLinear):
    """Dynamic W8A8: xq, s = npu_dynamic_quant(x); y = (xq @ Wq) * weight_scale * s (+ bias)."""

    quant_type = "W8A8_DYNAMIC"
    max_kernel_rows = INT8_DECODE_MAX_ROWS

    def __init__(self, tensors: dict[str, torch.Tensor], ops: AscendOps | None = None) -> None:
        super().__init__(tensors, ops)
        self.register_buffer("weight_scale", tensors["weight_scale"].float().reshape(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.row_kernel(x)
        if kernel is not None:
            return kernel(x)
        lead = x.shape[:-1]
        xq, s = self.ops.npu_dynamic_quant(x.reshape(-1, x.shape[-1]))
        if self.kernel_layout:  # the reference npu_quant_matmul, its product by _int32_sums
            y = scale_int32_sums(self._int32_sums(xq), self.weight_scale, pertoken_scale=s, bias=self.bias,
                                 output_dtype=x.dtype)
        else:
            y = self.ops.npu_quant_matmul(xq, self.weight_t, self.weight_scale, pertoken_scale=s,
                                          bias=self.bias, output_dtype=x.dtype)
        return y.reshape(*lead, self.out_features)

    def _bind(self) -> BoundRowKernel | None:
        if not int8_decode_available() or (self.bias is not None and not self.bias.is_floating_point()):
            return None
        n = self.out_features
        # npu_dynamic_quant's codes: round(x / s), s = max(max|x| / 127, 1e-8), half to even
        return Int8DecodeLinear.per_token(self.weight, float32_rows(self.weight_scale, n),
                                          float32_rows(self.bias, n), -128, 127, MIN_SCALE, "half_even")


class AscendWeightOnlyLinear(_AscendLinear):
    """W8A16 / W4A16: y = x @ ((Wq + weight_offset) * weight_scale)^T (+ bias), per channel or group.

    With the reference ops the codes are kept in the GEMV layout where it fits the weight
    (`codes_blocked`: 4-bit codes two per byte, kernels/weight_only.py)."""

    max_kernel_rows = GEMV_MAX_ROWS

    def __init__(self, tensors: dict[str, torch.Tensor], ops: AscendOps | None = None,
                 quant_type: str = "W8A16") -> None:
        self.quant_type = quant_type
        self.bits = 4 if quant_type == "W4A16" else 8
        scale, offset = tensors["weight_scale"], tensors["weight_offset"]
        groups = scale.shape[1] if scale.dim() == 2 else 1
        n, k = tensors["weight"].shape
        self.group_size = k // groups if groups > 1 else 0
        self.codes_blocked = False
        super().__init__(tensors, ops)
        self.register_buffer("antiquant_scale", scale.t().contiguous())   # [k/g, n] or [1, n]
        self.register_buffer("antiquant_offset", offset.t().contiguous())

    def _keep_weight(self, weight: torch.Tensor) -> None:
        block = gemv_block()
        self.codes_blocked = (self.kernel_layout and native_gemv_available()
                              and gemv_layout_ok(tuple(weight.shape), self.bits, self.group_size or None, block))
        if self.codes_blocked:
            self.register_buffer("weight_blocked", to_gemv_layout(pack_codes(weight, self.bits), block))
        else:
            super()._keep_weight(weight)

    def weight_codes(self) -> torch.Tensor:
        if self.codes_blocked:
            return unpack_codes(from_gemv_layout(self.weight_blocked), self.bits, (self.out_features, self.in_features))
        return super().weight_codes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.row_kernel(x)
        if kernel is not None:
            return kernel(x)
        if self.kernel_layout:  # the reference op's arithmetic on the codes in row order: no transposes
            bias = None if self.bias is None else self.bias.to(x.dtype)
            weight = dequantize_rows(self.weight_codes(), self.antiquant_scale.t(), self.antiquant_offset.t())
            return F.linear(x, weight.to(x.dtype), bias)
        scale = self.antiquant_scale if self.group_size else self.antiquant_scale.reshape(-1)
        offset = self.antiquant_offset if self.group_size else self.antiquant_offset.reshape(-1)
        return self.ops.npu_weight_quant_batchmatmul(x, self.weight_t, scale.to(x.dtype), offset.to(x.dtype),
                                                     bias=self.bias, antiquant_group_size=self.group_size)

    def _bind(self) -> BoundRowKernel | None:
        if not self.codes_blocked:
            return None
        n = self.out_features
        scale = self.antiquant_scale.t().to(torch.float32).contiguous()  # [n, groups]
        # (Wq + offset) * scale: the stored codes carry -offset above the real ones
        zero = -self.antiquant_offset.t().to(torch.float32)
        offset = gemv_offsets(self.bits, zero if zero.any() else None, n, scale.shape[1])
        return bind_native_gemv(self.weight_blocked, self.bits, scale, offset, float32_rows(self.bias, n))


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
