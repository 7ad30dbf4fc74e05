"""m4 iterative smooth: s = A^alpha / W^(1 - alpha) with alpha 0.9 by default."""

from __future__ import annotations

from dataclasses import dataclass

from .smooth_quant import SmoothQuant


@dataclass
class IterSmooth(SmoothQuant):
    """Pass (m4): SmoothQuant with alpha = 0.9 and beta = 1 - alpha.

    Iterating the smoothing step converges in one step: per channel, A * max|W| is invariant under
    x / s, W * s, and one step with beta = 1 - alpha already gives A' = (A * max|W|)^(1 - alpha),
    the fixed point. So the iteration is applied in closed form.
    """

    alpha: float = 0.9
    beta: float | None = None
