"""gptq: error-compensating weight rounding (GPTQ) against the layer's quantized calibration inputs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fxquant.gram import error_through_gram, gram
from fxquant.kernels.gptq_block import native_gptq_block
from fxquant.quant_linear import QLinear

from .layer_problem import CodeKeeper, LayerProblem, input_columns


@dataclass
class GPTQWeights(CodeKeeper):
    """Round the weight one input column at a time, moving each column's rounding error onto the
    columns not yet rounded through the inverse Hessian H = X X^T of the layer's (quantized) inputs
    X [d, N], so that ||W X - deq(codes) X||^2 stays small. The weight's qparams are the calibrated
    ones (per tensor, channel, or per group of input columns: w4a16's static groups, so columns can
    be taken in any order); columns are taken in order of decreasing H diagonal (act_order),
    `block` at a time, with `damp` * mean(diag H) added to the diagonal. Kept only when the layer's
    output error drops: measured as tr(dW H dW^T) = ||dW X||^2 (dW: the dequantized weight minus
    the float one) on all of X's rows when the targets are the float layer's outputs on X itself
    (float inputs: weight-only or dynamic layers), else by two forwards (CodeKeeper)."""

    damp: float = 0.01
    block: int = 128
    act_order: bool = True
    max_rows: int = field(default=16384, kw_only=True)
    # (x, _inverse_hessian(x)) of the last layer solved: the next layer may read the same input
    _last_inverse: tuple | None = field(default=None, init=False, repr=False, compare=False)
    # H = X X^T [d, d] float64 (undamped) of the last layer solved
    _last_gram: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    name = "gptq"
    handles_groups = True

    def solve(self, prob: LayerProblem) -> tuple[torch.Tensor, None]:
        """(integer codes, the weight's shape; None: the calibrated qparams stay)."""
        weight = prob.module.weight.detach().float()
        n = weight.shape[0]
        groups = getattr(prob.module, "groups", 1)
        x, _ = input_columns(prob, max_cols=self.max_rows, seed=self.seed, with_outputs=False)  # [g, d, N]
        w = weight.reshape(groups, n // groups, -1)
        scale, zero = column_qparams(prob, w.shape[-1])
        s, z = scale.reshape(w.shape), zero.reshape(w.shape)
        codes = torch.stack([self._solve_group(w[g], s[g], z[g], x[g], prob) for g in range(groups)])
        return codes.reshape(weight.shape), None

    def keep_if_better(self, prob: LayerProblem, codes: torch.Tensor, scale: torch.Tensor | None) -> None:
        """Keep `codes` if ||(deq(codes) - W) X||^2 = tr(dW H dW^T) is below the current codes'
        (one [n, d] x [d, d] product each, over every row solve saw), where that is the layer's
        output error: a Linear whose targets are its float outputs on its unquantized inputs X."""
        if not (scale is None and prob.y_of_x and not prob.input_static and isinstance(prob.module, QLinear)):
            super().keep_if_better(prob, codes, scale)
            return
        before, after = (self.gram_error(prob, c) for c in (prob.current_codes(), codes))
        prob.keep_if_lower(self.name, codes, None, before, after)

    def gram_error(self, prob: LayerProblem, codes: torch.Tensor) -> float:
        """tr(dW H dW^T) = ||dW X||^2 for dW = deq(codes) - W [n, d] and H = X X^T of the last
        layer solved (prob's, on the inputs X it saw)."""
        dw = prob.dequantized_weight(codes).double() - prob.module.weight.detach().double()
        return error_through_gram(dw, self._last_gram)

    def _solve_group(self, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, x: torch.Tensor,
                     prob: LayerProblem) -> torch.Tensor:
        """w [n, d] float32, s / z [n, d] the scale and zero point of each weight (views with stride
        0 along d where they are per output channel), x [d, N] float32 -> codes [n, d]
        (integer-valued floats).

        The columns are worked on as the rows of W^T [d, n] (contiguous, so each step is a few
        in-place vector ops on one row), in float64; codes are clamp(round(w / s) + z) as
        quantize_codes computes them. A column's rounding error goes onto the block's later
        columns with the rows of H^-1's factor divided by their diagonal once per block, and onto
        the columns after the block in one GEMM."""
        wq = prob.weight_quantizer
        dead, perm, hinv = self._inverse_hessian(x)
        wt = _rows_in_order(w, perm)  # [d, n] float64
        wt[dead[perm]] = 0.0
        per_channel = s.stride(1) == 0 and z.stride(1) == 0  # one scale / zero point per row of w
        if per_channel:  # the same vectors for every column
            s_n, z_n = s[:, 0].double().contiguous(), z[:, 0].double().contiguous()
            st, zt, zst = (v.expand(wt.shape) for v in (s_n, z_n, s_n * z_n))
        else:
            st, zt = _rows_in_order(s, perm), _rows_in_order(z, perm)
            zst = st * zt
        symmetric = bool((z == 0).all())
        codes = torch.empty_like(wt)
        d, half_even = wt.shape[0], wq.spec.rounding == "half_even"  # else floor_add: floor(v + 0.5)
        for start in range(0, d, self.block):
            end = min(start + self.block, d)
            wb, hb = wt[start:end], hinv[start:end, start:end]
            diag = hb.diagonal().clone()
            h_rows = (hb / diag[:, None]).contiguous()  # row i: H^-1 factor's row over its diagonal
            err = torch.empty_like(wb)
            sb, zb, zsb = st[start:end], *((None, None) if symmetric else (zt[start:end], zst[start:end]))
            block_args = (wb, h_rows, sb, zb, zsb, wq.qmin, wq.qmax, half_even, codes[start:end], err)
            if not native_gptq_block(*block_args):
                _torch_block(*block_args)
            if end < d:
                err.div_(diag[:, None])
                wt[end:].addmm_(hinv[start:end, end:].t(), err, alpha=-1.0)  # and onto the columns after it
        return codes.index_select(0, torch.argsort(perm)).t().float()

    def _inverse_hessian(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dead columns [d] bool, column order [d], upper Cholesky factor of H^-1 in that order
        [d, d] float64) for inputs x [d, N].

        H = X X^T is accumulated in float64: massive activations (|x| ~ 1e3 over 1e4 rows) lose
        enough precision in float32 to move SmolLM2's perplexity by 0.2%. Layers that read the same
        activation (q / k / v, gate / up) have equal quantized inputs: the last result is reused
        when x equals the last x."""
        last = self._last_inverse
        if last is not None and last[0].shape == x.shape and torch.equal(last[0], x):
            return last[1]
        h = gram(x, torch.float64)
        self._last_gram = h  # kept undamped; the damped diagonal goes into the permuted copy below
        diag = h.diagonal().clone()
        dead = diag == 0  # a column that is zero in every row: its row and column of H are zero
        diag[dead] = 1.0
        diag += self.damp * float(diag.mean())
        perm = torch.argsort(diag, descending=True) if self.act_order else torch.arange(h.shape[0])
        # the upper Cholesky factor U of H^-1 (U^T U = H^-1) without forming H^-1: with J the
        # reversal, J H J = L L^T gives H = M M^T for the upper M = J L J, so U = M^-1 = J L^-1 J
        reverse = perm.flip(0)
        h_reversed = h[reverse[:, None], reverse]  # one gather, H's rows and columns in reverse order
        h_reversed.diagonal().copy_(diag[reverse])
        lower = torch.linalg.cholesky(h_reversed)
        del h_reversed
        inverse = torch.linalg.solve_triangular(lower, torch.eye(h.shape[0], dtype=h.dtype), upper=False)
        del lower
        hinv = inverse.flip(0, 1)
        self._last_inverse = (x, (dead, perm, hinv))
        return dead, perm, hinv


def _torch_block(w: torch.Tensor, h_rows: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None,
                 zs: torch.Tensor | None, qmin: int, qmax: int, half_even: bool, codes: torch.Tensor,
                 err: torch.Tensor) -> None:
    """kernels.gptq_block.native_gptq_block's steps (same arguments) as torch ops, one row of the
    block w [b, n] at a time: for where the C kernel does not build."""
    qparams = (s, s, s) if z is None else (s, z, zs)  # z / zs are not read when symmetric
    rows = zip(w.unbind(0), codes.unbind(0), err.unbind(0), h_rows.unbind(0), *(t.unbind(0) for t in qparams))
    for i, (w_i, q, e, h_i, s_i, z_i, zs_i) in enumerate(rows):
        torch.div(w_i, s_i, out=q)  # quantize_codes and dequantize_codes, in place
        if half_even:
            q.round_()
        else:
            q.add_(0.5).floor_()
        if z is not None:
            q.add_(z_i)
        q.clamp_(qmin, qmax)
        torch.addcmul(w_i, q, s_i, value=-1.0, out=e)  # w - (q - z) s = w - q s + z s
        if z is not None:
            e.add_(zs_i)
        if i + 1 < w.shape[0]:
            w[i + 1:].addr_(h_i[i + 1:], e, alpha=-1.0)  # onto the block's later columns


def _rows_in_order(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """t [n, d] -> float64 [d, n], row j = column perm[j] of t (a transpose, then a row gather)."""
    return t.t().contiguous().index_select(0, perm).double()


def column_qparams(prob: LayerProblem, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) of every weight element as [n, d] float32 (d: the columns of one conv
    group): per-group qparams repeated over their group's columns, per-channel / per-tensor ones
    expanded over all columns (views with stride 0 along d; zero point 0: those weights are
    symmetric)."""
    wq = prob.weight_quantizer
    n = prob.module.weight.shape[0]
    if prob.grouped:
        g = wq.spec.group_size
        return (wq.scale.float().repeat_interleave(g, dim=1), wq.zero_point.float().repeat_interleave(g, dim=1))
    scale = prob.weight_scale().float().reshape(-1).expand(n)
    return scale[:, None].expand(n, d), torch.zeros(n, 1).expand(n, d)
