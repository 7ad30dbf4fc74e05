"""GPTQWeights' blocked solver against the textbook column-by-column GPTQ, written here from the
formula (H = X X^T + damp, columns by decreasing diag H, upper Cholesky factor of H^-1)."""

import pytest
import torch

import fxquant
from fxquant.keep_acc import GPTQWeights
from fxquant.keep_acc.gptq import column_qparams
from fxquant.keep_acc.layer_problem import LayerProblem, input_columns


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


@pytest.mark.parametrize("scheme, options", [("w8a8", None), ("w4a16", fxquant.SchemeOptions(group_size=16))])
def test_blocked_gptq_equals_the_textbook_algorithm_and_reuses_a_shared_input(scheme, options):
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
