"""Fake quantizers: one tensor's integer grid, its qparams, and the straight-through fake-quant forward.

`StaticQuantizer` learns its qparams from an observer (weights, static activations);
`DynamicQuantizer` computes them per token at run time; `IdentityQuantizer` leaves a tensor alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .errors import ConfigError
from .fake_quant import (
    MIN_SCALE,
    ROUNDING_MODES,
    dequantize_codes,
    qparams_from_range,
    qrange,
    quantize_codes,
    round_ste,
)
from .observers import build_observer

GRANULARITIES = ("tensor", "channel", "token", "group")
BITS = (4, 8, 16)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    granularity: "tensor" (one scale), "channel" (one per index of `axis`), "token" (dynamic, one
    per row of the last dimension), "group" (weights [n, k]: one per `group_size` run along k).
    """

    bits: int = 8
    symmetric: bool = True
    granularity: str = "tensor"
    axis: int = 0
    group_size: int = 128
    rounding: str = "half_even"
    signed: bool = True
    pow2_scale: bool = False
    observer: str = "minmax"
    observer_kwargs: dict = field(default_factory=dict, hash=False, compare=False)
    clip_search: bool = False  # weights: shrink each row's range to minimise squared error
    offset_in_rounding: bool = False  # round(x/s + zp) (Ascend) instead of round(x/s) + zp (ONNX)
    timestep_sep: int | None = None  # activations of diffusion steps: dynamic before it, static from it
    qat: str | None = None  # "mom" / "tqt": linger's power-of-two quantizers that learn in training mode

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ConfigError(f"unsupported bit width {self.bits}; valid: {', '.join(map(str, BITS))}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"unknown granularity {self.granularity!r}; valid: {', '.join(GRANULARITIES)}")
        if self.rounding not in ROUNDING_MODES:
            raise ConfigError(f"unknown rounding {self.rounding!r}; valid: {', '.join(ROUNDING_MODES)}")
        if self.qat is not None and self.qat not in ("mom", "tqt"):
            raise ConfigError(f"unknown qat method {self.qat!r}; valid: mom, tqt")
        if self.granularity == "group" and self.group_size < 1:
            raise ConfigError(f"group_size must be >= 1, got {self.group_size}")

    @property
    def dynamic(self) -> bool:
        return self.granularity == "token"

    def with_(self, **changes) -> QuantSpec:
        """A copy with some fields changed."""
        return replace(self, **changes)


class Quantizer(torch.nn.Module):
    """Base fake quantizer. `enabled` toggles quantization; disabled it is the identity."""

    def __init__(self, spec: QuantSpec | None) -> None:
        super().__init__()
        self.spec = spec
        self.enabled = False

    @property
    def qmin(self) -> int:
        return qrange(self.spec.bits, self.spec.signed)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.spec.bits, self.spec.signed)[1]

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, scale, zero_point) of `x`; codes are float integers shaped like x, qparams broadcast."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantized x (same shape and dtype) when enabled, else x."""
        if not self.enabled:
            return x
        codes, scale, zp = self.quantize(x)
        return dequantize_codes(codes, scale, zp).to(x.dtype)


