"""Exact int8 convolutions: (x codes - zero point) * weight codes accumulated as integers.

Where the CPU has int8 dot products (VNNI / AMX), oneDNN's u8 x s8 convolution accumulates in int32
("onednn_qconv"). Without them (AVX2), oneDNN's u8 x s8 kernels multiply byte pairs with `vpmaddubsw`,
whose 16-bit pair sums saturate (measured: sums wrong by up to 2e7 at full range), so, as for
linears (onednn_split.py), the codes are split around their zero point z: oneDNN convolves the 7-bit
part of the codes around a centre c near z, clamp(code, c - 64, c + 63) - c (exact), and
csrc/conv_large_codes.c adds in int32 the convolution of the few codes further than 64 from c and the
zero point's distance to c ("onednn_split"). Without oneDNN or a C compiler the
codes are convolved in fp32 with the input channels cut into chunks whose sums stay exact
("fp32_split"); off the CPU in fp64 (cuDNN may use TF32, which is not exact). Every kernel gives the
sums; the layer adds the bias on the accumulator's grid and scales them, the same float operations
whatever the kernel.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import c_kernels
from .int_matmul import check_exact, cpu_has_int8_dot
from .layer_cache import WeightCodesCache

logger = logging.getLogger(__name__)

#: implementations of a quantized convolution, by name
CONV_KERNELS = ("onednn_qconv", "onednn_split", "fp32_split", "fp64")
#: the largest number of products per output (in channels per group x kernel area) whose fp32 sums
#: of codes stay exact: |(x - z) * w| <= 255 * 127, and 518 * 255 * 127 < 2^24
EXACT_FP32_CONV_K = 2**24 // (255 * 127)
#: the zero point of the 7-bit part oneDNN convolves in "onednn_split"
SMALL_ZERO = 64


def qconv_available() -> bool:
    """True when this torch has oneDNN's quantized convolution on CPU."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv_prepack")


def default_conv_kernel(device: torch.device, weight_shape: tuple[int, ...],
                        padding: tuple[int, ...] | str = ()) -> str:
    """The fastest exact convolution of int8 codes on `device` for a weight [o, c / groups, *kernel]
    (1-d or 2-d) and padding per side (a string, "same" with uneven sides: the float kernels only)."""
    if device.type != "cpu":
        return "fp64"
    if len(weight_shape) in (3, 4) and not isinstance(padding, str) and qconv_available():
        if cpu_has_int8_dot():
            return "onednn_qconv"
        if _native_large_codes() is not None:
            return "onednn_split"
    return "fp32_split"


#: "onednn_split" takes a call only from this many products per output (input channels per group x
#: kernel area) and output positions per sample: below them its passes over the codes cost more than
#: the fp32 convolution it saves (AVX2-capped EPYC, digits CNN on 8 x 8 images: 0.9-1.0 ms against
#: 0.45 ms for 16 -> 16 channels; 224 x 224 images with ResNet-18 widths: 1.5x faster than fp32)
SPLIT_MIN_PRODUCTS, SPLIT_MIN_POSITIONS = 64, 256


