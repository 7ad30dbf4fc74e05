import pytest
import torch

from fxquant.errors import ConfigError
from fxquant.observers import OBSERVERS, build_observer


def _stream(obs, chunks):
    for c in chunks:
        obs.update(c)
    return obs.calc_range()


def _state_numel(obs) -> int:
    """Number of tensor elements an observer holds (its streaming state)."""
    total = 0
    for v in vars(obs).values():
        if isinstance(v, torch.Tensor):
            total += v.numel()
        elif isinstance(v, list):
            for h in v:
                total += sum(t.numel() for t in vars(h).values() if isinstance(t, torch.Tensor))
        elif isinstance(v, torch.nn.Module):
            total += _state_numel(v)
    total += sum(_state_numel(m) for m in obs.children())
    return total


def test_registry_has_every_named_observer():
    for name in ("minmax", "histogram", "percentile", "top_k", "sigma", "mixed", "ema"):
        assert name in OBSERVERS
    assert build_observer("top_10").k == 10
    with pytest.raises(ConfigError, match="valid: .*histogram.*minmax"):
        build_observer("kl_divergence")


@pytest.mark.parametrize("name", ["minmax", "histogram", "percentile", "top_10", "sigma", "mixed", "ema"])
def test_observer_state_does_not_grow_with_samples(name):
    torch.manual_seed(0)
    obs = build_observer(name)
    obs.update(torch.randn(1, 4096))
    size_after_one = _state_numel(obs)
    for _ in range(20):
        obs.update(torch.randn(1, 4096) * 1.5)
    assert _state_numel(obs) == size_after_one
    lo, hi = obs.calc_range()
    assert lo.shape == hi.shape == (1,) and float(lo) < 0 < float(hi)


def test_minmax_streams_exactly():
    chunks = [torch.randn(3, 100) for _ in range(5)]
    lo, hi = _stream(build_observer("minmax"), chunks)
    full = torch.cat(chunks, dim=1)
    assert torch.equal(lo, full.amin(1)) and torch.equal(hi, full.amax(1))


def test_top_k_is_kth_largest_abs():
    chunks = [torch.randn(1, 1000) for _ in range(4)]
    lo, hi = _stream(build_observer("top_10"), chunks)
    kth = torch.cat(chunks, dim=1).abs().flatten().topk(10).values[-1]
    assert float(hi) == pytest.approx(float(kth)) and float(lo) == pytest.approx(-float(kth))


def test_sigma_is_mean_plus_k_std_clipped():
    torch.manual_seed(0)
    x = torch.randn(1, 100_000) * 2 + 1
    lo, hi = _stream(build_observer("sigma", k=3.0), [x[:, :50_000], x[:, 50_000:]])
    assert float(hi) == pytest.approx(1 + 3 * 2, rel=0.02)
    assert float(lo) == pytest.approx(1 - 3 * 2, rel=0.02)


def test_histogram_range_is_near_the_mse_optimum():
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((1, 100_000))
    from fxquant.fake_quant import dequantize_codes, qparams_from_range, quantize_codes

    def mse(t):
        s, z = qparams_from_range(torch.tensor([-t]), torch.tensor([t]), 8, True)
        return float(((dequantize_codes(quantize_codes(x, s, z, -128, 127), s, z) - x) ** 2).mean())

    amax = float(x.abs().max())
    best = min(mse(amax * f / 200) for f in range(1, 201))
    lo, hi = _stream(build_observer("histogram"), x.chunk(4, dim=1))
    assert mse(float(hi)) <= 1.05 * best
    assert mse(float(hi)) < mse(amax)  # strictly better than min-max on a heavy tail
    assert float(hi) < amax


def test_percentile_close_to_exact_quantile():
    torch.manual_seed(0)
    x = torch.randn(1, 200_000)
    lo, hi = _stream(build_observer("percentile", percentile=99.0, symmetric=False), x.chunk(5, dim=1))
    assert float(hi) == pytest.approx(float(x.quantile(0.99)), abs=0.05)
    assert float(lo) == pytest.approx(float(x.quantile(0.01)), abs=0.05)


def test_mixed_chooses_by_max_over_std():
    torch.manual_seed(0)
    gaussian = build_observer("mixed")
    gaussian.update(torch.randn(1, 10_000))
    assert gaussian.chosen() == "histogram"
    spiky = build_observer("mixed")
    x = torch.randn(1, 10_000)
    x[0, 0] = 500.0
    spiky.update(x)
    assert spiky.chosen() == "minmax"
    assert float(spiky.calc_range()[1]) == 500.0


def test_ema_follows_momentum():
    obs = build_observer("ema", momentum=0.5)
    obs.update(torch.tensor([[-1.0, 1.0]]))
    obs.update(torch.tensor([[-3.0, 3.0]]))
    lo, hi = obs.calc_range()
    assert float(hi) == 2.0 and float(lo) == -2.0
