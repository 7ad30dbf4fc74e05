"""linger's YAML configuration (seed 001), validated field by field, and what it means in fxquant.

Every key of the seed's schema is honoured or refused with a reason; unknown keys and bad values
are ConfigErrors naming the key and the valid choices. The config lives in the prepared model
(gm.meta["linger_config"]), never in a process-wide object.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from fxquant.errors import ConfigError

PLATFORMS = ("arcs", "mars", "venusA")
QUANT_METHODS = ("NATIVE", "CUDA", "ONNX")
A_CALIBRATE = ("top_10", "abs_max", "w_like")
W_CALIBRATE = ("abs_max", "top_10", "w_like")
STRATEGIES = ("RANGE_MEAN",)
QAT_METHODS = ("MOM", "TQT")
ACTIVATION_TYPES = ("none",)
#: convolution limits of the NPUs (linger checks them when it wraps a convolution)
CONV_LIMITS = {"kernel_size": (1, 12), "padding": (0, 11), "stride": (1, 2, 4)}


def _check_choice(key: str, value: Any, valid: tuple) -> Any:
    if value not in valid:
        raise ConfigError(f"{key}: {value!r} is not supported; valid: {', '.join(map(str, valid))}")
    return value


def _check_number(key: str, value: Any, positive: bool = True) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and value <= 0):
        raise ConfigError(f"{key}: {value!r} must be {'a positive number' if positive else 'a number'} or null")


@dataclass
class ClampInfo:
    """Constraint training (`constrain`): activations to +-clamp_activation_value; weights to
    clamp_factor_value * mean|W| (dynamic) or to +-clamp_weight_value (static, wins when set);
    biases to +-clamp_bias_value. The weight clamp also initialises calibration's weight range."""

    clamp_activation_value: float | None = 8
    clamp_bias_value: float | None = None
    clamp_factor_value: float | None = 7
    clamp_weight_value: float | None = None

    def check(self) -> None:
        for f in fields(self):
            _check_number(f"clamp_info.{f.name}", getattr(self, f.name))


@dataclass
class QuantInfo:
    """How weights, activations and biases are quantized (linger's quant_info)."""

    a_calibrate_name: str = "top_10"
    a_strategy: str = "RANGE_MEAN"
    activate_bits: int = 8
    activation_type: str = "none"
    bias_bits: int = 32
    is_perchannel: bool = False
    is_symmetry: bool = True
    qat_method: str = "MOM"
    round_mode: str = "floor_add"
    w_calibrate_name: str = "abs_max"
    w_strategy: str = "RANGE_MEAN"
    weight_bits: int = 8

    def check(self) -> None:
        _check_choice("quant_info.a_calibrate_name", self.a_calibrate_name, A_CALIBRATE)
        _check_choice("quant_info.w_calibrate_name", self.w_calibrate_name, W_CALIBRATE)
        _check_choice("quant_info.a_strategy", self.a_strategy, STRATEGIES)
        _check_choice("quant_info.w_strategy", self.w_strategy, STRATEGIES)
        _check_choice("quant_info.activate_bits", self.activate_bits, (8, 16, 32))
        _check_choice("quant_info.weight_bits", self.weight_bits, (4, 8))
        _check_choice("quant_info.bias_bits", self.bias_bits, (32,))
        _check_choice("quant_info.qat_method", self.qat_method, QAT_METHODS)
        _check_choice("quant_info.round_mode", self.round_mode, ("floor_add",))
        if self.activation_type not in ACTIVATION_TYPES:
            raise ConfigError(f"quant_info.activation_type: {self.activation_type!r} is not supported (linger's "
                              "fused-activation ranges are not modelled: fxquant quantizes each layer's input, "
                              "after its activation); valid: none")
        if self.is_perchannel is not False:
            raise ConfigError("quant_info.is_perchannel: only false is supported (linger has no per-channel "
                              "quantization either); valid: false")
        if self.is_symmetry is not True:
            raise ConfigError("quant_info.is_symmetry: only true is supported (linger quantizes symmetrically); "
                              "valid: true")


@dataclass
class LingerConfig:
    """The whole YAML file. `dtype` is a string such as "torch.float32"."""

    clamp_info: ClampInfo = field(default_factory=ClampInfo)
    device: str = "cpu"
    dtype: str = "torch.float32"
    open_quant: bool = True
    platform: str = "venusA"
    quant_info: QuantInfo = field(default_factory=QuantInfo)
    quant_method: str = "NATIVE"
    seed: int = 42

    def __post_init__(self) -> None:
        self.clamp_info.check()
        self.quant_info.check()
        _check_choice("platform", self.platform, PLATFORMS)
        _check_choice("quant_method", self.quant_method, QUANT_METHODS)
        _check_choice("dtype", self.dtype, ("torch.float32",))
        if self.device not in ("cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"device: {self.device!r} is not supported; valid: cpu, cuda, cuda:<n>")
        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device: {self.device!r} but CUDA is not available here; valid: cpu")
        if not isinstance(self.open_quant, bool):
            raise ConfigError(f"open_quant: {self.open_quant!r} must be true or false")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed: {self.seed!r} must be an integer")

    @classmethod
    def from_dict(cls, data: Any) -> LingerConfig:
        """Build from the YAML's mapping; unknown keys (at any level) are errors."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"a linger config is a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        _no_unknown("", data, known)
        values = dict(data)
        for key, sub in (("clamp_info", ClampInfo), ("quant_info", QuantInfo)):
            part = values.get(key, {}) or {}
            if not isinstance(part, dict):
                raise ConfigError(f"{key} must be a mapping, got {type(part).__name__}")
            _no_unknown(f"{key}.", part, {f.name for f in fields(sub)})
            values[key] = sub(**part)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> LingerConfig:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"linger config file {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {str(exc).splitlines()[0]}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save_yaml(self, path: str | os.PathLike) -> Path:
        """Write the config (every key, so loading it back gives this config), atomically."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=True), encoding="utf-8")
        os.replace(tmp, p)
        return p


def _no_unknown(prefix: str, data: dict, known: set[str]) -> None:
    unknown = sorted(set(map(str, data)) - known)
    if unknown:
        raise ConfigError(f"unknown linger config key {prefix}{unknown[0]}; valid keys{' of ' + prefix[:-1] if prefix else ''}: "
                          f"{', '.join(sorted(known))}")
