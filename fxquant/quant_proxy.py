"""A fast end-to-end estimate of how much int8 quantization of some Linear layers hurts a model.

Used to search smoothing exponents (FlexSmooth): instead of folding and calibrating once per
candidate, forward hooks replace each layer's output by y = Q_a(x / s) @ Q_w(W * s)^T + b, with
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
from .fake_quant import dequantize_codes, qparams_from_range, quantize_codes


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per-output-channel fake quantization of w [n, k]."""
    a = w.detach().float().abs().amax(dim=1, keepdim=True)
    scale, zp = qparams_from_range(-a, a, 8, True)
    return dequantize_codes(quantize_codes(w.float(), scale, zp, -128, 127), scale, zp).to(w.dtype)


def fake_quant_act(x: torch.Tensor, mode: str, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """int8 fake quantization of x [..., k]: mode "static" (asymmetric per tensor, range [lo, hi]),
    "dynamic" (symmetric per token) or "none" (x unchanged)."""
    if mode == "none":
        return x
    xf = x.float()
    if mode == "dynamic":
        a = xf.abs().amax(dim=-1, keepdim=True)
        scale, zp = qparams_from_range(-a, a, 8, True)
    else:
        scale, zp = qparams_from_range(lo.reshape(1), hi.reshape(1), 8, False)
    return dequantize_codes(quantize_codes(xf, scale, zp, -128, 127), scale, zp).to(x.dtype)


class QuantProxy:
    """Scores per-layer smoothing scales by the model's output error under simulated int8.

    layers: {linear name: (activation mode, lo [k], hi [k])}, mode as in fake_quant_act and lo/hi
    the float input's per-channel range. samples: the batches to score on. score(scales) with scales
    {linear name: s [k]} gives, with metric "mse", sum ||y_q - y||^2 / sum ||y||^2 over the model's
    float outputs; with "kl", the mean KL(softmax(logits) || softmax(logits_q)) per token, for
    models whose output has `logits` [..., vocab] (it tracks perplexity; "auto" picks it then).
    """

    def __init__(self, gm: fx.GraphModule, layers: Mapping[str, tuple[str, torch.Tensor, torch.Tensor]],
                 samples: Sequence[CalibBatch], metric: str = "auto") -> None:
        if metric not in ("auto", "mse", "kl"):
            raise ValueError(f"unknown proxy metric {metric!r}; valid: auto, mse, kl")
        self.gm, self.layers, self.samples = gm, dict(layers), list(samples)
        self.metric = metric
        with torch.no_grad():
            if metric == "auto":
                args, kwargs = self.samples[0]
                self.metric = "kl" if getattr(gm(*args, **kwargs), "logits", None) is not None else "mse"
            self.reference = [self._outputs(args, kwargs) for args, kwargs in self.samples]

    def _outputs(self, args: tuple, kwargs: dict[str, Any]) -> list[torch.Tensor]:
        out = self.gm(*args, **kwargs)
        if self.metric == "kl":
            return [torch.log_softmax(out.logits.float(), dim=-1)]
        return [t.float() for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]

    @torch.no_grad()
    def score(self, scales: Mapping[str, torch.Tensor]) -> float:
        """Relative squared output error with `scales` folded and the layers fake-quantized."""
        handles = []
        for name, (mode, lo, hi) in self.layers.items():
            mod = self.gm.get_submodule(name)
            s = scales.get(name)
            s = torch.ones_like(lo) if s is None else s.to(lo.dtype)
            w_q = fake_quant_weight(mod.weight * s)
            a_lo, a_hi = (lo / s).min(), (hi / s).max()

            def hook(m, args, out, s=s, w_q=w_q, mode=mode, a_lo=a_lo, a_hi=a_hi):
                x = fake_quant_act(args[0] / s.to(args[0].dtype), mode, a_lo, a_hi)
                return F.linear(x, w_q, m.bias)
            handles.append(mod.register_forward_hook(hook))
        try:
            err = ref = 0.0
            for (args, kwargs), reference in zip(self.samples, self.reference):
                for q, r in zip(self._outputs(args, kwargs), reference):
                    if self.metric == "kl":  # q, r: log-probabilities [..., vocab]
                        err += float((r.exp() * (r - q)).sum())
                        ref += float(r[..., 0].numel())
                    else:
                        err += float(((q - r) ** 2).sum())
                        ref += float((r**2).sum())
        finally:
            for h in handles:
                h.remove()
        return err / max(ref, 1e-30)
