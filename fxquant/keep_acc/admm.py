"""admm: alternating optimisation (ADMM) of a layer's weight codes and scales against its output
error on the calibration inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layer_problem import CodeKeeper, LayerProblem, input_columns


@dataclass
class ADMMWeights(CodeKeeper):
    """Minimise ||W X - Y||^2 over quantized W = s * codes with ADMM: a least-squares step for a
    continuous W, a projection onto the quantization grid (codes and per-channel scale refitted
    alternately), and a dual update; `iters` ADMM steps, penalty rho relative to mean(diag(X X^T))."""

    iters: int = 100
    rho: float = 0.1
    max_cols: int = 65536
    name = "admm"

    def solve(self, prob: LayerProblem) -> tuple[torch.Tensor, torch.Tensor]:
        wq = prob.weight_quantizer
        weight = prob.module.weight.detach().float()
        n = weight.shape[0]
        groups = getattr(prob.module, "groups", 1)
        x, y = input_columns(prob, self.max_cols, self.seed)
        h = x @ x.transpose(1, 2)  # [g, d, d]
        cross = y @ x.transpose(1, 2)  # [g, n/g, d]
        rho = self.rho * float(h.diagonal(dim1=1, dim2=2).mean().clamp(min=1e-12))
        eye = torch.eye(h.shape[-1]).expand_as(h)
        chol = torch.linalg.cholesky(h + rho * eye)
        per_channel = wq.scale.dim() > 0
        scale = wq.scale.float().reshape(-1).expand(n).clone()  # [n]

        def project(v: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            flat = v.reshape(n, -1)
            for _ in range(2):
                codes = torch.clamp(torch.round(flat / s[:, None]), wq.qmin, wq.qmax)
                num, den = (flat * codes).sum(1), (codes * codes).sum(1)
                if not per_channel:
                    num, den = num.sum().expand(n), den.sum().expand(n)
                s = torch.where(den > 0, num / den.clamp(min=1e-30), s).clamp(min=1e-12)
            codes = torch.clamp(torch.round(flat / s[:, None]), wq.qmin, wq.qmax)
            return codes, s

        codes, scale = project(weight, scale)
        z = (codes * scale[:, None]).reshape(groups, n // groups, -1)
        u = torch.zeros_like(z)
        for _ in range(self.iters):
            rhs = cross + rho * (z - u)  # [g, n/g, d]
            w = torch.cholesky_solve(rhs.transpose(1, 2), chol).transpose(1, 2)
            codes, scale = project((w + u).reshape(weight.shape), scale)
            z = (codes * scale[:, None]).reshape(groups, n // groups, -1)
            u = u + w - z
        scale = scale if per_channel else scale[:1]
        return codes.reshape(weight.shape), scale.reshape(wq.scale.shape)
