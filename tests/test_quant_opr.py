import copy
import io

import pytest
import torch

import fxquant
from fxquant import QBMM, QAdd, QConv2d, QLinear, QMatMul, make_scheme
from fxquant.errors import ConfigError
from fxquant.kernels.weight_only import gemv_block
from fxquant.quantizer import StaticQuantizer


def _calibrate(opr, *inputs):
    for q, x in zip(opr.input_quantizers, inputs):
        if isinstance(q, StaticQuantizer):
            q.observe(x)
            q.calc_qparams()
    if hasattr(opr, "calibrate_weight"):
        opr.calibrate_weight()
    return opr.set_quant(True, True)


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8_dynamic"])
def test_qlinear_integer_path_equals_fake_quant_math(scheme):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(3, 7, 64) + 0.5
    q = _calibrate(QLinear(lin, make_scheme(scheme)), x)
    with torch.no_grad():
        y_int = q(x)  # exact int8 x int8 -> int32, then scale
    with torch.enable_grad():
        y_sim = q(x)  # float fake-quant path (what QAT differentiates)
    assert y_int.shape == (3, 7, 32)
    assert torch.allclose(y_int, y_sim.detach(), atol=1e-4, rtol=1e-5)
    assert (y_int - lin(x)).abs().max() < 0.1


def test_qlinear_integer_accumulation_is_exact():
    torch.manual_seed(0)
    lin = torch.nn.Linear(1536, 8, bias=False)
    x = torch.randn(4, 1536)
    q = _calibrate(QLinear(lin, make_scheme("w8a8")), x)
    with torch.no_grad():
        y = q(x)
        codes, sx, zx = q.input_quantizer.quantize(x)
        wc = q.weight_quantizer.quantize(lin.weight)[0]
        exact = ((codes.double() - zx.double()) @ wc.double().t()) * (sx * q.weight_quantizer.scale).double()
    assert torch.allclose(y.double(), exact, rtol=1e-6, atol=1e-6)


def test_set_quant_toggles_and_gradients_flow():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 4)
    x = torch.randn(8, 16)
    q = _calibrate(QLinear(lin, make_scheme("w8a8")), x)
    q.set_quant(False, False)
    assert torch.equal(q(x), lin(x))
    q.set_quant(True, True)
    assert not torch.equal(q(x), lin(x))
    xg = x.clone().requires_grad_()
    q(xg).sum().backward()
    assert xg.grad is not None and lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_qconv2d_matches_float_within_quant_error():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 8, 3, padding=1, groups=2)
    x = torch.randn(2, 4, 10, 10)
    q = _calibrate(QConv2d(conv, make_scheme("w8a8")), x)
    with torch.no_grad():
        y_int = q(x)
    with torch.enable_grad():
        y_sim = q(x).detach()
    assert torch.allclose(y_int, y_sim, atol=1e-4)
    assert (y_int - conv(x)).abs().max() < 0.1


