"""A fast end-to-end estimate of how much int8 quantization of some Linear layers hurts a model.

Used to search smoothing exponents (FlexSmooth): instead of folding and calibrating once per
candidate, stand-in layers compute y = Q_a(x / s) @ Q_w(W * s)^T + b in integers, with
the static activation range taken from the float calibration statistics (min / max of x / s,
which is what min-max calibration would observe) or per-token ranges for dynamic schemes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from torch.utils._pytree import tree_leaves

from .calib_data import CalibBatch
from .fake_quant import qparams_from_range, quantize_codes
from .ir import replace_submodule
from .kernels import code_matmul
from .resources import release_freed_memory


def weight_codes(w: torch.Tensor, cols: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per-output-channel codes of w [n, k] (times cols [k] per column, when given):
    (int8 [n, k], float32 scale [n, 1]). One float temporary of w's size."""
    wf = w.detach().float() * cols if cols is not None else w.detach().float().clone()
    a = wf.abs().amax(dim=1, keepdim=True)
    scale, _ = qparams_from_range(-a, a, 8, True)
    return wf.div_(scale).round_().clamp_(-128, 127).to(torch.int8), scale


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per-output-channel fake quantization of w [n, k] (same dtype)."""
    codes, scale = weight_codes(w)
    return torch.mul(codes, scale).to(w.dtype)


def act_codes(x: torch.Tensor, mode: str, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """int8 codes of x [..., k] (float32 holding integers in [-128, 127]), their scale and zero
    point: mode "static" (asymmetric per tensor, range [lo, hi]; scale [1], zero point an int) or
    "dynamic" (symmetric per token; scale [..., 1], zero point 0)."""
    xf = x.float()
    if mode == "dynamic":  # zero point 0: round and clamp in place on one temporary
        a = torch.maximum(xf.amax(dim=-1, keepdim=True), -xf.amin(dim=-1, keepdim=True))
        scale, _ = qparams_from_range(-a, a, 8, True)
        return (xf / scale).round_().clamp_(-128, 127), scale, 0
    if mode != "static":
        raise ValueError(f"unknown activation mode {mode!r}; valid: static, dynamic, none")
    scale, zp = qparams_from_range(lo.reshape(1), hi.reshape(1), 8, False)
    return quantize_codes(xf, scale, zp, -128, 127), scale, int(zp)


def fake_quant_act(x: torch.Tensor, mode: str, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """int8 fake quantization of x [..., k]: mode "static" (asymmetric per tensor, range [lo, hi]),
    "dynamic" (symmetric per token) or "none" (x unchanged)."""
    if mode == "none":
        return x
    codes, scale, zp = act_codes(x, mode, lo, hi)
    return ((codes - zp) * scale if zp else codes.mul_(scale)).to(x.dtype)


class _FakeQuantLinear(torch.nn.Module):
    """y = Q_a(x / s) @ (codes * w_scale)^T + b for x [..., k]: a Linear's stand-in while QuantProxy
    scores. It keeps the int8 weight codes [n, k] (a quarter of the float weight) and multiplies
    them with the activation codes exactly on the device's integer kernel (fxquant.kernels;
    int8 GEMMs where the CPU has VNNI / AMX, exact fp32 otherwise), as the deployed layer does.

    Its buffers are allocated once and refilled in place by set_scale: a search allocates no
    long-lived tensors between forwards (they would fragment the heap; see release_freed_memory).
    """

    def __init__(self, linear: torch.nn.Linear, mode: str, lo: torch.Tensor, hi: torch.Tensor) -> None:
        super().__init__()
        n, k = linear.weight.shape
        self.linear, self.mode, self.lo, self.hi = linear, mode, lo, hi
        self.codes = torch.zeros(n, k, dtype=torch.int8, device=linear.weight.device)
        self.w_scale = torch.zeros(n, 1, device=linear.weight.device)
        self.inv_s = torch.ones(k, device=linear.weight.device)
        self.act_range = torch.zeros(2, device=linear.weight.device)

    @torch.no_grad()
    def set_scale(self, s: torch.Tensor | None) -> None:
        """Smooth with s [k] (None: 1): the input is x / s and the weight W * s, quantized."""
        s = torch.ones_like(self.lo) if s is None else s.to(self.lo.dtype)
        torch.reciprocal(s, out=self.inv_s)
        torch.stack([(self.lo / s).min(), (self.hi / s).max()], out=self.act_range)
        codes, scale = weight_codes(self.linear.weight, cols=s)
        self.codes.copy_(codes)
        self.w_scale.copy_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.inv_s.to(x.dtype)
        bias = self.linear.bias
        if self.mode == "none":
            return F.linear(x, torch.mul(self.codes, self.w_scale).to(x.dtype), bias)
        xc, x_scale, zp = act_codes(x, self.mode, self.act_range[0], self.act_range[1])
        acc = code_matmul(xc.reshape(-1, xc.shape[-1]), self.codes, zx=zp)
        y = acc.reshape(*x.shape[:-1], -1).mul_(x_scale).mul_(self.w_scale.reshape(-1))
        return (y if bias is None else y.add_(bias)).to(x.dtype)


class QuantProxy:
    """Scores per-layer smoothing scales by the model's output error under simulated int8.

    layers: {linear name: (activation mode, lo [k], hi [k])}, mode as in fake_quant_act and lo/hi
    the float input's per-channel range. samples: the batches to score on. score(scales) with scales
    {linear name: s [k]} gives, with metric "mse", sum ||y_q - y||^2 / sum ||y||^2 over the model's
    float outputs; with "kl", the mean KL(softmax(logits) || softmax(logits_q)) per token, for
    models whose output has `logits` [..., vocab] (it tracks perplexity; "auto" picks it then).

    While scoring, each layer is swapped for a stand-in that computes only the quantized product
    (never the float one too). A layer's int8 weight codes are kept while score() is passed the
    same scale tensor object for it, so a search that varies one group of layers at a time
    re-quantizes only that group's weights.
    """

    def __init__(self, gm: fx.GraphModule, layers: Mapping[str, tuple[str, torch.Tensor, torch.Tensor]],
                 samples: Sequence[CalibBatch], metric: str = "auto") -> None:
        if metric not in ("auto", "mse", "kl"):
            raise ValueError(f"unknown proxy metric {metric!r}; valid: auto, mse, kl")
        self.gm, self.layers, self.samples = gm, dict(layers), list(samples)
        self.metric = metric
        self._stand_ins = {name: _FakeQuantLinear(gm.get_submodule(name), mode, lo, hi)
                           for name, (mode, lo, hi) in self.layers.items()}  # before any forward
        self._scale_set: dict[str, torch.Tensor | None] = {}  # the scale each stand-in holds
        #: per sample: "kl": log_softmax(logits) [..., vocab]; "mse": the float outputs
        self.reference: list[Any] = []
        with torch.no_grad():
            for args, kwargs in self.samples:
                out = gm(*args, **kwargs)
                if self.metric == "auto":
                    self.metric = "kl" if getattr(out, "logits", None) is not None else "mse"
                if self.metric == "kl":
                    self.reference.append(torch.log_softmax(out.logits.float(), dim=-1))
                else:
                    self.reference.append(self._floats(out))

    @staticmethod
    def _floats(out: Any) -> list[torch.Tensor]:
        return [t.float() for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]

    def _stand_in(self, name: str, mod: torch.nn.Module, s: torch.Tensor | None) -> _FakeQuantLinear:
        stand_in = self._stand_ins[name]
        if stand_in.linear is not mod:
            raise RuntimeError(f"layer {name!r} was replaced while QuantProxy was scoring it")
        if name not in self._scale_set or self._scale_set[name] is not s:
            stand_in.set_scale(s)
            self._scale_set[name] = s
        return stand_in

    @torch.no_grad()
    def score(self, scales: Mapping[str, torch.Tensor]) -> float:
        """Relative squared output error (or KL) with `scales` folded and the layers fake-quantized."""
        originals = {name: self.gm.get_submodule(name) for name in self.layers}
        try:
            for name, mod in originals.items():
                replace_submodule(self.gm, name, self._stand_in(name, mod, scales.get(name)))
            err = ref = 0.0
            for (args, kwargs), reference in zip(self.samples, self.reference):
                out = self.gm(*args, **kwargs)
                if self.metric == "kl":
                    err += _kl_sum(reference, out.logits)
                    ref += float(reference[..., 0].numel())
                else:
                    for q, r in zip(self._floats(out), reference):
                        err += float(((q - r) ** 2).sum())
                        ref += float((r**2).sum())
                del out
                release_freed_memory()
        finally:
            for name, mod in originals.items():
                replace_submodule(self.gm, name, mod)
        return err / max(ref, 1e-30)


def _kl_sum(log_p: torch.Tensor, logits: torch.Tensor, rows: int = 64) -> float:
    """sum over tokens of KL(p || softmax(logits)) for log_p, logits [..., vocab], `rows` tokens at
    a time (temporaries of rows x vocab, not of the whole output). The difference log p - log q is
    formed first, so the sum does not cancel two large numbers."""
    log_p, logits = log_p.reshape(-1, log_p.shape[-1]), logits.reshape(-1, logits.shape[-1])
    total = 0.0
    for start in range(0, log_p.shape[0], rows):
        lp = log_p[start:start + rows]
        diff = torch.log_softmax(logits[start:start + rows].float(), dim=-1).neg_().add_(lp)
        total += float((lp.exp() * diff).sum())
    return total
