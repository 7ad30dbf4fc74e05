"""Seed 002's session configuration: pydantic models with the seed's names and fields, validated."""

from __future__ import annotations

from typing import Any, Dict, List, Optional  # noqa: UP035  (the seed's annotations)

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from ..errors import ConfigError
from ..formats.ascend_checkpoint import SAVE_TYPES
from ..keep_acc.w_method import W_METHODS

ACT_METHODS = ("minmax", "histogram", "mixed")
#: act_method spellings accepted (the seed writes "mixed" for w8a8 and "mix" for the others)
ACT_METHOD_ALIASES = {"minmax": "minmax", "histogram": "histogram", "mixed": "mixed", "mix": "mixed"}
DEVICES = ("cpu", "npu")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


def _one_of(field: str, value: str, valid) -> str:
    """value, or ValueError naming the field and the valid choices."""
    if value not in valid:
        raise ValueError(f"unknown {field} {value!r}; valid: {', '.join(valid)}")
    return value


class _ActMethod(_Strict):
    act_method: str = "minmax"
    w_method: str = "minmax"

    @field_validator("act_method")
    @classmethod
    def _known(cls, v: str) -> str:
        return _one_of("act_method", v, ACT_METHOD_ALIASES)

    @field_validator("w_method")
    @classmethod
    def _known_w_method(cls, v: str) -> str:
        return _one_of("w_method", v, W_METHODS)

    @property
    def observer(self) -> str:
        """The fxquant observer name behind act_method ("mix" -> "mixed")."""
        return ACT_METHOD_ALIASES[self.act_method]


class W8A8QuantConfig(_ActMethod):
    """act_method: observer of the static activation ranges ("minmax", "histogram", "mixed").
    w_method (an addition to the seed): "minmax" rounds weights to nearest, "gptq" rounds them with
    GPTQ's error compensation on each layer's calibration inputs (fxquant.keep_acc.GPTQWeights);
    the same field exists on the dynamic and timestep configs."""


class W8A8DynamicQuantConfig(_ActMethod):
    """act_method: observer of the static ranges in a dynamic run (fa3's per-head Q/K/V scales)."""


class W8A8TimeStepQuantConfig(_ActMethod):
    """act_method: observer of the per-step static ranges (steps >= timestep_sep)."""


class W8A8ProcessorConfig(_Strict):
    """Static W8A8: per-tensor int8 activations, per-channel int8 weights; disable_names stay float."""

    cfg: W8A8QuantConfig
    disable_names: list


class W8A8DynamicProcessorConfig(_Strict):
    """W8A8 with per-token dynamic activation quantization."""

    cfg: W8A8DynamicQuantConfig
    disable_names: list


class W8A8TimeStepProcessorConfig(_Strict):
    """Diffusion models: dynamic activations for steps < timestep_sep, static per-step ranges after."""

    cfg: W8A8TimeStepQuantConfig
    disable_names: list
    timestep_sep: int

    @field_validator("timestep_sep")
    @classmethod
    def _non_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"timestep_sep must be >= 0, got {v}")
        return v


class FA3ProcessorConfig(_Strict):
    """Per-head int8 quantization of attention Q/K/V (FAKQuant); needs w8a8_dynamic."""


class SaveProcessorConfig(_Strict):
    """Where and how to write the Ascend-ready checkpoint (part_file_size in GB)."""

    output_path: str
    safetensors_name: Optional[str] = None  # noqa: UP045
    json_name: Optional[str] = None  # noqa: UP045
    save_type: list = ["safe_tensor"]
    part_file_size: Optional[int] = None  # noqa: UP045

    @field_validator("save_type")
    @classmethod
    def _known_save_types(cls, v: list) -> list:
        bad = [t for t in v if t not in SAVE_TYPES]
        if bad or not v:
            raise ValueError(f"unknown save_type {bad or v}; valid: {', '.join(SAVE_TYPES)}")
        return v

    @field_validator("part_file_size")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"part_file_size must be a positive number of GB, got {v}")
        return v


class M3ProcessorConfig(_Strict):
    """AWQ-style activation-aware scaling chosen per layer group by output error."""


class M4ProcessorConfig(_Strict):
    """Iterative smooth, s = A^0.9 / W^0.1."""


