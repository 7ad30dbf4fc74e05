import pytest
import torch

from fxquant import QuantSpec, StaticQuantizer
from fxquant.errors import ConfigError
from fxquant.fake_quant import round_ste
from fxquant.quantizer import DynamicQuantizer


def _calibrated(spec: QuantSpec, x: torch.Tensor) -> StaticQuantizer:
    q = StaticQuantizer(spec)
    q.observe(x)
    q.calc_qparams(like=x)
    q.enabled = True
    return q


def test_rounding_modes_differ_on_halves():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5])
    assert round_ste(x, "half_even").tolist() == [0.0, 2.0, 2.0, -0.0, -2.0]
    assert round_ste(x, "floor_add").tolist() == [1.0, 2.0, 3.0, 0.0, -1.0]


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_in_range_and_error_bounded(bits, symmetric):
    torch.manual_seed(0)
    x = torch.randn(64, 32) * 3 + (0 if symmetric else 2)
    q = _calibrated(QuantSpec(bits=bits, symmetric=symmetric), x)
    codes, scale, zp = q.quantize(x)
    assert codes.min() >= q.qmin and codes.max() <= q.qmax
    assert torch.equal(codes, codes.round())
    assert (q(x) - x).abs().max() <= scale / 2 + 1e-6


def test_per_channel_scales_follow_channels():
    w = torch.randn(8, 16) * torch.arange(1, 9).float()[:, None]
    q = _calibrated(QuantSpec(granularity="channel", axis=0), w)
    assert q.scale.shape == (8,)
    assert torch.allclose(q.scale, w.abs().amax(1) / 127)


def test_per_group_weights():
    torch.manual_seed(0)
    w = torch.randn(6, 64)
    q = _calibrated(QuantSpec(bits=4, granularity="group", group_size=16), w)
    assert q.scale.shape == (6, 4)
    out = q(w)
    assert out.shape == w.shape
    groups = w.reshape(6, 4, 16)
    assert torch.allclose(q.scale, groups.abs().amax(-1) / 7)
    with pytest.raises(ConfigError, match="does not divide"):
        _calibrated(QuantSpec(bits=4, granularity="group", group_size=48), w)


def test_dynamic_per_token():
    x = torch.randn(2, 5, 16)
    x[0, 0] *= 100
    q = DynamicQuantizer(QuantSpec(granularity="token"))
    q.enabled = True
    codes, scale, zp = q.quantize(x)
    assert scale.shape == (2, 5, 1)
    assert torch.allclose(scale[..., 0], x.abs().amax(-1) / 127)
    assert (q(x) - x).abs().le(scale / 2 + 1e-6).all()


def test_straight_through_gradient():
    x = torch.randn(4, 8, requires_grad=True)
    q = _calibrated(QuantSpec(), x.detach() * 2)  # range wider than x: nothing clipped
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_pow2_scale():
    x = torch.randn(100) * 3
    q = _calibrated(QuantSpec(pow2_scale=True), x)
    log2 = torch.log2(q.scale)
    assert torch.equal(log2, log2.round())


def test_invalid_specs():
    with pytest.raises(ConfigError, match="valid: 4, 8, 16"):
        QuantSpec(bits=3)
    with pytest.raises(ConfigError, match="granularity"):
        QuantSpec(granularity="block")
    with pytest.raises(ConfigError, match="rounding"):
        QuantSpec(rounding="stochastic")


def test_frozen_quantizer_keeps_qparams():
    x = torch.randn(10)
    q = _calibrated(QuantSpec(), x)
    before = q(x)
    q.freeze()
    assert q.observer is None
    assert torch.equal(q(x), before)
    with pytest.raises(RuntimeError, match="frozen"):
        q.observe(x)


def test_clip_search_never_worse_than_minmax_on_weight_error():
    torch.manual_seed(0)
    w = torch.distributions.Laplace(0.0, 1.0).sample((16, 64))
    plain = _calibrated(QuantSpec(bits=4, granularity="channel"), w)
    searched = StaticQuantizer(QuantSpec(bits=4, granularity="channel", clip_search=True))
    searched.observe(w)
    searched.search_clipping(w)
    searched.enabled = True
    err_plain = ((plain(w) - w) ** 2).sum(1)
    err_search = ((searched(w) - w) ** 2).sum(1)
    assert (err_search <= err_plain + 1e-6).all() and err_search.sum() < err_plain.sum()
