"""Quantized convolutions: every kernel sums the codes exactly, and a frozen QConv runs the kernel
chosen for this CPU with the values of the exact float path."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from layer_cache_checks import assert_copies_rebuild_the_cache

import fxquant
from fxquant.fake_quant import quantize_codes
from fxquant.kernels import activation_codes, int_conv, int_matmul
from fxquant.kernels.int_conv import (
    EXACT_FP32_CONV_K,
    ConvGeometry,
    PackedConvWeight,
    default_conv_kernel,
    float_code_conv,
    onednn_code_conv,
    qconv_available,
)
from fxquant.schemes import SchemeOptions

HAS_INT8_DOT = int_matmul.cpu_has_int8_dot()
SPLIT_BUILDS = qconv_available() and int_conv._native_large_codes() is not None


def _full_range(shape: tuple[int, ...], low: int, high: int, seed: int) -> torch.Tensor:
    """Integer codes at the ends of [low, high], where sums are largest."""
    gen = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(shape, generator=gen) < 0.5, low, high).to(torch.float32)


@pytest.mark.parametrize("kernel", ["fp32_split", "fp64"])
@pytest.mark.parametrize("cin, cout, size, groups, dims", [
    (64, 16, 3, 1, 2),    # 576 products per output: two chunks of input channels
    (200, 8, 3, 1, 2),    # four chunks
    (1, 4, 25, 1, 2),     # one channel's 625 products: float64
    (128, 16, 3, 2, 2),   # grouped, 576 per group: float64
    (16, 8, 3, 1, 2),     # 144: float32 as it is
    (96, 8, 9, 1, 1),     # Conv1d, 864 products
])
def test_float_code_conv_sums_exactly(kernel, cin, cout, size, groups, dims):
    conv_fn = F.conv2d if dims == 2 else F.conv1d
    spatial = (size + 3,) * dims
    kernel_shape = (size,) * dims
    x = _full_range((2, cin, *spatial), -255, 255, seed=cin)  # codes minus a zero point
    x[0] = 255
    w = _full_range((cout, cin // groups, *kernel_shape), -127, 127, seed=cout)
    w[: cout // 2] = 127  # same-signed rows: sums near the worst case

    def conv(a, b):
        return conv_fn(a, b, None, 1, size // 2, 1, groups)

    out = float_code_conv(conv, x, w, kernel)
    ref = conv(x.double(), w.double())
    assert torch.equal(out.double(), ref)
    assert ref.abs().max() > 2**24 or w[0].numel() <= EXACT_FP32_CONV_K  # the cases reach past float32
    assert out.dtype == (torch.float32 if w[0].numel() <= EXACT_FP32_CONV_K and kernel != "fp64" else torch.float64)


def test_conv_kernel_follows_the_cpu(monkeypatch):
    """oneDNN's int8 convolution only where the CPU has int8 dot products (without them its u8 x s8
    pair sums saturate); the exact fp32 path otherwise, fp64 off the CPU."""
    cpu = torch.device("cpu")
    without_dot = "onednn_split" if SPLIT_BUILDS else "fp32_split"
    expected = "onednn_qconv" if HAS_INT8_DOT and qconv_available() else without_dot
    assert default_conv_kernel(cpu, (16, 8, 3, 3)) == expected
    assert default_conv_kernel(cpu, (16, 8, 5)) == expected
    assert default_conv_kernel(torch.device("cuda"), (16, 8, 3, 3)) == "fp64"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    int_matmul.cpu_has_int8_dot.cache_clear()
    try:
        assert default_conv_kernel(cpu, (16, 8, 3, 3)) == without_dot
    finally:
        int_matmul.cpu_has_int8_dot.cache_clear()


@pytest.mark.skipif(not SPLIT_BUILDS, reason="needs oneDNN and a C compiler (else the layer runs fp32_split)")
@pytest.mark.parametrize("zero", [0, 255, 37, 128])
@pytest.mark.parametrize("cin, cout, size, stride, padding, dilation, groups, dims", [
    (64, 32, 3, 1, 1, 1, 1, 2),
    (16, 24, 3, 2, 1, 1, 1, 2),
    (16, 16, 3, 1, 2, 2, 1, 2),
    (32, 32, 3, 1, 1, 1, 32, 2),   # depthwise
    (24, 12, 5, 2, 0, 1, 3, 2),    # grouped, no padding
    (48, 24, 3, 2, 1, 1, 1, 1),    # Conv1d
    (640, 8, 3, 1, 1, 1, 1, 2),    # sums past 2^24: the exact float path
])
def test_split_code_conv_sums_exactly(cin, cout, size, stride, padding, dilation, groups, dims, zero, caplog):
    """"onednn_split" (AVX2): oneDNN's 7-bit part plus the C kernel's large codes equal the exact
    sums for every geometry and zero point (float32's rounding past 2^24, where the kernel hands over
    to the exact float path). On this CPU oneDNN may take VNNI for the 7-bit part; the emulated AVX2
    run of the suite checks its AVX2 kernel."""
    spatial = (9, 9) if dims == 2 else (11,)
    codes = _full_range((3, cin, *spatial), 0, 255, seed=cin + zero).to(torch.uint8)
    codes[0] = 255 if zero < 128 else 0  # one sample as far from the zero point as it goes
    codes[1, :, :2] = min(zero + 1, 255)  # mostly small codes elsewhere, as real activations
    w = _full_range((cout, cin // groups, *(size,) * dims), -127, 127, seed=cout).to(torch.int8)
    w[: cout // 2] = 127
    geometry = ConvGeometry((stride,) * dims, (padding,) * dims, (dilation,) * dims, groups, dims)
    with caplog.at_level(logging.DEBUG, logger=int_conv.logger.name):
        out = onednn_code_conv(codes, torch.tensor(zero), PackedConvWeight(w, geometry, source=w, split=True))
    conv_fn = F.conv2d if dims == 2 else F.conv1d
    acc = conv_fn(codes.double() - zero, w.double(), None, stride, padding, dilation, groups)
    assert out.dtype == torch.float32 and out.shape == acc.shape
    assert torch.equal(out.double(), acc.float().double())
    if acc.abs().max() >= 2**24:  # float32 alone could not hold these sums: the exact float path took over
        assert "recomputed on the exact float path" in caplog.text


@pytest.mark.skipif(not (HAS_INT8_DOT and qconv_available()),
                    reason="oneDNN's u8 x s8 convolution saturates without VNNI / AMX; that CPU runs fp32_split")
@pytest.mark.parametrize("cin, cout, groups, dims, zero", [
    (64, 32, 1, 2, 0), (64, 32, 1, 2, 255), (512, 16, 1, 2, 37), (32, 32, 32, 2, 128), (48, 24, 1, 1, 3),
])
def test_onednn_code_conv_sums_in_int32(cin, cout, groups, dims, zero):
    """Full-range uint8 codes around any zero point: the int32 sums come out exact (up to float32's
    rounding of sums past 2^24)."""
    spatial = (5, 5) if dims == 2 else (9,)
    size = (3,) * dims
    codes = _full_range((4, cin, *spatial), 0, 255, seed=cin).to(torch.uint8)
    codes[0] = 255 if zero < 128 else 0  # one sample as far from the zero point as it goes
    w = _full_range((cout, cin // groups, *size), -127, 127, seed=cout).to(torch.int8)
    w[: cout // 2] = 127
    geometry = ConvGeometry((1,) * dims, (1,) * dims, (1,) * dims, groups, dims)
    out = onednn_code_conv(codes, torch.tensor(zero), PackedConvWeight(w, geometry, source=w))
    conv_fn = F.conv2d if dims == 2 else F.conv1d
    acc = conv_fn(codes.double() - zero, w.double(), None, 1, 1, 1, groups)
    assert out.dtype == torch.float32 and out.shape == acc.shape
    assert torch.equal(out.double(), acc.float().double())  # float32's rounding of the exact sums
    assert acc.abs().max() > 2**24 or cin * 9 // groups < EXACT_FP32_CONV_K


def _two_conv_model(dims: int, groups: int, stride: int, dilation: int, bias: bool) -> torch.nn.Module:
    conv = torch.nn.Conv2d if dims == 2 else torch.nn.Conv1d
    return torch.nn.Sequential(
        conv(8, 32, 3, stride=stride, padding=dilation, dilation=dilation, groups=groups, bias=bias),
        torch.nn.ReLU(),
        conv(32, 64, 3, padding=1, bias=bias),  # 288 products per output
        torch.nn.ReLU(),
        conv(64, 16, 3, padding=1),  # 576: float32 sums would need two chunks
    )


@pytest.mark.parametrize("a_signed", [True, False])
@pytest.mark.parametrize("dims, groups, stride, dilation, bias", [
    (2, 1, 1, 1, True), (2, 8, 2, 1, False), (2, 2, 1, 2, True), (1, 1, 2, 1, True),
])
def test_frozen_qconv_runs_the_chosen_kernel_with_the_exact_values(dims, groups, stride, dilation, bias, a_signed,
                                                                   monkeypatch):
    """Without gradients a frozen QConv runs this CPU's kernel; with them, the exact float path
    (straight-through gradients). Every kernel gives the same sums and the layer scales them the same
    way, so the outputs are equal to the bit."""
    monkeypatch.setattr(int_conv, "SPLIT_MIN_POSITIONS", 1)  # "onednn_split" on these small images too
    torch.manual_seed(0)
    model = _two_conv_model(dims, groups, stride, dilation, bias)
    spatial = (12, 12) if dims == 2 else (20,)
    calib = [[torch.randn(4, 8, *spatial) * 2 + 0.5] for _ in range(2)]
    q = fxquant.quantize(model, calib, scheme="w8a8", options=SchemeOptions(a_signed=a_signed),
                         disable_last_layer=False, progress=False)
    x = torch.randn(3, 8, *spatial) * 2 + 0.5
    expected = default_conv_kernel(torch.device("cpu"), (16, 8, 3, 3))
    layers = [q.get_submodule(name) for name in ("0", "2", "4")]
    assert [layer.kernel for layer in layers] == [expected] * 3
    kernels = [n.meta["fxquant_kernel"] for n in q.graph.nodes if n.op == "call_module" and n.target in ("0", "2", "4")]
    assert kernels == [expected] * 3
    with torch.no_grad():
        ins, outs = x, []
        for layer in layers:
            outs.append(layer(ins))
            ins = torch.relu(outs[-1])
        others = ["fp64", "fp32_split"] + (["onednn_split"] if SPLIT_BUILDS else [])
        for kernel in others:
            for layer in layers:
                layer.kernel = kernel
            ref = [layer(i) for layer, i in zip(layers, [x, torch.relu(outs[0]), torch.relu(outs[1])])]
            for out, r in zip(outs, ref):
                assert torch.equal(out, r), kernel
        for layer in layers:
            layer.kernel = expected
    xg = x.clone().requires_grad_(True)
    yg = layers[0](xg)
    yg.sum().backward()
    assert torch.equal(yg.detach(), outs[0])
    assert xg.grad is not None and xg.grad.abs().sum() > 0


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("padding, kernel_size", [("same", 3), ("valid", 3), ("same", 4)])
def test_string_padding_runs_the_cpu_kernel_where_its_sides_are_even(dims, padding, kernel_size):
    """padding="valid" and "same" (stride 1) become integers per side, so oneDNN's kernels take
    them; "same" with an odd total (even kernel: torch pads the extra one on the right) stays on the
    exact float path. Either way the output is the float path's to the bit."""
    torch.manual_seed(0)
    conv = (torch.nn.Conv2d if dims == 2 else torch.nn.Conv1d)(8, 16, kernel_size, padding=padding)
    spatial = (11, 11) if dims == 2 else (23,)
    x = torch.randn(2, 8, *spatial)
    q = fxquant.quantize(torch.nn.Sequential(conv), [[x]], scheme="w8a8", disable_last_layer=False, progress=False)
    layer = q.get_submodule("0")
    even = not (padding == "same" and kernel_size % 2 == 0)
    cpu = torch.device("cpu")
    assert layer.padding == ((0,) * dims if padding == "valid" else (1,) * dims if even else "same")
    assert layer.kernel == default_conv_kernel(cpu, tuple(conv.weight.shape), (0,) if even else "same")
    if not even:
        assert layer.kernel == "fp32_split"
    with torch.no_grad():
        out = layer(x)
        layer.kernel = "fp64"
        assert torch.equal(out, layer(x))
    assert out.shape == conv(x).shape
    assert F.cosine_similarity(out.flatten(), conv(x).flatten(), dim=0) > 0.999