class M6Config(_Strict):
    """Flex smooth exponents in [0, 1]; either None: both are searched."""

    alpha: Optional[float] = None  # noqa: UP045
    beta: Optional[float] = None  # noqa: UP045

    @field_validator("alpha", "beta")
    @classmethod
    def _unit(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError(f"must be in [0, 1], got {v}")
        return v


class M6ProcessorConfig(_Strict):
    """Flex smooth, s = A^alpha / W^beta."""

    cfg: M6Config


class QuaRotProcessorConfig(_Strict):
    """Rotate the residual stream (and each attention head's values) of a pre-RMSNorm transformer by
    randomised Hadamard matrices folded into the weights, before smoothing (QuaRot). seed picks the
    random signs; value_heads=False leaves the attention values unrotated; online: fnmatch patterns
    of Linear layers whose input is rotated at run time (e.g. ["*down_proj"], QuaRot's MLP
    rotation: the QDQ ONNX, fxquant.apply and the Ascend checkpoint, as msModelSlim's
    kronecker_rotation_m / _n, take it)."""

    seed: int = 0
    value_heads: bool = True
    online: List[str] = []  # noqa: UP006


#: processor name -> its config class (seed 002's table, plus quarot)
PROCESSORS: dict[str, type[BaseModel]] = {
    "m3": M3ProcessorConfig,
    "m4": M4ProcessorConfig,
    "m6": M6ProcessorConfig,
    "quarot": QuaRotProcessorConfig,
    "w8a8": W8A8ProcessorConfig,
    "w8a8_dynamic": W8A8DynamicProcessorConfig,
    "w8a8_timestep": W8A8TimeStepProcessorConfig,
    "fa3": FA3ProcessorConfig,
    "save": SaveProcessorConfig,
}
QUANT_PROCESSORS = ("w8a8", "w8a8_dynamic", "w8a8_timestep")
SUPPRESSION_PROCESSORS = ("m3", "m4", "m6")


class SessionConfig(_Strict):
    """processor_cfg_map: {processor name: its config}; calib_data: `[[input1], ...]` or keyword-input
    dicts (None: data-free); device: "cpu" or "npu"."""

    processor_cfg_map: Dict[str, BaseModel] = {}  # noqa: UP006
    calib_data: Optional[List[Any]] = None  # noqa: UP006, UP045
    device: str = "cpu"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if _one_of("device", v, DEVICES) == "npu":
            try:
                import torch_npu  # noqa: F401
            except ImportError:
                raise ValueError("device 'npu' needs torch_npu, which is not installed; use device='cpu' "
                                 "or install the 'ascend' extra") from None
        return v

    @model_validator(mode="after")
    def _processors(self) -> SessionConfig:
        procs = self.processor_cfg_map
        for name, cfg in procs.items():
            if name not in PROCESSORS:
                raise ValueError(f"unknown processor {name!r}; valid: {', '.join(PROCESSORS)}")
            if not isinstance(cfg, PROCESSORS[name]):
                raise ValueError(f"processor {name!r} takes a {PROCESSORS[name].__name__}, "
                                 f"got {type(cfg).__name__}")
        quant = [n for n in QUANT_PROCESSORS if n in procs]
        if not quant:
            if "save" in procs and set(procs) <= {"save"}:
                raise ValueError("the save processor cannot be used alone: add a quantization processor "
                                 f"({', '.join(QUANT_PROCESSORS)})")
            raise ValueError(f"at least one quantization processor is needed: {', '.join(QUANT_PROCESSORS)}")
        if len(quant) > 1:
            raise ValueError(f"conflicting processors {quant}: use exactly one of {', '.join(QUANT_PROCESSORS)}")
        suppression = [n for n in SUPPRESSION_PROCESSORS if n in procs]
        if len(suppression) > 1:
            raise ValueError(f"conflicting processors {suppression}: use at most one outlier suppression "
                             f"processor of {', '.join(SUPPRESSION_PROCESSORS)}")
        if "fa3" in procs and "w8a8_dynamic" not in procs:
            raise ValueError("processor 'fa3' needs 'w8a8_dynamic' in the same session")
        return self

    @property
    def quant_processor(self) -> str:
        """The one quantization processor's name."""
        return next(n for n in QUANT_PROCESSORS if n in self.processor_cfg_map)


def session_from_dict(data: Any) -> SessionConfig:
    """A SessionConfig from plain data (e.g. YAML): {"processors": {name: {field: value}}, "device":
    ...}; `processor_cfg_map` is accepted for "processors". Each processor's fields are validated by
    its config class; an unknown processor or key raises ConfigError naming it and the valid ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"a session config is a mapping with 'processors' (and 'device'), got {type(data).__name__}")
    allowed = {"processors", "processor_cfg_map", "device"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"unknown session key(s) {unknown}; valid: {', '.join(sorted(allowed))}")
    procs = data.get("processors", data.get("processor_cfg_map"))
    if not isinstance(procs, dict) or not procs:
        raise ConfigError("a session config needs 'processors': {name: {its fields}}; names: " + ", ".join(PROCESSORS))
    built = {}
    for name, fields in procs.items():
        if name not in PROCESSORS:
            raise ConfigError(f"unknown processor {name!r}; valid: {', '.join(PROCESSORS)}")
        try:
            built[name] = PROCESSORS[name](**(fields or {}))
        except ValidationError as exc:
            raise ConfigError(f"processor {name!r}: {_first_error(exc)}") from None
    try:
        return SessionConfig(processor_cfg_map=built, device=data.get("device", "cpu"))
    except ValidationError as exc:
        raise ConfigError(f"session config: {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "value"
    return f"{where}: {err.get('msg', 'invalid')}"
