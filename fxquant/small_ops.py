"""Small-op modules: functional tensor ops given a name and a place to hold quantizers.

The functional_to_modules pass turns `x + y`, `torch.add`, `torch.bmm`, `torch.matmul` and `@`
(Python or aten spellings) into call_module nodes of these classes.
"""

from __future__ import annotations

import torch


class Add(torch.nn.Module):
    """x + y for two tensors of broadcastable shapes."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y


class BMM(torch.nn.Module):
    """torch.bmm(x [b, n, k], y [b, k, m]) -> [b, n, m]."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x, y)


class MatMul(torch.nn.Module):
    """torch.matmul(x, y) with its broadcasting rules."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, y)


SMALL_OP_TYPES = (Add, BMM, MatMul)
