"""w8a8_timestep: activation quantization that depends on the diffusion sampling step.

Steps before `timestep_sep` quantize activations per token at run time (dynamic); later steps use
a static per-tensor range calibrated for that step. The caller's sampling loop says which step
runs with `set_timestep(model, i)`; calibration samples recorded in that loop (keyword-input
dicts) carry the model's `timestep` input, whose distinct values, in decreasing order (denoising
runs from high to low noise), give each sample's step index.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .calib_data import CalibBatch
from .errors import CalibrationDataError
from .quantizer import DynamicQuantizer, Quantizer, QuantSpec, StaticQuantizer


class TimestepQuantizer(Quantizer):
    """Per-step activation quantizer. `step` (int) selects per-token dynamic quantization (step <
    spec.timestep_sep) or the static per-tensor quantizer of that step (`per_step[step]`, with
    scalar scale / zero_point). `scale` / `zero_point` stack every step's qparams: float32 [T]."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__(spec)
        self.step: int | None = None
        self.dynamic = DynamicQuantizer(QuantSpec(bits=spec.bits, symmetric=True, granularity="token",
                                                  rounding=spec.rounding))
        self.static_spec = spec.with_(timestep_sep=None)
        self.per_step = torch.nn.ModuleList()

    @property
    def num_steps(self) -> int:
        return len(self.per_step)

    def current(self) -> Quantizer:
        """The quantizer serving the current step (enabled like this one)."""
        if self.step is None:
            raise RuntimeError("w8a8_timestep model called without a step: call "
                               "fxquant.set_timestep(model, step) in the sampling loop")
        if self.step < self.spec.timestep_sep:
            q: Quantizer = self.dynamic
        elif self.step < self.num_steps and self.per_step[self.step].calibrated:
            q = self.per_step[self.step]
        else:
            raise RuntimeError(f"step {self.step} was not calibrated (calibrated steps: 0..{self.num_steps - 1})")
        q.enabled = self.enabled
        return q

    def observe(self, x: torch.Tensor) -> None:
        """Feed x to the observer of the current step."""
        if self.step is None:
            raise RuntimeError("TimestepQuantizer.observe needs `step` set")
        while self.num_steps <= self.step:
            self.per_step.append(StaticQuantizer(self.static_spec))
        self.per_step[self.step].observe(x)

    def calc_qparams(self) -> None:
        """Set every step's qparams; error if a step between 0 and the last was never observed."""
        missing = [i for i, q in enumerate(self.per_step) if q.observer is None or q.observer.num_updates == 0]
        if missing:
            raise CalibrationDataError(f"w8a8_timestep: no calibration sample for steps {missing}")
        for q in self.per_step:
            q.calc_qparams()

    def reset_observer(self) -> None:
        self.per_step = torch.nn.ModuleList()

    def freeze(self) -> None:
        for q in self.per_step:
            q.freeze()

    @property
    def calibrated(self) -> bool:
        return self.num_steps > 0 and all(q.calibrated for q in self.per_step)

    @property
    def scale(self) -> torch.Tensor:
        return torch.stack([q.scale.reshape(()) for q in self.per_step])

    @property
    def zero_point(self) -> torch.Tensor:
        return torch.stack([q.zero_point.reshape(()) for q in self.per_step])

    def quantize(self, x: torch.Tensor):
        return self.current().quantize(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return self.current()(x)

    def extra_repr(self) -> str:
        return f"int{self.spec.bits}, dynamic before step {self.spec.timestep_sep}, {self.num_steps} steps"


def set_timestep(model: torch.nn.Module, step: int) -> None:
    """Tell every TimestepQuantizer of `model` which sampling step (0-based) runs next."""
    for m in model.modules():
        if isinstance(m, TimestepQuantizer):
            m.step = int(step)


def step_indices(batches: Sequence[CalibBatch], key: str = "timestep") -> list[int]:
    """Each calibration sample's step: rank of its `key` input among the distinct values, high first."""
    values = []
    for b, (_, kwargs) in enumerate(batches):
        if key not in kwargs:
            raise CalibrationDataError(
                f"w8a8_timestep calibration: calib_data[{b}] has no {key!r} keyword input; record the "
                "model's keyword inputs in the sampling loop (one dict per call)")
        t = kwargs[key]
        values.append(float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t))
    order = sorted(set(values), reverse=True)
    return [order.index(v) for v in values]
