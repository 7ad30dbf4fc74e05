"""Named quantization schemes: which QuantSpec the weight and the activations of a layer get."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import CalibrationDataError, ConfigError
from .fake_quant import ROUNDING_MODES
from .observers import build_observer
from .quantizer import QuantSpec

SCHEME_NAMES = ("float", "w8a8", "w8a8_dynamic", "w8a8_timestep", "w8a16", "w4a16")
ACT_METHODS = ("minmax", "histogram", "mixed", "percentile", "sigma", "ema", "top_k")


@dataclass(frozen=True)
class SchemeOptions:
    """Knobs that turn a scheme name into concrete specs.

    act_method: observer of static activations (any registered name, e.g. "top_10").
    w_per_channel: per-output-channel Linear weights (msModelSlim's mm_tensor=False); False = per-tensor.
    conv_w_per_channel: convolution weights per output channel whatever w_per_channel says.
    a_signed: static activation codes int8 [-128, 127]; False: uint8 [0, 255].
    w_sym: symmetric weights of weight-only schemes; None = scheme default (int8 symmetric, int4
    asymmetric). w8a8 weights are always symmetric (the integer kernel has no weight offset).
    offset_in_rounding: static activations round x/s + zero_point together, as Ascend's quantize
    does (the Calibrator sets it), instead of ONNX QuantizeLinear's round(x/s) + zero_point.
    timestep_sep: w8a8_timestep's first step with static activations (earlier steps are dynamic).
    w_clip_search: search each weight row's clipping range for least squared weight error. Off by
    default: on SmolLM2 it raised perplexity (w4a16 g64: 21.58 vs 20.78; w8a16: +0.37% vs +0.03%).
    """

    act_method: str = "minmax"
    w_sym: bool | None = None
    a_sym: bool = False
    a_signed: bool = True
    group_size: int = 128
    w_per_channel: bool = True
    conv_w_per_channel: bool = True
    w_clip_search: bool = False
    offset_in_rounding: bool = False
    rounding: str = "half_even"
    pow2_scale: bool = False
    act_observer_kwargs: tuple = ()
    timestep_sep: int = 0

    def __post_init__(self) -> None:
        """Refuse settings that could only fail later: an unknown or malformed observer (e.g.
        "minmx", "top_0", a negative sigma), rounding mode or group size."""
        if not isinstance(self.act_method, str):
            raise ConfigError(f"act_method must be an observer name (str), got {self.act_method!r}; "
                              f"valid: {', '.join(ACT_METHODS[:-1])}, top_<k>")
        build_observer(self.act_method, **dict(self.act_observer_kwargs))
        if self.rounding not in ROUNDING_MODES:
            raise ConfigError(f"unknown rounding {self.rounding!r}; valid: {', '.join(ROUNDING_MODES)}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ConfigError(f"group_size must be an integer >= 1, got {self.group_size!r}")
        if not isinstance(self.timestep_sep, int) or self.timestep_sep < 0:
            raise ConfigError(f"timestep_sep must be an integer >= 0, got {self.timestep_sep!r}")


@dataclass(frozen=True)
class Scheme:
    """A resolved scheme: `weight` / `activation` are None where the tensor stays float."""

    name: str
    weight: QuantSpec | None
    activation: QuantSpec | None

    @property
    def is_float(self) -> bool:
        return self.weight is None and self.activation is None

    @property
    def needs_calibration_data(self) -> bool:
        """True when activations have static qparams that must be observed."""
        return self.activation is not None and not self.activation.dynamic


def check_scheme_name(name: str) -> str:
    """`name` if it is a known scheme, else ConfigError listing the valid ones."""
    if name not in SCHEME_NAMES:
        raise ConfigError(f"unknown quantization scheme {name!r}; valid: {', '.join(SCHEME_NAMES)}")
    return name


def refuse_static_without_data(name: str, opts: SchemeOptions | None, has_data: bool, mix_cfg: object,
                               how: str = "pass calib_data") -> None:
    """Raise CalibrationDataError, before capture, when the default scheme `name` quantizes
    activations statically, no calibration data is given, and no mix_cfg may move the layers to
    other schemes (with one, the Calibrate pass decides once the graph shows a static layer).
    how: what the caller's user passes to give data. An unknown `name` is a ConfigError."""
    static = make_scheme(name, opts).needs_calibration_data
    if static and not has_data and not mix_cfg:
        raise CalibrationDataError(f"scheme {name!r} quantizes activations statically and needs calibration "
                                   f"data: {how}, or use a weight-only or dynamic scheme")


def make_scheme(name: str, opts: SchemeOptions | None = None) -> Scheme:
    """Build the Scheme called `name` under `opts`."""
    check_scheme_name(name)
    o = opts or SchemeOptions()
    if name == "float":
        return Scheme(name, None, None)
    per_ch = "channel" if o.w_per_channel else "tensor"
    w8 = QuantSpec(bits=8, symmetric=True if o.w_sym is None else o.w_sym, granularity=per_ch, axis=0,
                   rounding=o.rounding, pow2_scale=o.pow2_scale, clip_search=o.w_clip_search)
    if name == "w8a16":
        return Scheme(name, w8, None)
    if name == "w4a16":
        w4 = QuantSpec(bits=4, symmetric=False if o.w_sym is None else o.w_sym, granularity="group",
                       group_size=o.group_size, rounding=o.rounding,
                       clip_search=o.w_clip_search)
        return Scheme(name, w4, None)
    if name == "w8a8_dynamic":
        act = QuantSpec(bits=8, symmetric=True, granularity="token", rounding=o.rounding)
        return Scheme(name, w8.with_(symmetric=True), act)
    act = QuantSpec(bits=8, symmetric=o.a_sym, signed=o.a_signed, granularity="tensor", rounding=o.rounding,
                    pow2_scale=o.pow2_scale, observer=o.act_method, offset_in_rounding=o.offset_in_rounding,
                    observer_kwargs=dict(o.act_observer_kwargs))
    if name == "w8a8_timestep":
        act = act.with_(timestep_sep=o.timestep_sep)
    return Scheme(name, w8.with_(symmetric=True), act)
