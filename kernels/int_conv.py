"""Exact int8 convolutions: (x codes - zero point) * weight codes accumulated as integers, then scaled.

Where the CPU has int8 dot products (VNNI / AMX), oneDNN's u8 x s8 convolution accumulates in int32
("onednn_qconv"). Without them, oneDNN's
u8 x s8 kernels saturate 16-bit pair sums (see int_matmul), so the codes are convolved in fp32 with
the input channels cut into chunks whose sums stay exact ("fp32_split"), or in fp64 off the CPU
(cuDNN may use TF32, which is not exact). Every kernel gives the sums; the layer adds the bias on
the accumulator's grid and scales them, the same float operations whatever the kernel.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from .int_matmul import cpu_has_int8_dot

#: implementations of a quantized convolution, by name
CONV_KERNELS = ("onednn_qconv", "fp32_split", "fp64")
#: the largest number of products per output (in channels per group x kernel area) whose fp32 sums
#: of codes stay exact: |(x - z) * w| <= 255 * 127, and 518 * 255 * 127 < 2^24
EXACT_FP32_CONV_K = 2**24 // (255 * 127)


def qconv_available() -> bool:
    """True when this torch has oneDNN's quantized convolution on CPU."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv_prepack")


def default_conv_kernel(device: torch.device, weight_shape: tuple[int, ...]) -> str:
    """The fastest exact convolution of int8 codes on `device` for a weight [o, c / groups, *kernel]
    (1-d or 2-d)."""
    if device.type != "cpu":
        return "fp64"
    if len(weight_shape) in (3, 4) and cpu_has_int8_dot() and qconv_available():
        return "onednn_qconv"
    return "fp32_split"


class ConvGeometry:
    """stride, padding, dilation and groups of a convolution, as 2-d lists for oneDNN (1-d
    convolutions run as 2-d ones of height 1)."""

    def __init__(self, stride, padding, dilation, groups: int, dims: int) -> None:  # noqa: ANN001
        pad1 = [0] if dims == 1 else []
        one = [1] if dims == 1 else []
        self.dims, self.groups = dims, groups
        self.stride, self.padding = one + list(stride), pad1 + list(padding)
        self.dilation = one + list(dilation)


class PackedConvWeight:
    """oneDNN's packed int8 weight [o, c / groups, *kernel] for onednn_qconv, with the unit scales and
    zero zero points it takes. A cache of the layer: never copied or saved; a copied or unpickled
    layer builds its own. `source` identifies the stored codes it was built from."""

    def __init__(self, codes: torch.Tensor, geometry: ConvGeometry, source: torch.Tensor) -> None:
        if codes.dtype != torch.int8 or codes.dim() != geometry.dims + 2:
            raise TypeError(f"PackedConvWeight takes int8 codes [o, c, *kernel], got {codes.dtype} {tuple(codes.shape)}")
        _register_op()
        g = geometry
        w = codes.unsqueeze(2) if g.dims == 1 else codes
        o = codes.shape[0]
        self.geometry = g
        self.source = (source.data_ptr(), source._version, tuple(source.shape))
        self.one, self.ones, self.zeros = torch.ones(()), torch.ones(o), torch.zeros(o, dtype=torch.long)
        self.packed = torch.ops.onednn.qconv_prepack(w.contiguous(), self.ones, 1.0, 0, g.stride, g.padding,
                                                     g.dilation, g.groups, None)

    def matches(self, source: torch.Tensor) -> bool:
        """True when built from these stored codes as they are now (same storage, version and shape)."""
        return self.source == (source.data_ptr(), source._version, tuple(source.shape))

    def __deepcopy__(self, memo: dict) -> None:
        return None  # a copy rebuilds its own from its own codes

    def __reduce__(self) -> tuple:
        return _no_cache, ()  # pickled as None: oneDNN's packed layout is per process


def _no_cache() -> None:
    return None


def onednn_code_conv(codes: torch.Tensor, zero: torch.Tensor, weight: PackedConvWeight) -> torch.Tensor:
    """(codes - zero) conv weight codes -> float32 [b, o, *spatial] (2-d: channels-last), summed in
    int32 (exact below 2^24, then float32's rounding of the int32 sum): codes uint8 [b, c, *spatial],
    zero a 0-d integer tensor. The caller scales the sums, as every other kernel's, so that the
    output is the same to the bit."""
    g = weight.geometry
    qconv = torch.ops.fxquant.qconv if torch.compiler.is_compiling() else _qconv  # eager: no dispatch through the op
    return qconv(codes, weight.one, zero, weight.packed, weight.ones, weight.zeros, g.stride, g.padding, g.dilation,
                 g.groups, g.dims)


def _qconv(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, packed: torch.Tensor,
           w_scale: torch.Tensor, w_zero: torch.Tensor, stride: list[int], padding: list[int], dilation: list[int],
           groups: int, dims: int) -> torch.Tensor:
    """onednn_code_conv's op: oneDNN's convolution with float32 output, channels-last."""
    x = codes.unsqueeze(2) if dims == 1 else codes
    out = torch.ops.onednn.qconv2d_pointwise.tensor(x, scale, zero, packed, w_scale, w_zero, None, stride, padding,
                                                    dilation, groups, 1.0, 0, torch.float32, "none", [], "")
    out = out.contiguous(memory_format=torch.channels_last)
    return out.squeeze(2) if dims == 1 else out


@functools.cache
def _register_op() -> None:
    """Define fxquant::qconv once, on the first PackedConvWeight (not at import): one opaque op for
    torch.compile, which cannot lower oneDNN's op on a weight that is not a graph constant."""
    op = torch.library.custom_op("fxquant::qconv", _qconv, mutates_args=())

    @op.register_fake
    def _(codes, scale, zero, packed, w_scale, w_zero, stride, padding, dilation, groups, dims):  # noqa: ANN001, ANN202
        x = codes.unsqueeze(2) if dims == 1 else codes
        kernel = packed.shape[2:]
        spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1
                   for size, k, s, p, d in zip(x.shape[2:], kernel, stride, padding, dilation)]
        out = x.new_empty((x.shape[0], w_scale.shape[0], *spatial), dtype=torch.float32)
        out = out.contiguous(memory_format=torch.channels_last)
        return out.squeeze(2) if dims == 1 else out


def float_code_conv(conv: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                    w: torch.Tensor, kernel: str) -> torch.Tensor:
    """conv(x, w) of integer-valued float tensors summed exactly: x [b, c, *spatial] the input codes
    minus their zero point (|x| <= 255), w [o, c / groups, *kernel] the weight codes (|w| <= 127);
    conv applies the layer's geometry. float32 [b, o, *spatial] where every sum is exact in float32,
    else float64. "fp32_split" cuts the input channels of an ungrouped convolution into chunks whose
    fp32 sums are exact and adds the chunks in float64 (gradients pass); "fp64" convolves in float64."""
    if w[0].numel() <= EXACT_FP32_CONV_K and kernel != "fp64":
        return conv(x.float(), w.float())
    channels = w.shape[1]
    step = max(1, EXACT_FP32_CONV_K // math.prod(w.shape[2:]))
    if kernel == "fp64" or x.shape[1] != channels or math.prod(w.shape[2:]) > EXACT_FP32_CONV_K:
        return conv(x.double(), w.double())  # grouped, or one channel's sums alone may pass 2^24
    out = None
    for start in range(0, channels, step):
        part = conv(x[:, start:start + step].float(), w[:, start:start + step].float()).double()
        out = part if out is None else out + part
    return out
