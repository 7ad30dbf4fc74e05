"""Streaming statistics of one layer: its input's range and outliers, its quantized output's error.

Both accumulate over calibration batches (or debugger samples) without keeping the tensors, and
are what calibration records in node.meta["fxquant"] for fxquant.inspect and the HTML report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_leaves


@dataclass
class TensorStats:
    """min, max, mean and standard deviation of every element seen so far.

    Each add() reduces its tensor in float32 (pairwise, no copy of a float32 tensor) and the running
    sums are Python floats (float64), so statistics of many calls stay exact to ~1e-6.
    """

    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    lo: float = math.inf
    hi: float = -math.inf

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a floating tensor of any shape."""
        x = x.detach()
        if x.numel() == 0:
            return
        self.count += x.numel()
        self.total += float(x.sum(dtype=torch.float32))
        self.total_sq += float(torch.linalg.vector_norm(x, dtype=torch.float32)) ** 2
        lo, hi = torch.aminmax(x)
        self.lo = min(self.lo, float(lo))
        self.hi = max(self.hi, float(hi))

    def merge(self, other: TensorStats) -> TensorStats:
        """Statistics of both sets of elements."""
        return TensorStats(self.count + other.count, self.total + other.total, self.total_sq + other.total_sq,
                           min(self.lo, other.lo), max(self.hi, other.hi))

    @property
    def absmax(self) -> float:
        return max(abs(self.lo), abs(self.hi)) if self.count else 0.0

    @property
    def std(self) -> float:
        if not self.count:
            return 0.0
        mean = self.total / self.count
        return math.sqrt(max(self.total_sq / self.count - mean * mean, 0.0))

    @property
    def outlier_ratio(self) -> float:
        """max|x| / std: how far the largest element sits from the bulk (inf for a constant)."""
        std = self.std
        return self.absmax / std if std > 0 else math.inf

    def as_dict(self) -> dict[str, float]:
        return {"min": self.lo, "max": self.hi, "absmax": self.absmax, "std": self.std,
                "outlier_ratio": self.outlier_ratio}


@dataclass
class ErrorStats:
    """Error of an output against its reference: sums of ||out - ref||^2 and ||ref||^2."""

    err: float = 0.0
    ref: float = 0.0

    def add(self, out: Any, ref: Any) -> None:
        """Accumulate one (output, reference) pair of equally shaped floating tensors."""
        if not isinstance(out, torch.Tensor) or not isinstance(ref, torch.Tensor):
            return
        o, r = out.detach().double(), ref.detach().double().to(out.device)
        self.err += float(((o - r) ** 2).sum())
        self.ref += float((r * r).sum())

    @property
    def noise_to_signal(self) -> float:
        """sum ||out - ref||^2 / sum ||ref||^2."""
        return self.err / max(self.ref, 1e-30)

    @property
    def rel_error(self) -> float:
        """||out - ref|| / ||ref||."""
        return math.sqrt(self.noise_to_signal)

    @property
    def sqnr_db(self) -> float:
        """Signal-to-quantization-noise ratio, 10 log10(||ref||^2 / ||out - ref||^2); inf when exact."""
        if self.err == 0.0:
            return math.inf
        return 10.0 * math.log10(max(self.ref, 1e-30) / self.err)

    def as_dict(self) -> dict[str, float]:
        return {"sqnr_db": self.sqnr_db, "rel_error": self.rel_error}


def output_sample(out: Any, max_elements: int = 1 << 20) -> list[torch.Tensor | None]:
    """Every k-th element (k fixed by its size) of each floating tensor of a model output, at most
    `max_elements` each, as copies; None for other leaves. Two samples of equally structured
    outputs hold the same positions: enough for output_change to tell whether a fold changed the
    function, without keeping a model's logits (SmolLM2: 100 MB per 512 tokens) between forwards."""
    picked: list[torch.Tensor | None] = []
    for t in tree_leaves(out):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            flat = t.detach().reshape(-1)
            picked.append(flat[:: max(1, -(-flat.numel() // max_elements))].clone())
        else:
            picked.append(None)
    return picked


def precision_tolerance(output: Any, tolerance: float, ulps: float = 8.0) -> float:
    """`tolerance` for an output_change check of a float-preserving rewrite, raised to `ulps`
    machine epsilons of the output's least precise floating dtype: re-rounding every weight of a
    bfloat16 model (eps 2^-7) moved SmolLM2's logits by 1.7e-2 relative (30 layers, rotated)."""
    eps = [torch.finfo(t.dtype).eps for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return max([tolerance] + [ulps * e for e in eps])


def output_change(before: Any, after: Any) -> float:
    """max over the floating tensors of two equally structured outputs of ||after - before|| / ||before||
    (computed in the outputs' own precision, no float64 copies: logits are large)."""
    worst = 0.0
    for b, a in zip(tree_leaves(before), tree_leaves(after)):
        if isinstance(b, torch.Tensor) and b.is_floating_point():
            worst = max(worst, float(torch.dist(a, b) / b.norm().clamp(min=1e-30)))
    return worst
