"""GPTQWeights' blocked solver against the textbook column-by-column GPTQ, written here from the
formula (H = X X^T + damp, columns by decreasing diag H, upper Cholesky factor of H^-1)."""

import pytest
import torch

import fxquant
from fxquant.calibration import OutputsOfInputs
from fxquant.keep_acc import GPTQWeights, gptq
from fxquant.keep_acc.gptq import column_qparams
from fxquant.keep_acc.layer_problem import LayerProblem, input_columns
from fxquant.kernels import c_kernels
from fxquant.kernels.gptq_block import _native_gptq_block


def textbook_gptq(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, x: torch.Tensor, qmin: int, qmax: int,
                  damp: float = 0.01) -> torch.Tensor:
    """Codes [n, d] for weight w [n, d], per-element scale / zero point s, z [n, d], inputs x [d, N]."""
    h = x.double() @ x.double().t()
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    perm = torch.argsort(h.diagonal(), descending=True)
    w, s, z, h = w.double()[:, perm].clone(), s.double()[:, perm], z.double()[:, perm], h[perm][:, perm]
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    codes = torch.empty_like(w)
    for j in range(w.shape[1]):
        codes[:, j] = torch.clamp(torch.round(w[:, j] / s[:, j]) + z[:, j], qmin, qmax)
        e = (w[:, j] - (codes[:, j] - z[:, j]) * s[:, j]) / u[j, j]
        w[:, j + 1:] -= torch.outer(e, u[j, j + 1:])
    return codes[:, torch.argsort(perm)].float()