class IdentityQuantizer(Quantizer):
    """Placeholder for an input or weight that stays float."""

    def __init__(self) -> None:
        super().__init__(None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return "float"


class StaticQuantizer(Quantizer):
    """Quantizer with fixed qparams computed from an observer (per tensor, channel or group).

    Buffers `scale` and `zero_point` (float32) have shape [] (tensor), [C] (channel) or
    [n, k // group_size] (group, for weights [n, k]).
    """

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__(spec)
        if spec.dynamic:
            raise ConfigError("StaticQuantizer cannot take a per-token spec; use DynamicQuantizer")
        self.observer = build_observer(
            spec.observer, bits=spec.bits, symmetric=spec.symmetric, signed=spec.signed,
            **spec.observer_kwargs,
        )
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.calibrated = False

    def _as_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x reshaped to [C, N] rows for the observer."""
        g = self.spec.granularity
        if g == "tensor":
            return x.reshape(1, -1)
        if g == "channel":
            return x.movedim(self.spec.axis, 0).reshape(x.shape[self.spec.axis], -1)
        n, k = x.shape
        if k % self.spec.group_size:
            raise ConfigError(f"group_size {self.spec.group_size} does not divide in_features {k}")
        return x.reshape(-1, self.spec.group_size)

    def observe(self, x: torch.Tensor) -> None:
        """Feed `x` (the tensor this quantizer serves) to the observer."""
        if self.observer is None:
            raise RuntimeError("quantizer is frozen: its observer was dropped")
        self.observer.update(self._as_rows(x))

    def calc_qparams(self, like: torch.Tensor | None = None) -> None:
        """Set scale/zero_point from the observed range; `like` gives the weight shape for groups."""
        lo, hi = self.observer.calc_range()
        scale, zp = qparams_from_range(lo, hi, self.spec.bits, self.spec.symmetric, self.spec.signed,
                                       self.spec.pow2_scale)
        self._install(scale, zp, like)

    @torch.no_grad()
    def search_clipping(self, x: torch.Tensor, grid: int = 20, min_ratio: float = 0.5) -> None:
        """Shrink each row's observed range by the factor in [min_ratio, 1] that minimises the
        squared quantization error of `x` (the tensor itself, e.g. a weight) and set qparams."""
        rows = self._as_rows(x).float()
        lo, hi = self.observer.calc_range()
        best_err = torch.full((rows.shape[0],), float("inf"))
        best_s, best_z = None, None
        for f in torch.linspace(min_ratio, 1.0, grid).tolist():
            s, z = qparams_from_range(lo * f, hi * f, self.spec.bits, self.spec.symmetric,
                                      self.spec.signed, self.spec.pow2_scale)
            codes = quantize_codes(rows, s[:, None], z[:, None], self.qmin, self.qmax, self.spec.rounding)
            err = ((dequantize_codes(codes, s[:, None], z[:, None]) - rows) ** 2).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = s if best_s is None else torch.where(better, s, best_s)
            best_z = z if best_z is None else torch.where(better, z, best_z)
        self._install(best_s, best_z, like=x)

    def _install(self, scale: torch.Tensor, zp: torch.Tensor, like: torch.Tensor | None) -> None:
        if self.spec.granularity == "tensor":
            scale, zp = scale.reshape(()), zp.reshape(())
        elif self.spec.granularity == "group":
            n = like.shape[0] if like is not None else -1
            scale, zp = scale.reshape(n, -1), zp.reshape(n, -1)
        dev = self.scale.device
        self.scale, self.zero_point = scale.to(dev), zp.to(dev)
        self.calibrated = True

    def reset_observer(self) -> None:
        """Start observing afresh (drops accumulated statistics)."""
        spec = self.spec
        self.observer = build_observer(spec.observer, bits=spec.bits, symmetric=spec.symmetric,
                                       signed=spec.signed, **spec.observer_kwargs)

    def freeze(self) -> None:
        """Drop the observer; qparams stay."""
        self.observer = None

    def broadcast_qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """scale, zero_point shaped to broadcast against x (group: against x.reshape(n, k/g, g))."""
        g = self.spec.granularity
        if g == "tensor":
            return self.scale, self.zero_point
        if g == "channel":
            shape = [1] * x.dim()
            shape[self.spec.axis] = -1
            return self.scale.reshape(shape), self.zero_point.reshape(shape)
        return self.scale.unsqueeze(-1), self.zero_point.unsqueeze(-1)

    def quantize(self, x: torch.Tensor):
        if not self.calibrated:
            raise RuntimeError("quantizer used before calibration")
        scale, zp = self.broadcast_qparams(x)
        if self.spec.granularity == "group":
            n, k = x.shape
            codes = quantize_codes(x.reshape(n, k // self.spec.group_size, -1).float(), scale, zp,
                                   self.qmin, self.qmax, self.spec.rounding)
            return codes, scale, zp
        codes = quantize_codes(x.float(), scale, zp, self.qmin, self.qmax, self.spec.rounding,
                               self.spec.offset_in_rounding)
        return codes, scale, zp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        codes, scale, zp = self.quantize(x)
        return dequantize_codes(codes, scale, zp).reshape(x.shape).to(x.dtype)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"int{s.bits}, {'sym' if s.symmetric else 'asym'}, per-{s.granularity}"
                + (f"({s.group_size})" if s.granularity == "group" else "") + f", {s.observer}")


class DynamicQuantizer(Quantizer):
    """Per-token quantizer: each row of the last dimension gets its own range at run time."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__(spec)
        if not spec.dynamic:
            raise ConfigError("DynamicQuantizer needs granularity='token'")

    def quantize(self, x: torch.Tensor):
        xf = x.float()
        s = self.spec
        if s.symmetric and s.signed and not s.pow2_scale:
            # qparams_from_range's symmetric branch, in fewer passes: scale = max|x| / qmax
            scale = torch.clamp(xf.abs().amax(dim=-1, keepdim=True) / float(self.qmax), min=MIN_SCALE)
            codes = torch.clamp(round_ste(xf / scale, s.rounding), self.qmin, self.qmax)
            return codes, scale, torch.zeros_like(scale)
        lo, hi = xf.amin(dim=-1, keepdim=True), xf.amax(dim=-1, keepdim=True)
        scale, zp = qparams_from_range(lo, hi, self.spec.bits, self.spec.symmetric, self.spec.signed,
                                       self.spec.pow2_scale)
        codes = quantize_codes(xf, scale, zp, self.qmin, self.qmax, self.spec.rounding)
        return codes, scale, zp

    def extra_repr(self) -> str:
        s = self.spec
        return f"int{s.bits}, {'sym' if s.symmetric else 'asym'}, per-token (dynamic)"

