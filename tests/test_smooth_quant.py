import copy

import pytest
import torch
from torch import nn

import fxquant
from fxquant.passes import PassManager, ResolveSchemes, SmoothQuant

from models import RMSNorm


class Block(nn.Module):
    """Llama-like block: norm -> q/k, norm -> gate/up -> silu(gate)*up -> down, LayerNorm head."""

    def __init__(self, d=32, h=64):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)
        self.gate, self.up, self.down = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, d)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 8)

    def forward(self, x):
        n = self.norm1(x)
        x = x + self.q(n) * torch.sigmoid(self.k(n))
        n = self.norm2(x)
        x = x + self.down(nn.functional.silu(self.gate(n)) * self.up(n))
        return self.head(self.ln(x))


def _data(n=4):
    torch.manual_seed(0)
    xs = []
    for _ in range(n):
        x = torch.randn(2, 10, 32)
        x[..., 3] *= 40.0  # an outlier channel
        xs.append([x])
    return xs


def test_smoothing_keeps_float_outputs_and_folds_everywhere():
    torch.manual_seed(0)
    model = Block().eval()
    original = copy.deepcopy(model.state_dict())
    data = _data()
    gm = fxquant.capture(model, (data[0][0],))
    sq = SmoothQuant(data, alpha=0.8)
    gm = PassManager([ResolveSchemes(default="w8a8", disable_last_layer=False), sq])(gm)
    assert sq.folded == {"q": "norm", "k": "norm", "gate": "norm", "up": "norm", "down": "linear", "head": "norm"}
    x = data[1][0]
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-4, rtol=1e-4)
    for k, v in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, original[k])
    # activation outliers moved into the weights: the smoothed input range shrank
    assert gm.get_submodule("q").weight[:, 3].abs().max() > model.q.weight[:, 3].abs().max() * 2


def test_smoothing_reduces_static_w8a8_error():
    torch.manual_seed(0)
    model = Block().eval()
    with torch.no_grad():  # LLM-style outliers: a few huge norm-weight channels
        model.norm1.weight[3] = 60.0
        model.norm2.weight[5] = 60.0
    data = _data(6)
    x = data[-1][0]
    with torch.no_grad():
        ref = model(x)
        plain = fxquant.quantize(model, data[:5], scheme="w8a8", disable_last_layer=False, progress=False)(x)
        smooth = fxquant.quantize(model, data[:5], scheme="w8a8", disable_last_layer=False, smooth_alpha=0.5,
                                  progress=False)(x)
    assert (smooth - ref).pow(2).mean() < 0.5 * (plain - ref).pow(2).mean()


def test_float_layers_and_shared_inputs_are_not_smoothed():
    model = Block().eval()
    data = _data()
    gm = fxquant.capture(model, (data[0][0],))
    sq = SmoothQuant(data, alpha=0.5)
    PassManager([ResolveSchemes(default="w8a8", disable_names=["q"]), sq])(gm)
    assert "q" not in sq.folded and "k" not in sq.folded  # q stays float, so norm1 output is shared
    assert "head" not in sq.folded  # last layer float
    assert sq.folded["gate"] == "norm"


def test_statistics_pass_accepts_keyword_samples():
    """Samples given as keyword dicts (with non-tensor options) reach the graph by name."""

    class KwBlock(Block):
        def forward(self, x, scale_by_two=False):
            return super().forward(x * 2 if scale_by_two else x)

    model = KwBlock().eval()
    data = [{"scale_by_two": False, "x": x[0]} for x in _data()]  # keys not in signature order
    q = fxquant.quantize(model, data, scheme="w8a8", smooth_alpha=0.5, progress=False)
    with torch.no_grad():
        assert torch.allclose(q(x=data[0]["x"]), model(data[0]["x"]), atol=0.2)


def test_inplace_quantize_folds_into_the_models_own_weights():
    """inplace=True hands the model over: the folds change its tensors in place (no float copies),
    and the installed model computes what the GraphModule of inplace=False computes."""
    torch.manual_seed(0)
    model = Block().eval()
    twin = copy.deepcopy(model)
    data = _data()
    ptrs = {name: p.data_ptr() for name, p in model.named_parameters()}
    kept = fxquant.quantize(twin, data, scheme="w8a8_dynamic", disable_last_layer=False, smooth_alpha=0.6,
                            progress=False)
    out = fxquant.quantize(model, data, scheme="w8a8_dynamic", disable_last_layer=False, smooth_alpha=0.6,
                           progress=False, inplace=True)
    assert out is model
    assert model.norm1.weight.data_ptr() == ptrs["norm1.weight"]  # divided in place
    assert torch.equal(model.norm1.weight, kept.get_submodule("norm1").weight)
    x = data[1][0]
    with torch.no_grad():
        assert torch.allclose(model(x), kept(x), atol=1e-5, rtol=1e-5)


def test_inplace_is_refused_before_touching_the_model_where_it_cannot_install():
    model = Block().eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(fxquant.ConfigError, match="quantized small ops"):
        fxquant.quantize(model, _data(), scheme="w8a8", smooth_alpha=0.5, small_op_scheme="w8a8",
                         progress=False, inplace=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_proxy_stand_in_computes_the_fake_quant_product_in_integers():
    """QuantProxy's stand-in (int8 codes, exact integer GEMM) equals the float fake-quant product
    Q_a(x / s) @ Q_w(W * s)^T + b within float rounding, for both activation modes."""
    from fxquant.quant_proxy import _FakeQuantLinear, fake_quant_act, fake_quant_weight

    torch.manual_seed(0)
    lin = nn.Linear(48, 24)
    x = torch.randn(3, 7, 48)
    x[..., 5] *= 30.0
    s = torch.rand(48) + 0.5
    lo, hi = x.reshape(-1, 48).amin(0), x.reshape(-1, 48).amax(0)
    for mode in ("dynamic", "static"):
        stand_in = _FakeQuantLinear(lin, mode, lo, hi)
        stand_in.set_scale(s)
        with torch.no_grad():
            ref = nn.functional.linear(fake_quant_act(x / s, mode, (lo / s).min(), (hi / s).max()),
                                       fake_quant_weight(lin.weight * s), lin.bias)
            got = stand_in(x)
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), mode


def test_awq_output_error_through_the_gram_matrix_equals_the_forward_error():
    from fxquant.passes.awq_scale import group_weight_quantizer, output_error
    from fxquant.passes.smooth_quant import ChannelStats
    from fxquant.schemes import SchemeOptions, make_scheme

    torch.manual_seed(0)
    x = torch.randn(512, 64) * torch.linspace(0.1, 20.0, 64)  # uneven channels, as AWQ meets them
    weights = [torch.randn(96, 64), torch.randn(48, 64)]
    quant = group_weight_quantizer(make_scheme("w4a16", SchemeOptions(group_size=16)).weight)
    st = ChannelStats(x.amin(0), x.amax(0))
    error = output_error(x, weights, "none", st, quant)  # 2 k < m: through H = X^T X
    assert error.__name__ == "through_gram"
    for alpha in (0.0, 0.5, 1.0):
        s = x.abs().mean(0).pow(alpha)
        direct = sum(float(((torch.nn.functional.linear(x / s, quant(w * s)) - x @ w.t()) ** 2).sum()) for w in weights)
        assert error(s) == pytest.approx(direct, rel=1e-4)
    assert output_error(x[:100], weights, "none", st, quant).__name__ == "by_forward"  # k >= m / 2
