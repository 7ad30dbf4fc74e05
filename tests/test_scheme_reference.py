"""w8a8_dynamic pinned to its formula on a real model, in both grad modes.

The reference is written here from the definition, with no fxquant quantizer: per-token symmetric
int8 activations (scale = max|x_row| / 127, round half to even), per-output-channel symmetric int8
weights (scale = max|W_row| / 127), exact integer accumulation, then the two scales.
"""

from __future__ import annotations

import pytest
import torch

import fxquant


def reference_dynamic_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., k], weight [n, k] (float32) -> [..., n] in float64. Codes are computed in float32,
    as a deployed kernel does (x / scale in the model's dtype); the products are summed exactly."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    sx = (x2.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-8)
    sw = weight.float().abs().amax(dim=1) / 127
    cx, cw = torch.round(x2 / sx).double(), torch.round(weight.float() / sw[:, None]).double()
    y = (cx @ cw.t()) * sw.double() * sx.double()
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], -1)


@pytest.mark.slow
def test_every_qlinear_of_smollm2_computes_the_per_token_formula(smollm2_graph, smollm2_windows):
    calib, evals = smollm2_windows
    q = fxquant.quantize(smollm2_graph, [[w[:, :64]] for w in calib[:2]], "w8a8_dynamic", progress=False)
    layers = {n: m for n, m in q.named_modules() if isinstance(m, fxquant.QLinear)}
    assert len(layers) == 210  # every Linear of the 30 blocks; lm_head stays float
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.__setitem__(n, a[0].detach()))
             for n, m in layers.items()]
    with torch.no_grad():
        q(input_ids=evals[0][:, :48], use_cache=False)
    for h in hooks:
        h.remove()
    worst = 0.0
    for name, layer in layers.items():
        x = inputs[name]
        ref = reference_dynamic_linear(x, layer.weight.detach(), layer.bias)
        with torch.no_grad():
            out_eval = layer(x)
        with torch.enable_grad():
            out_grad = layer(x.clone().requires_grad_(True))
        assert torch.equal(out_eval, out_grad.detach()), name  # one arithmetic in both modes
        err = float((out_eval.double() - ref).abs().max() / ref.abs().max())
        worst = max(worst, err)
    assert worst < 1e-6, worst  # float rounding of the final scaling only


def test_gradients_pass_straight_through_the_integer_accumulation():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 8)
    model = torch.nn.Sequential(lin, torch.nn.Linear(8, 2))
    x = torch.randn(4, 32, requires_grad=True)
    # fine-tuning keeps the float weight: gradients reach it through the integer accumulation
    q = fxquant.quantize(model, example_inputs=[torch.randn(4, 32)], scheme="w8a8_dynamic", progress=False,
                         keep_float_weight=True)
    q(x).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert lin.weight.grad is not None and float(lin.weight.grad.abs().sum()) > 0
    # the default frozen model holds int8 codes only; gradients still reach its inputs, same values
    frozen = fxquant.quantize(model, example_inputs=[torch.randn(4, 32)], scheme="w8a8_dynamic", progress=False)
    x2 = x.detach().clone().requires_grad_(True)
    assert torch.equal(frozen(x2), q(x).detach())
    frozen(x2).sum().backward()
    assert torch.allclose(x2.grad, x.grad)