def split_conv_pays(x: torch.Tensor, weight_shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """True when "onednn_split" is faster than the exact fp32 convolution for input x [b, c,
    *spatial] and a weight [o, c / groups, *kernel] (the same sums either way)."""
    positions, products = 1, 1
    for size, s in zip(x.shape[2:], stride):  # loops, not generators: Dynamo traces this
        positions *= size // s
    for size in weight_shape[1:]:
        products *= size
    return products >= SPLIT_MIN_PRODUCTS and positions >= SPLIT_MIN_POSITIONS


class ConvGeometry:
    """stride, padding, dilation and groups of a convolution, as 2-d lists for oneDNN (1-d
    convolutions run as 2-d ones of height 1)."""

    def __init__(self, stride, padding, dilation, groups: int, dims: int) -> None:  # noqa: ANN001
        pad1 = [0] if dims == 1 else []
        one = [1] if dims == 1 else []
        self.dims, self.groups = dims, groups
        self.stride, self.padding = one + list(stride), pad1 + list(padding)
        self.dilation = one + list(dilation)


class PackedConvWeight(WeightCodesCache):
    """oneDNN's packed int8 weight [o, c / groups, *kernel] with the unit scales and zero zero points
    it takes; for "onednn_split" (`split`) also the codes as the large-code kernel reads them (int8
    [groups, c / groups, *kernel, o / groups]) and as they are (the exact fallback). A cache of the
    layer: never copied or saved; a copied or unpickled layer builds its own. `source` identifies
    the stored codes it was built from."""

    def __init__(self, codes: torch.Tensor, geometry: ConvGeometry, source: torch.Tensor, split: bool = False) -> None:
        if codes.dtype != torch.int8 or codes.dim() != geometry.dims + 2:
            raise TypeError(f"PackedConvWeight takes int8 codes [o, c, *kernel], got {codes.dtype} {tuple(codes.shape)}")
        if not split:
            check_exact("onednn_qconv", codes.device, CONV_KERNELS)
        _register_ops()
        g = geometry
        w = codes.unsqueeze(2) if g.dims == 1 else codes
        o = codes.shape[0]
        self.geometry = g
        super().__init__(source)
        self.one, self.ones, self.zeros = torch.ones(()), torch.ones(o), torch.zeros(o, dtype=torch.long)
        self.packed = torch.ops.onednn.qconv_prepack(w.contiguous(), self.ones, 1.0, 0, g.stride, g.padding,
                                                     g.dilation, g.groups, None)
        self.codes = self.table = self.tap_sums = None
        if split:
            self.codes = w
            grouped = w.reshape(g.groups, o // g.groups, *w.shape[1:])  # [G, O / G, C / G, KH, KW]
            self.table = grouped.permute(0, 2, 3, 4, 1).contiguous()
            self.tap_sums = w.sum(dim=1, dtype=torch.int32).permute(1, 2, 0).contiguous()  # [KH, KW, O]

    @property
    def kernel(self) -> str:
        """The layer kernel these operands serve."""
        return "onednn_qconv" if self.table is None else "onednn_split"


def onednn_code_conv(codes: torch.Tensor, zero: torch.Tensor, weight: PackedConvWeight) -> torch.Tensor:
    """(codes - zero) conv weight codes -> float32 [b, o, *spatial] (2-d: channels-last), summed in
    int32 (exact below 2^24, then float32's rounding of the int32 sum): codes uint8 [b, c, *spatial],
    zero a 0-d integer tensor. By oneDNN's u8 x s8 convolution, or for a `split` weight its 7-bit
    split with the large codes added by the C kernel. The caller scales the sums, as every other
    kernel's, so that the output is the same to the bit."""
    g = weight.geometry
    if weight.table is not None:
        op = torch.ops.fxquant.split_qconv if torch.compiler.is_compiling() else _split_qconv
        return op(codes, zero, weight.packed, weight.ones, weight.zeros, weight.table, weight.tap_sums, weight.codes,
                  g.stride, g.padding, g.dilation, g.groups, g.dims)
    op = torch.ops.fxquant.qconv if torch.compiler.is_compiling() else _qconv  # eager: no dispatch through the op
    return op(codes, weight.one, zero, weight.packed, weight.ones, weight.zeros, g.stride, g.padding, g.dilation,
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


def _split_qconv(codes: torch.Tensor, zero: torch.Tensor, packed: torch.Tensor, ones: torch.Tensor,
                 zeros: torch.Tensor, table: torch.Tensor, tap_sums: torch.Tensor, weight: torch.Tensor,
                 stride: list[int], padding: list[int], dilation: list[int], groups: int, dims: int) -> torch.Tensor:
    """onednn_code_conv's op for a split weight: oneDNN on the 7-bit part around a centre, the C
    kernel on the rest and on the zero point's distance to the centre; where some sum reaches 2^24
    (the C kernel reports it), the exact float path instead."""
    x = (codes.unsqueeze(2) if dims == 1 else codes).contiguous(memory_format=torch.channels_last)
    z = int(zero)
    # the 7-bit window [c - 64, c + 63] as near z as the codes' range allows: activations after a ReLU
    # (z at the bottom of the range) then leave 0.1-1.5% of their codes to the C kernel, not 6-40%
    centre = min(max(z, SMALL_ZERO), 255 - SMALL_ZERO + 1)
    low = torch.empty_like(x)
    _native_low_codes()(x.data_ptr(), x.numel(), centre, low.data_ptr())
    out = torch.ops.onednn.qconv2d_pointwise(low, 1.0, SMALL_ZERO, packed, ones, zeros, None, stride, padding,
                                             dilation, groups, 1.0, 0, torch.float32, "none", [], "")
    out = out.contiguous(memory_format=torch.channels_last)
    b, c, h, w = x.shape
    _, o, oh, ow = out.shape
    status = _native_large_codes()(x.data_ptr(), b, h, w, c, z, centre, table.data_ptr(), tap_sums.data_ptr(), groups,
                                   *weight.shape[2:], oh, ow, o, *stride, *padding, *dilation, out.data_ptr())
    if status == 2:
        raise MemoryError("the large-code convolution kernel could not allocate its sums")
    if status == 1:  # some sum reached 2^24: recompute in float64-backed chunks, then round once
        def conv(a: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            return F.conv2d(a, k, None, stride, padding, dilation, groups)

        logger.debug("a split convolution's sums reached 2^24: recomputed on the exact float path")
        exact = float_code_conv(conv, x.float() - z, weight.float(), "fp32_split").float()
        out = exact.contiguous(memory_format=torch.channels_last)
    return out.squeeze(2) if dims == 1 else out


def _output_like(codes: torch.Tensor, w_scale: torch.Tensor, kernel: tuple[int, ...], stride: list[int],
                 padding: list[int], dilation: list[int], dims: int) -> torch.Tensor:
    """The ops' fake result: float32 [b, o, *spatial], channels-last (1-d: squeezed)."""
    x = codes.unsqueeze(2) if dims == 1 else codes
    spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1
               for size, k, s, p, d in zip(x.shape[2:], kernel, stride, padding, dilation)]
    out = x.new_empty((x.shape[0], w_scale.shape[0], *spatial), dtype=torch.float32)
    out = out.contiguous(memory_format=torch.channels_last)
    return out.squeeze(2) if dims == 1 else out


@functools.cache
def _register_ops() -> torch.library.Library:
    """Define fxquant::qconv and fxquant::split_qconv once, on the first PackedConvWeight (not at
    import): opaque ops for torch.compile, which cannot lower oneDNN's op on a weight that is not a
    graph constant, nor trace the C kernel. Kernels of a library fragment (CompositeExplicitAutograd), not
    torch.library.custom_op: they are called without gradients, and custom_op's dispatch cost about
    25 us more per call (13 convolutions in the MobileNet-style CNN). Returns the fragment, kept
    alive by the cache."""
    lib = torch.library.Library("fxquant", "FRAGMENT")
    geometry = "int[] stride, int[] padding, int[] dilation, int groups, int dims"
    lib.define(f"qconv(Tensor codes, Tensor scale, Tensor zero, Tensor packed, Tensor w_scale, Tensor w_zero, "
               f"{geometry}) -> Tensor")
    lib.define(f"split_qconv(Tensor codes, Tensor zero, Tensor packed, Tensor ones, Tensor zeros, Tensor table, "
               f"Tensor tap_sums, Tensor weight, {geometry}) -> Tensor")
    lib.impl("qconv", _qconv, "CompositeExplicitAutograd")
    lib.impl("split_qconv", _split_qconv, "CompositeExplicitAutograd")

    @torch.library.register_fake("fxquant::qconv", lib=lib)
    def _(codes, scale, zero, packed, w_scale, w_zero, stride, padding, dilation, groups, dims):  # noqa: ANN001, ANN202
        return _output_like(codes, w_scale, packed.shape[2:], stride, padding, dilation, dims)

    @torch.library.register_fake("fxquant::split_qconv", lib=lib)
    def _(codes, zero, packed, ones, zeros, table, tap_sums, weight, stride, padding, dilation, groups, dims):  # noqa: ANN001, ANN202
        return _output_like(codes, ones, weight.shape[2:], stride, padding, dilation, dims)

    return lib


def _native_low_codes() -> Callable[..., None] | None:
    """csrc/conv_large_codes.c's fxq_low_codes, or None where it does not build."""
    ptr = ctypes.c_void_p
    return c_kernels.function("conv_large_codes", "fxq_low_codes", (ptr, ctypes.c_int64, ctypes.c_int32, ptr), None)


def _native_large_codes() -> Callable[..., int] | None:
    """csrc/conv_large_codes.c's fxq_add_large_codes_conv, or None where it does not build."""
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    return c_kernels.function("conv_large_codes", "fxq_add_large_codes_conv",
                              (ptr, i64, i64, i64, i64, ctypes.c_int32, ctypes.c_int32, ptr, ptr) + (i64,) * 12 + (ptr,))


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