def _frozen_conv() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 8, 1))
    return fxquant.quantize(model, [[torch.randn(4, 16, 10, 10)]], scheme="w8a8", disable_last_layer=False,
                            progress=False)


@pytest.mark.skipif(not (HAS_INT8_DOT and qconv_available() or SPLIT_BUILDS),
                    reason="the packed oneDNN weight exists only where the CPU runs onednn_qconv or onednn_split")
def test_packed_conv_weight_follows_the_codes_copies_and_torch_compile():
    """The layer's packed oneDNN weight is rebuilt when the codes change, by a deep copy and by a
    load (never copied or saved), and torch.compile runs it in one graph."""
    q = _frozen_conv()
    layer = q.get_submodule("0")
    kernel = layer.kernel
    assert kernel in ("onednn_qconv", "onednn_split")
    x = torch.randn(2, 16, 10, 10)
    with torch.no_grad():
        out = layer(x)
        cached = layer.__dict__["_packed"]
        assert layer(x) is not None and layer.__dict__["_packed"] is cached
        layer.weight_codes.mul_(-1)  # new codes: the cache must not serve the old ones
        flipped = layer(x)
        assert layer.__dict__["_packed"] is not cached
        layer.kernel = "fp64"
        assert torch.equal(flipped, layer(x))
        layer.kernel = kernel
        assert not torch.allclose(flipped, out)
        assert_copies_rebuild_the_cache(layer, x, flipped)


