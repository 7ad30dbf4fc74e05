"""QConv1d / QConv2d: quantized convolutions with exact integer accumulation (docs/kernels.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fxquant.kernels.activation_codes import centred_codes, uint8_codes
from fxquant.kernels.int_conv import (
    ConvGeometry,
    PackedConvWeight,
    float_code_conv,
    onednn_code_conv,
    split_conv_pays,
)

from .conv_padding import padding_sides
from .errors import NotQuantizableError
from .quantizer import StaticQuantizer
from .schemes import Scheme
from .weighted_quant_opr import WeightedQuantOpr, scaled_accumulator


def _symmetric_padding(layer: torch.nn.modules.conv._ConvNd) -> tuple[int, ...] | str:
    """The layer's padding as integers per side, which the integer kernels take ("valid", and
    "same" with even sides, included); "same" with an odd total (torch pads the extra one after)
    stays "same", which only the float convolutions take."""
    sides = padding_sides(layer)
    return tuple(before for before, _ in sides) if all(b == a for b, a in sides) else "same"


class QConvNd(WeightedQuantOpr):
    """Quantized convolution; integer path accumulates integer-valued float codes exactly."""

    conv_fn = staticmethod(F.conv2d)

    def __init__(self, layer: torch.nn.modules.conv._ConvNd, scheme: Scheme) -> None:
        super().__init__(layer, scheme)
        if layer.padding_mode != "zeros":
            raise NotQuantizableError(f"padding_mode={layer.padding_mode!r} is not supported; only 'zeros'")
        self.stride, self.padding = layer.stride, _symmetric_padding(layer)
        self.dilation, self.groups = layer.dilation, layer.groups
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.kernel_size = layer.kernel_size

    packed_kernels = ("onednn_qconv", "onednn_split")

    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv_fn(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def _pack(self, codes: torch.Tensor) -> PackedConvWeight:
        geometry = ConvGeometry(self.stride, self.padding, self.dilation, self.groups, len(self.weight_shape) - 2)
        return PackedConvWeight(self.weight_int8(), geometry, source=codes, split=self.kernel == "onednn_split")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        aq = self.active_input_quantizer()
        if not (self._integer_path(x) and isinstance(aq, StaticQuantizer)):
            return self._conv(self.input_quantizer(x), self.quantized_weight(), self.bias_on_grid())
        packed = self._packed_weight()
        needs_grad = self._needs_grad(x)
        pays = self.kernel != "onednn_split" or split_conv_pays(x, self.weight_shape, self.stride)
        if packed is not None and pays and not needs_grad and x.device.type == "cpu":
            s = aq.spec
            shift = 128 if s.signed else 0  # int8 codes as uint8 ones: the same differences to the zero point
            codes = uint8_codes(x, aq.scale, aq.zero_point, aq.qmin, aq.qmax, s.rounding, s.offset_in_rounding, shift)
            zero = self._derived("_cached_code_zero", (aq.zero_point,),
                                 lambda: (aq.zero_point + shift).reshape(()).to(torch.int64), key=(id(aq), shift))
            acc = onednn_code_conv(codes, zero, packed)
        else:
            if needs_grad:
                codes, _, zx = self._input_codes(x)
                centred = codes - zx
            else:  # one pass
                s = aq.spec
                centred = centred_codes(x, aq.scale, aq.zero_point, aq.qmin, aq.qmax, s.rounding, s.offset_in_rounding,
                                        aq.zero_point)
            if centred.dim() == 4 and centred.device.type == "cpu":  # oneDNN's NCHW kernels ran 1.5-20x slower
                centred = centred.contiguous(memory_format=torch.channels_last)
            acc = float_code_conv(self._conv, centred, self._weight_codes(), self.kernel)
        deq, qbias = self._kept_scaling(aq, lambda: self._output_scaling(aq, acc.dtype, x.dim()), (acc.dtype, x.dim()))
        if qbias is not None:
            acc = acc + qbias if acc.requires_grad else acc.add_(qbias)
        return scaled_accumulator(acc.float(), deq).to(x.dtype)

    def _output_scaling(self, aq: StaticQuantizer, dtype: torch.dtype,
                        dims: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(deq, qbias) shaped [1, o, 1, ...] for an output of `dims` dimensions: the sums' scaling,
        (sums + qbias) * deq in the kernel's order, deq = input scale x weight scale (float32),
        qbias = round(bias / deq) in the sums' `dtype` (None without a bias)."""
        shape = [1, -1] + [1] * (dims - 2)
        deq = (aq.scale * self.weight_quantizer.scale).reshape(-1)
        qbias = self.quantized_bias(deq)
        return deq.reshape(shape), None if qbias is None else qbias.to(dtype).reshape(shape)


class QConv1d(QConvNd):
    """Quantized nn.Conv1d: x [b, c, l]."""

    conv_fn = staticmethod(F.conv1d)


class QConv2d(QConvNd):
    """Quantized nn.Conv2d: x [b, c, h, w]."""

    conv_fn = staticmethod(F.conv2d)