class TwoReaders(torch.nn.Module):
    """Two layers reading one activation, as q_proj and k_proj do."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(96, 80), torch.nn.Linear(96, 80)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


@pytest.mark.parametrize("kernel", ["C", "torch ops"])
@pytest.mark.parametrize("scheme, options", [("w8a8", None), ("w4a16", fxquant.SchemeOptions(group_size=16))])
def test_blocked_gptq_equals_the_textbook_algorithm_and_reuses_a_shared_input(scheme, options, kernel, monkeypatch):
    if kernel == "C":
        if c_kernels.compiler() is None:
            pytest.skip("no C compiler on this machine: the torch-op loop is what runs here")
        assert _native_gptq_block() is not None
    else:  # as where the C kernel does not build
        monkeypatch.setattr(gptq, "native_gptq_block", lambda *args: False)
    torch.manual_seed(0)
    model = TwoReaders().eval()
    mixing = torch.randn(12, 96) * torch.linspace(0.1, 8.0, 96)  # correlated, uneven channels
    xs = [torch.randn(64, 12) @ mixing + 0.05 * torch.randn(64, 96) for _ in range(4)]
    q = fxquant.quantize(model, [[x] for x in xs], scheme, options=options, progress=False, keep_float_weight=True,
                         disable_last_layer=False)
    keeper = GPTQWeights(block=32)  # several blocks: the deferred updates are exercised
    layers = [m for m in q.modules() if hasattr(m, "weight_quantizer")]
    assert len(layers) == 2
    solved = []
    for layer in layers:
        prob = LayerProblem.gather(layer, xs, [torch.zeros(64, 80)] * 4, max_rows=keeper.max_rows)
        codes, _ = keeper.solve(prob)
        x, _ = input_columns(prob, keeper.max_rows, keeper.seed)
        s, z = column_qparams(prob, 96)
        wq = prob.weight_quantizer
        reference = textbook_gptq(layer.weight.detach().float(), s, z, x[0], wq.qmin, wq.qmax)
        assert (codes == reference).float().mean() >= 0.995  # float rounding may flip a rare tie
        assert (codes != prob.rtn_codes()).float().mean() >= 0.2  # the compensation is at work
        assert codes.min() >= wq.qmin and codes.max() <= wq.qmax
        solved.append(keeper._last_inverse)
    assert solved[1] is solved[0]  # the second layer's equal input reused the first one's H^-1


@pytest.mark.skipif(c_kernels.compiler() is None, reason="no C compiler on this machine")
@pytest.mark.parametrize("half_even", [True, False])
@pytest.mark.parametrize("qparams", ["per channel, symmetric", "per element, zero points"])
def test_the_c_block_kernel_takes_the_torch_op_loops_steps(qparams, half_even):
    torch.manual_seed(0)
    b, n = 48, 200  # n not a multiple of the kernel's run of 64 channels
    w = torch.randn(b, n, dtype=torch.float64)
    h_rows = torch.randn(b, b, dtype=torch.float64).triu(1) * 0.3 + torch.eye(b, dtype=torch.float64)
    if qparams == "per channel, symmetric":
        s, z, zs, qmin, qmax = torch.rand(n, dtype=torch.float64).add(0.05).expand(b, n), None, None, -128, 127
    else:
        s = torch.rand(b, n, dtype=torch.float64).add(0.05) * 0.2
        z = torch.randint(0, 16, (b, n)).double()
        zs, qmin, qmax = z * s, 0, 15
    results = []
    for run in (gptq.native_gptq_block, gptq._torch_block):
        wb, codes, err = w.clone(), torch.empty(b, n, dtype=torch.float64), torch.empty(b, n, dtype=torch.float64)
        assert run(wb, h_rows, s, z, zs, qmin, qmax, half_even, codes, err) is not False
        results.append((wb, codes, err))
    (w_c, codes_c, err_c), (w_t, codes_t, err_t) = results
    assert codes_c.min() >= qmin and codes_c.max() <= qmax and (codes_c > qmin).any() and (codes_c < qmax).any()
    assert torch.equal(codes_c, codes_t)
    torch.testing.assert_close(err_c, err_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w_c, w_t, rtol=1e-12, atol=1e-12)


def _w4a16_two_readers(xs: list[torch.Tensor]) -> torch.nn.Module:
    return fxquant.quantize(TwoReaders().eval(), [[x] for x in xs], "w4a16", options=fxquant.SchemeOptions(group_size=16),
                            progress=False, keep_float_weight=True, disable_last_layer=False)


def test_gptq_measures_a_weight_only_layers_output_error_through_its_hessian():
    torch.manual_seed(0)
    xs = [torch.randn(64, 96) * torch.linspace(0.1, 8.0, 96) for _ in range(4)]
    layer = next(m for m in _w4a16_two_readers(xs).modules() if hasattr(m, "weight_quantizer"))
    with torch.no_grad():
        layer.set_quant(False, False)  # the float layer, as calibration runs it for the targets
        targets = OutputsOfInputs(layer(x) for x in xs)
    keeper = GPTQWeights(block=32)
    prob = LayerProblem.gather(layer, xs, targets, max_rows=keeper.max_rows)
    assert prob.y_of_x and not prob.input_static
    codes, _ = keeper.solve(prob)
    for c in (codes, prob.rtn_codes()):  # ||(deq(c) - W) X||^2 on every row, by forwards and through H
        assert keeper.gram_error(prob, c) == pytest.approx(prob.error_with(c), rel=1e-4)
    assert keeper.gram_error(prob, codes) < keeper.gram_error(prob, prob.rtn_codes())
    assert not torch.equal(prob.current_codes().reshape(codes.shape).float(), codes)
    keeper.keep_if_better(prob, codes, None)
    assert torch.equal(prob.current_codes().reshape(codes.shape).float(), codes)
    assert not LayerProblem.gather(layer, xs, list(targets)).y_of_x  # a plain list: y on other inputs


@pytest.mark.parametrize("asym", [False, True])
def test_calibration_says_when_targets_are_the_outputs_of_the_inputs(asym):
    seen = []
    xs = [torch.randn(16, 96) for _ in range(2)]
    fxquant.quantize(TwoReaders().eval(), [[x] for x in xs], "w8a8", progress=False, asym=asym, disable_last_layer=False,
                     weight_optimizers=[lambda module, inputs, targets: seen.append(type(targets))])
    assert seen == ([list] if asym else [OutputsOfInputs]) * 2, seen


@pytest.mark.parametrize("d, n", [(37, 5000), (64, 300)])
def test_gram_in_chunks_equals_the_float64_product(d, n):
    from fxquant.gram import gram

    torch.manual_seed(0)
    x = torch.randn(n, d).t() * torch.logspace(-2, 3, d)[:, None]  # [d, N], not contiguous, uneven rows
    ref = x.double() @ x.double().t()
    h = gram(x, torch.float64, chunk=1024)
    assert h.dtype == torch.float64
    assert torch.allclose(h, ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))
    assert gram(x).dtype == torch.float32
