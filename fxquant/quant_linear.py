"""QLinear: a quantized nn.Linear running the exact integer kernel its CPU has (docs/kernels.md)."""

from __future__ import annotations

import torch

from fxquant.kernels import code_matmul
from fxquant.kernels.int8_decode import (
    INT8_DECODE_MAX_ROWS,
    Int8DecodeLinear,
    int8_decode_available,
)
from fxquant.kernels.layer_cache import float32_rows
from fxquant.kernels.weight_only import (
    GEMV_MAX_ROWS,
    NativeGemv,
    bind_native_gemv,
    codes_gemv,
    gemv_layout_ok,
    gemv_offsets,
    linear_from_weight,
    native_gemv_available,
)

from .fake_quant import MIN_SCALE
from .kernel_choice import is_int8_pair
from .quantizer import DynamicQuantizer, IdentityQuantizer, Quantizer, StaticQuantizer
from .schemes import Scheme
from .weighted_quant_opr import WeightedQuantOpr, scaled_accumulator

#: layer kernels whose eager decode of W8A8 rows runs the int8 decode C kernel (the exact fp64
#: reference does not)
INT8_DECODE_KERNELS = ("int_mm", "onednn_split", "fp32_split")


class QLinear(WeightedQuantOpr):
    """Quantized nn.Linear: x [..., k] -> y [..., n]; weight [n, k]."""

    def __init__(self, layer: torch.nn.Linear, scheme: Scheme) -> None:
        super().__init__(layer, scheme)
        self.in_features, self.out_features = layer.in_features, layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the fused GEMV first: it is the compiled decode step, whose every attribute read becomes a
        # guard that Dynamo checks per token (codes_blocked is False for every other layer)
        if self._fused_gemv(x):
            wq = self.weight_quantizer
            spec = wq.spec
            group = spec.group_size if spec.granularity == "group" else None
            scale, zero = (wq.scale, wq.zero_point) if group else (wq.scale.reshape(-1), wq.zero_point.reshape(-1))
            return codes_gemv(x, self._static_codes(), spec.bits, scale, None if spec.symmetric else zero, group,
                              self.bias)
        gemv = self._eager_gemv(x)
        if gemv is not None:
            return gemv(x)
        int8_decode = self._eager_int8_decode(x)
        if int8_decode is not None:
            return int8_decode(x)
        if self._integer_path(x):
            return self._int_forward(x)
        return linear_from_weight(self.input_quantizer(x), self.quantized_weight(), self.bias_on_grid())

    def _fused_gemv(self, x: torch.Tensor) -> bool:
        """True for weight-only layers with stored codes in the GEMV layout, under torch.compile, on
        inputs of at most GEMV_MAX_ROWS rows (decode): codes_gemv. (Such a layer's input quantizer
        is an IdentityQuantizer, so it never takes the integer path.)"""
        if not (self.codes_blocked and torch.compiler.is_compiling()):
            return False
        return (not self.input_quantizers[0].enabled and self.weight_quantizer.enabled
                and x.numel() <= GEMV_MAX_ROWS * x.shape[-1] and self._stored_codes_in_use())

    @property
    def gemv_in_c(self) -> bool:
        """True where eager decode's GEMV over the codes in the GEMV layout runs the C kernel (it
        builds in this process)."""
        return self.codes_blocked and native_gemv_available()

    def _decode_operands(self, x: torch.Tensor, max_rows: int) -> tuple[Quantizer, Quantizer, torch.Tensor,
                                                                          torch.Tensor | None] | None:
        """(weight quantizer, input quantizer, stored codes, bias) where an eager C decode kernel
        may take this call (the caller checked that torch.compile is not tracing): float32 CPU x
        of at most `max_rows` rows, the frozen codes in use, no gradient to carry (the C kernels
        are not differentiable); else None.

        The state is read from nn.Module's dicts: each nn.Module.__getattr__ takes about 0.8 us,
        and the eight a decode call made cost as much as a small layer's GEMV
        (benchmarks/gemv_overhead.py)."""
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() > max_rows * x.shape[-1]:
            return None
        parameters = self._parameters
        bias = parameters.get("bias")  # a bias is a Parameter, or None kept outside _parameters
        grad = torch.is_grad_enabled()
        if grad and (x.requires_grad or (bias is not None and bias.requires_grad)):
            return None
        codes = self._buffers["weight_codes"]
        if codes is None or (grad and not self.codes_fixed and "weight" in parameters):
            return None  # not frozen: forward quantizes the float weight afresh (_stored_codes_in_use)
        modules = self._modules
        return modules["weight_quantizer"], modules["input_quantizers"]._modules["0"], codes, bias

    def _eager_gemv(self, x: torch.Tensor) -> NativeGemv | None:
        """codes_gemv's C kernel bound to this layer's operands where it takes this call, else None:
        a weight-only layer with stored codes in the GEMV layout, at most GEMV_MAX_ROWS rows (and
        _decode_operands' conditions). The binding is kept while codes, scale, zero point and bias
        stay the same tensors at the same versions (binding took 8-16 us of a 40 us decode call)."""
        if not self.codes_blocked or torch.compiler.is_compiling() or not native_gemv_available():
            return None
        operands = self._decode_operands(x, GEMV_MAX_ROWS)
        if operands is None:
            return None
        wq, aq, codes, bias = operands
        if aq.enabled or not wq.enabled:
            return None
        sources = (codes, wq._buffers["scale"], wq._buffers["zero_point"], bias)
        return self._derived("_gemv_operands", sources, lambda: self._bind_gemv(*sources))

    def _eager_int8_decode(self, x: torch.Tensor) -> Int8DecodeLinear | None:
        """The int8 decode C kernel (kernels/int8_decode.py) bound to this layer where it takes this
        call, else None: a W8A8 layer on an integer GEMM kernel (INT8_DECODE_KERNELS: not the
        fp64 reference) with int8 codes in row order, per-token or static per-tensor inputs, at
        most INT8_DECODE_MAX_ROWS rows (and _decode_operands' conditions). The same floats as the
        layer's torch path. The binding is kept as _eager_gemv keeps its own."""
        if (self.kernel not in INT8_DECODE_KERNELS or self.codes_blocked or torch.compiler.is_compiling()
                or not int8_decode_available()):
            return None
        operands = self._decode_operands(x, INT8_DECODE_MAX_ROWS)
        if operands is None:
            return None
        wq, aq, codes, bias = operands
        if not (aq.enabled and wq.enabled and is_int8_pair(wq, aq)):
            return None
        w_scale, n = wq._buffers["scale"], self.out_features
        if type(aq) is DynamicQuantizer and not aq.spec.pow2_scale:
            def per_token() -> Int8DecodeLinear:
                return Int8DecodeLinear.per_token(codes, float32_rows(w_scale, n), float32_rows(bias, n),
                                                  aq.qmin, aq.qmax, MIN_SCALE, aq.spec.rounding)

            return self._derived("_int8_decode_operands", (codes, w_scale, bias), per_token, key=aq.spec)
        a_scale, a_zero = aq._buffers.get("scale"), aq._buffers.get("zero_point")
        if type(aq) is not StaticQuantizer or a_scale.numel() != 1:
            return None

        def static() -> Int8DecodeLinear:
            deq, qbias = self._static_output_scaling(a_scale, w_scale.reshape(-1))
            centre = self._static_input_zero(aq, a_zero) + (0 if aq.spec.signed else 128)  # what the codes are less
            return Int8DecodeLinear.static(
                codes, float32_rows(deq, n),
                None if qbias is None else qbias.detach().reshape(-1).to(torch.int32).contiguous(),
                float(a_scale), float(a_zero), aq.qmin, aq.qmax, aq.spec.rounding, aq.spec.offset_in_rounding,
                centre)

        return self._derived("_int8_decode_operands", (codes, w_scale, bias, a_scale, a_zero), static,
                             key=(aq.spec, self._input_zero))

    def _bind_gemv(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   bias: torch.Tensor | None) -> NativeGemv:
        """The C GEMV bound to the codes in the GEMV layout and float32 scale [n, groups], offset
        and bias [n]."""
        spec, n = self.weight_quantizer.spec, self.out_features
        scale = scale.detach().reshape(n, -1).to(torch.float32).contiguous()
        offset = gemv_offsets(spec.bits, None if spec.symmetric else zero, n, scale.shape[1])
        return bind_native_gemv(codes, spec.bits, scale, offset, float32_rows(bias, n))

    def _gemv_layout_fits(self, block: int) -> bool:
        """Weight-only layers with int8 codes per output channel or int4 / int8 codes per group,
        of a shape the GEMV layout takes."""
        spec = self.weight_quantizer.spec
        group = spec.group_size if spec.granularity == "group" else None
        per_channel = spec.granularity == "channel" and spec.axis == 0 and spec.bits == 8
        grouped = spec.granularity == "group" and spec.signed
        weight_only = isinstance(self.input_quantizer, IdentityQuantizer)
        return weight_only and (per_channel or grouped) and gemv_layout_ok(self.weight_shape, spec.bits, group, block)

    def _gemm_weight_codes(self) -> torch.Tensor:
        """The weight codes [n, k] the integer GEMM takes: the frozen int8 ones where they are in
        use, else float codes that carry gradients to the weight."""
        return self._row_codes() if self._stored_codes_in_use() else self._weight_codes()

    def _int_forward(self, x: torch.Tensor) -> torch.Tensor:
        aq = self.active_input_quantizer()
        codes, sx, zero = self._input_codes(x)
        xc = codes.reshape(-1, x.shape[-1])
        wscale = self.weight_quantizer.scale.reshape(-1)
        kernel = None if self.kernel == "simulated" else self.kernel
        packed = self._packed_weight()
        if isinstance(aq, DynamicQuantizer):
            acc = code_matmul(xc, self._gemm_weight_codes(), kernel=kernel, packed=packed)  # exact sums, float32 [m, n]
            y = scaled_accumulator(scaled_accumulator(acc, wscale), sx.reshape(-1, 1))  # kernel order: scale, then per-token scale
            if self.bias is not None:
                y = y + self.bias.float() if y.requires_grad else y.add_(self.bias.float())
        else:
            deq, qbias = self._kept_scaling(aq, lambda: self._static_output_scaling(sx, wscale), x.dim())
            y = scaled_accumulator(code_matmul(xc, self._gemm_weight_codes(), zero, qbias, kernel, self.weight_row_sums, packed),
                        deq)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _static_output_scaling(self, sx: torch.Tensor, wscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(deq [n], qbias [n] or None) of static per-tensor inputs of scale sx and weights of scale
        wscale [n]: one deq_scale = input_scale * weight_scale (the kernel's order) and the bias on
        the accumulator's grid."""
        deq = sx * wscale
        return deq, self.quantized_bias(deq)