def test_compiled_cnn_equals_eager():
    """backend="fxquant" on a quantized CNN gives the eager values (up to inductor's rounding of the
    scaling, which may move a code of the next layer's input by one)."""
    q = _frozen_conv()
    x = torch.randn(3, 16, 10, 10)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = q(x)
        compiled = torch.compile(q, backend="fxquant")(x)
    assert (compiled - eager).abs().max() <= 0.02 * eager.abs().max()


@pytest.mark.parametrize("rounding, offset_in_rounding", [("half_even", False), ("half_even", True),
                                                          ("floor_add", False), ("floor_add", True)])
@pytest.mark.parametrize("qmin, qmax, shift", [(-128, 127, 128), (0, 255, 0)])
def test_uint8_codes_are_quantize_codes_shifted(rounding, offset_in_rounding, qmin, qmax, shift, monkeypatch):
    """The in-place uint8 codes equal quantize_codes + shift, ties and clipping included."""
    scale, zero = torch.tensor(0.5), torch.tensor(float(-3 if qmin < 0 else 131))
    x = torch.cat([torch.arange(-200, 200) * 0.25, torch.randn(1240) * 40])  # every half step is a tie
    ref = quantize_codes(x, scale, zero, qmin, qmax, rounding, offset_in_rounding) + shift
    out = activation_codes.uint8_codes(x, scale, zero, qmin, qmax, rounding, offset_in_rounding, shift)
    assert out.dtype == torch.uint8 and torch.equal(out.float(), ref)
    planar = x.reshape(2, -1)[:, :-1].reshape(2, 13, 7, 9)  # not dense: the torch ops
    channels_last = planar.contiguous(memory_format=torch.channels_last)  # dense: the C kernel where it builds
    for t in (planar, channels_last):
        out = activation_codes.uint8_codes(t, scale, zero, qmin, qmax, rounding, offset_in_rounding, shift)
        assert t is planar or out.stride() == t.stride()
        assert torch.equal(out.float(), quantize_codes(t, scale, zero, qmin, qmax, rounding, offset_in_rounding) + shift)
    centred = activation_codes.centred_codes(channels_last, scale, zero, qmin, qmax, rounding, offset_in_rounding,
                                             int(zero))
    assert centred.dtype == torch.float32 and centred.stride() == channels_last.stride()
    assert torch.equal(centred, quantize_codes(channels_last, scale, zero, qmin, qmax, rounding, offset_in_rounding) - zero)
    if activation_codes._native_function("fxq_uint8_codes") is not None:  # the torch ops give the same integers
        monkeypatch.setattr(activation_codes, "_native_function", lambda symbol: None)
        assert torch.equal(activation_codes.uint8_codes(x, scale, zero, qmin, qmax, rounding, offset_in_rounding,
                                                        shift).float(), ref)
        assert torch.equal(activation_codes.centred_codes(x, scale, zero, qmin, qmax, rounding, offset_in_rounding, 5),
                           ref - shift - 5)
