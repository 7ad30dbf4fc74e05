"""Rotations folded into weights: the tensor algebra HadamardRotation and OnlineHadamard share."""

from __future__ import annotations

import torch
from torch import fx

from .ir import fxq_meta, linear_from, module_of, replace_submodule


def block_right(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """w [n, k] @ blockdiag(r, ..., r), r [b, b] with b | k."""
    n, k = w.shape
    b = r.shape[0]
    return (w.reshape(n, k // b, b) @ r).reshape(n, k)


def rows_rotated(w: torch.Tensor, scale: torch.Tensor | None, r: torch.Tensor | None, out: torch.Tensor,
                 chunk: int = 8192) -> None:
    """out [n, k] = (w diag(scale)) blockdiag(r), `chunk` rows at a time (out may be w itself): a large
    table (the head, the embedding) needs no whole-size float temporaries."""
    for i in range(0, w.shape[0], chunk):
        rows = w[i:i + chunk].float()
        if scale is not None:
            rows = rows * scale.float()[None, :]
        if r is not None:
            rows = block_right(rows, r.float())
        out[i:i + chunk].copy_(rows)


def block_left_t(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """blockdiag(r, ..., r)^T @ w, w [n, k], r [b, b] with b | n."""
    n, k = w.shape
    b = r.shape[0]
    return (r.T @ w.reshape(n // b, b, k)).reshape(n, k)


def rotate_linear(gm: fx.GraphModule, mutable: set[int], node: fx.Node, what: str, *,
                  input_scale: torch.Tensor | None = None, inputs: torch.Tensor | None = None,
                  outputs: torch.Tensor | None = None) -> None:
    """The Linear at `node` with W [n, k] replaced by blockdiag(outputs)^T (W diag(input_scale))
    blockdiag(inputs) and bias b [n] by b blockdiag(outputs): it reads its input rotated by
    `inputs` (with the norm weight input_scale [k] folded in) and gives its output rotated by
    `outputs`. In place when its tensors are the model's own (handed over), else a new Linear."""
    lin = module_of(gm, node)
    w = lin.weight.detach()
    in_place = w.data_ptr() in mutable and (lin.bias is None or lin.bias.data_ptr() in mutable)
    out = w if in_place else torch.empty_like(w, requires_grad=False)
    rows_rotated(w, input_scale, inputs, out)
    if outputs is not None:  # mixes rows: whole (the writers are d x k)
        out.copy_(block_left_t(out.float(), outputs.float()))
    b = None if lin.bias is None else lin.bias.detach()
    if b is not None and outputs is not None:  # b blockdiag(outputs): a one-row block_right
        rotated = block_right(b.float()[None, :], outputs.float())[0].to(b.dtype)
        b = b.copy_(rotated) if in_place else rotated
    if not in_place:
        new = linear_from(out, None if b is None else b.clone())
        mutable.update(p.data_ptr() for p in new.parameters())  # ours now: later transforms go in place
        replace_submodule(gm, node.target, new)
    fxq_meta(node).setdefault("rotation", []).append(what)
