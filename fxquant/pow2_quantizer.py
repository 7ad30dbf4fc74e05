"""Power-of-two quantizers that keep learning in training mode (linger's MOM and TQT).

Both are static per-tensor symmetric quantizers whose step is a power of two chosen the way linger
chooses it: for a threshold T (the largest magnitude kept),

    n = clamp(floor(bits - 1 - log2 T + 1/2), 0, 23),   step = 2^-n,
    codes = clamp(floor(x / step + 1/2), qmin, qmax)    (rounding from the spec, floor_add in linger).

Calibration sets T from the observer's range (abs_max: max |x|; top_10: the 10th largest |x|).
In eval mode both are fixed; in training mode (model.train()):

- MOM (`MomentumPow2Quantizer`): T is a running max |x| with momentum 0.1, updated every step;
- TQT (`LearnedPow2Quantizer`): log2 T is a parameter trained by the optimizer (gradients reach it
  through the step, straight through the roundings).
"""

from __future__ import annotations

import math

import torch

from .errors import ConfigError
from .fake_quant import round_ste
from .quantizer import QuantSpec, StaticQuantizer

#: linger's QAT methods, as QuantSpec.qat values
QAT_METHODS = ("mom", "tqt")
MAX_SHIFT = 23  # linger keeps n in [0, 23]: the step is at most 1
MOMENTUM = 0.1


def pow2_shift(threshold: torch.Tensor, bits: int) -> torch.Tensor:
    """n (float tensor, integer-valued, gradient straight through the rounding) with step 2^-n for
    a threshold T > 0: clamp(floor(bits - 1 - log2 T + 1/2), 0, 23)."""
    return torch.clamp(round_ste(bits - 1 - torch.log2(threshold), "floor_add"), 0, MAX_SHIFT)


class _Pow2Quantizer(StaticQuantizer):
    """Shared part: per-tensor, symmetric, signed; the step from a threshold."""

    def __init__(self, spec: QuantSpec) -> None:
        if spec.granularity != "tensor" or not spec.symmetric or not spec.signed:
            raise ConfigError(f"{type(self).__name__} is per-tensor symmetric signed (linger supports only that); "
                              f"got per-{spec.granularity}, symmetric={spec.symmetric}, signed={spec.signed}")
        super().__init__(spec)

    def _threshold_from_observer(self) -> torch.Tensor:
        lo, hi = self.observer.calc_range()
        return torch.clamp(torch.maximum(lo.abs(), hi.abs()).max().float(), min=1e-6)

    def _set_step(self, threshold: torch.Tensor) -> None:
        n = pow2_shift(threshold.detach(), self.spec.bits)
        self.scale = torch.exp2(-n).reshape(()).to(self.scale.device)
        self.zero_point = torch.zeros((), device=self.scale.device)
        self.calibrated = True

    def quantize(self, x: torch.Tensor):
        if not self.calibrated:
            raise RuntimeError("quantizer used before calibration: call the model inside "
                               "`with fxquant.linger.calibration():` first")
        step = self._step(x)
        codes = torch.clamp(round_ste(x.float() / step, self.spec.rounding), self.qmin, self.qmax)
        return codes, step, torch.zeros_like(step)

    def _step(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale


class MomentumPow2Quantizer(_Pow2Quantizer):
    """MOM: in training mode the threshold follows max |x| with momentum 0.1 (buffer `running_max`)."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__(spec)
        self.register_buffer("running_max", torch.ones(()))

    def calc_qparams(self, like: torch.Tensor | None = None) -> None:
        self.running_max = self._threshold_from_observer().to(self.running_max.device)
        self._set_step(self.running_max)

    def _step(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.enabled:
            with torch.no_grad():
                seen = torch.clamp(x.detach().abs().max().float(), min=1e-6)
                self.running_max = (1 - MOMENTUM) * self.running_max + MOMENTUM * seen
                self._set_step(self.running_max)
        return self.scale


class LearnedPow2Quantizer(_Pow2Quantizer):
    """TQT: log2 of the threshold is a trained parameter (`log2_threshold`); the step, and the
    gradient of the fake-quantized output with respect to it, follow from it in training mode."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__(spec)
        self.log2_threshold = torch.nn.Parameter(torch.zeros(()))

    def calc_qparams(self, like: torch.Tensor | None = None) -> None:
        with torch.no_grad():
            self.log2_threshold.fill_(math.log2(float(self._threshold_from_observer())))
        self._set_step(torch.exp2(self.log2_threshold.detach()))

    def _step(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.enabled:
            n = torch.clamp(round_ste(self.spec.bits - 1 - self.log2_threshold, "floor_add"), 0, MAX_SHIFT)
            step = torch.exp2(-n)
            self.scale = step.detach().reshape(())
            return step
        return self.scale

    def extra_repr(self) -> str:
        return super().extra_repr() + f", log2 threshold {float(self.log2_threshold.detach()):.3f}"


QAT_QUANTIZERS = {"mom": MomentumPow2Quantizer, "tqt": LearnedPow2Quantizer}