def test_weight_only_schemes():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 16)
    x = torch.randn(5, 256)
    # weight bytes in the GEMV layout: B rows' 4-byte words side by side, [n / B, k_bytes / 4, 4 B]
    b = gemv_block()
    for scheme, tol, stored in (("w8a16", 0.02, (torch.int8, (16 // b, 64, 4 * b))),
                                ("w4a16", 0.3, (torch.uint8, (16 // b, 32, 4 * b)))):
        q = _calibrate(QLinear(lin, make_scheme(scheme)), x)
        before = q(x)
        assert (before - lin(x)).abs().max() < tol
        q.freeze()
        # frozen: compact codes only (4-bit packed two per byte), the float weight released
        assert (q.weight_codes.dtype, tuple(q.weight_codes.shape)) == stored
        assert [n for n, _ in q.named_parameters()] == ["bias"] and "weight_codes" in q.state_dict()
        assert torch.equal(q(x), before)
        assert torch.equal(q.to_float()(x), before)  # the float layer it stands for: dequantized weight
        assert lin.weight.shape == (16, 256)  # the caller's float layer keeps its weight
        with pytest.raises(ConfigError, match="released"):
            q.set_quant(False, True)


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16"])
def test_frozen_weight_only_decode_runs_the_c_gemv_and_keeps_gradients(monkeypatch, scheme):
    """Eager, a frozen weight-only layer computes inputs of up to 8 rows with codes_gemv's C
    kernel (the same values as its float GEMM up to rounding); where a gradient must reach the
    input, it takes the differentiable float GEMM."""
    import fxquant.kernels.weight_only as weight_only

    torch.manual_seed(0)
    q = _calibrate(QLinear(torch.nn.Linear(256, 32), make_scheme(scheme)), torch.randn(5, 256))
    q.freeze()
    assert q.codes_blocked
    calls = []
    native = weight_only.NativeGemv.__call__
    monkeypatch.setattr(weight_only.NativeGemv, "__call__", lambda gemv, x: calls.append(x.shape) or native(gemv, x))
    x = torch.randn(2, 3, 256)
    with torch.no_grad():
        out = q(x)
        assert calls == [x.shape]
        many = q(torch.cat([x.reshape(6, 256)] * 2))  # 12 rows: the float GEMM
        assert len(calls) == 1
    torch.testing.assert_close(out.reshape(6, 32), many[:6], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # copies bind the kernel to their own codes (it holds addresses)
        copied = copy.deepcopy(q)
        buffer = io.BytesIO()
        torch.save(q, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        for other in (copied, loaded):
            assert torch.equal(other(x), out)
            gemv = other.__dict__["_gemv_operands"][3]
            assert gemv is not q.__dict__["_gemv_operands"][3] and gemv.matches(other.weight_codes)
        assert len(calls) == 3
    with torch.no_grad():  # the kernel's prepared operands follow the layer's, in place or replaced
        q.weight_quantizer.scale.mul_(2)
        torch.testing.assert_close(q(x), 2 * out - q.bias, rtol=1e-5, atol=1e-5)
        q.weight_quantizer.scale.div_(2)
        scale = q.weight_quantizer.scale
        q.weight_quantizer.scale = scale * 3
        torch.testing.assert_close(q(x), 3 * out - 2 * q.bias, rtol=1e-5, atol=1e-5)
        q.weight_quantizer.scale = scale
        q.bias.add_(1)
        torch.testing.assert_close(q(x), out + 1, rtol=1e-5, atol=1e-5)
        q.bias.sub_(1)
        torch.testing.assert_close(q(x), out, rtol=1e-6, atol=1e-6)
    before = len(calls)
    assert q(x).grad_fn is not None and len(calls) == before  # the bias wants a gradient: not the C kernel
    x.requires_grad_(True)
    q(x).sum().backward()  # not the C kernel: it carries no gradient
    assert len(calls) == before and x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("scheme, rounding, options", [
    ("w8a8_dynamic", "half_even", {}), ("w8a8_dynamic", "floor_add", {"w_per_channel": False}),
    ("w8a8", "half_even", {}), ("w8a8", "floor_add", {"offset_in_rounding": True}),
    ("w8a8", "half_even", {"a_signed": False, "w_per_channel": False}),
])
def test_w8a8_decode_runs_the_int8_decode_kernel_bit_for_bit(monkeypatch, scheme, rounding, options):
    """Eager, a frozen W8A8 layer (per-token or static inputs) computes up to 8 rows (decode) with
    the int8 decode C kernel: the same floats as its torch path (here the fp64 reference kernel)
    for every row count, weight scales per channel or per tensor, int8 or uint8 static codes, codes on ties and a NaN row included; more rows, the fp64 kernel and
    inputs that want a gradient take the torch path; the binding follows the bias and scales, and
    copies bind their own."""
    import dataclasses

    import fxquant.kernels.int8_decode as int8_decode
    from fxquant.kernels import c_kernels

    torch.manual_seed(0)
    q = QLinear(torch.nn.Linear(320, 48), make_scheme(scheme, fxquant.SchemeOptions(**options)))
    q = _calibrate(q, torch.randn(16, 320) * 3 + 0.5)
    aq = q.input_quantizer
    aq.spec = dataclasses.replace(aq.spec, rounding=rounding)
    q.freeze()
    assert q.kernel != "fp64" and not q.codes_blocked
    calls = []
    native = int8_decode.Int8DecodeLinear.__call__
    monkeypatch.setattr(int8_decode.Int8DecodeLinear, "__call__", lambda op, x: calls.append(x.shape) or native(op, x))
    builds = c_kernels.compiler() is not None

    def reference(x: torch.Tensor) -> torch.Tensor:
        kernel, q.kernel = q.kernel, "fp64"
        try:
            return q(x)
        finally:
            q.kernel = kernel

    x = torch.randn(8, 320) * torch.linspace(0.05, 4, 8)[:, None]
    step = x[0].abs().max() / 127 if scheme == "w8a8_dynamic" else aq.scale
    x[0, :4] = torch.tensor([0.5, 1.5, -2.5, 3.5]) * step  # codes on ties
    with torch.no_grad():
        for rows in (1, 3, 8):
            assert torch.equal(q(x[:rows]), reference(x[:rows]))
        assert calls == ([(1, 320), (3, 320), (8, 320)] if builds else [])
        assert torch.equal(q(torch.cat([x, x[:1]])), reference(torch.cat([x, x[:1]])))  # 9 rows: the GEMM
        assert len(calls) == (3 if builds else 0)
        nan = x[:2].clone()
        nan[1, 5] = float("nan")
        out = q(nan)
        assert out[1].isnan().all() and torch.equal(out[0], reference(x[:1])[0])
        q.bias.add_(0.25)  # the binding follows the bias and the scales
        assert torch.equal(q(x[:2]), reference(x[:2]))
        q.weight_quantizer.scale.mul_(1.5)
        assert torch.equal(q(x[:2]), reference(x[:2]))
        if scheme == "w8a8":
            aq.scale = aq.scale * 2  # a new tensor
            assert torch.equal(q(x[:2]), reference(x[:2]))
        for other in (copy.deepcopy(q), torch.load(io.BytesIO(_saved(q)), weights_only=False)):
            assert torch.equal(other(x[:2]), reference(x[:2]))
            if builds:
                bound = other.__dict__["_int8_decode_operands"][3]
                assert bound is not q.__dict__["_int8_decode_operands"][3] and bound.matches(other.weight_codes)
    before = len(calls)
    xg = x[:2].clone().requires_grad_(True)
    q(xg).sum().backward()  # not the C kernel: it carries no gradient
    assert len(calls) == before and xg.grad is not None and xg.grad.abs().sum() > 0


def _saved(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("cls,shape_a,shape_b,fn", [
    (QAdd, (2, 3, 4), (2, 3, 4), torch.add),
    (QBMM, (2, 3, 4), (2, 4, 5), torch.bmm),
    (QMatMul, (2, 2, 3, 4), (4, 5), torch.matmul),
])
def test_small_ops_quantize_each_input(cls, shape_a, shape_b, fn):
    torch.manual_seed(0)
    a, b = torch.randn(shape_a), torch.randn(shape_b) * 10
    q = _calibrate(cls(make_scheme("w8a8")), a, b)
    assert len(q.input_quantizers) == 2
    assert float(q.input_quantizers[1].scale) > 5 * float(q.input_quantizers[0].scale)
    out = q(a, b)
    assert out.shape == fn(a, b).shape
    assert torch.allclose(out, fn(a, b), atol=0.5)
    q.set_quant(False, False)
    assert torch.equal(q(a, b), fn(a, b))


@pytest.mark.parametrize("layer_type", ["conv", "linear"])
def test_inference_keeps_the_scaling_only_while_scales_and_bias_stay(layer_type):
    """Without gradients a static W8A8 layer keeps its deq and quantized bias between calls;
    changing a scale or the bias, in place or by a new tensor, gives the outputs the scaling computed
    afresh (with gradients enabled, as every call there) would give."""
    torch.manual_seed(0)
    if layer_type == "conv":
        model, x = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1)), torch.randn(2, 8, 10, 10)
    else:
        # more rows than decode's (whose C kernel binds its own scaling: the int8 decode test)
        model, x = torch.nn.Sequential(torch.nn.Linear(64, 32)), torch.randn(12, 64)
    q = fxquant.quantize(model, [[x]], scheme="w8a8", disable_last_layer=False, progress=False)
    layer = q.get_submodule("0")

    def agrees() -> torch.Tensor:
        with torch.no_grad():
            kept = layer(x)
        with torch.enable_grad():
            fresh = layer(x).detach()
        assert torch.equal(kept, fresh)
        return kept

    first = agrees()
    assert "_cached_output_scaling" in layer.__dict__
    with torch.no_grad():
        layer.bias.add_(0.5)
    assert not torch.equal(agrees(), first)
    with torch.no_grad():
        layer.weight_quantizer.scale.mul_(1.5)
    agrees()
    layer.input_quantizer.scale = layer.input_quantizer.scale * 2  # a new tensor (the frozen zero point stays)
    agrees()
