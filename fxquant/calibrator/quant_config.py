"""QuantConfig: msModelSlim's LLM quantization parameters, validated, mapped onto fxquant schemes."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError
from ..keep_acc import KeepAcc, check_w_method
from ..schemes import ACT_METHODS, SchemeOptions

log = logging.getLogger(__name__)

#: msModelSlim's integer act_method codes; 0 (data-free) means sigma statistics, or minmax when sigma=0
DEFAULT_SIGMA = 25.0
ACT_METHOD_CODES = {1: "minmax", 2: "histogram", 3: "mixed"}
DEV_TYPES = ("cpu", "npu", "cuda")
#: (w_bit, a_bit, is_dynamic) -> scheme
BIT_SCHEMES = {
    (8, 8, False): "w8a8",
    (8, 8, True): "w8a8_dynamic",
    (8, 16, False): "w8a16",
    (4, 16, False): "w4a16",
}


@dataclass
class QuantConfig:
    """Quantization parameters of `Calibrator` (msModelSlim's QuantConfig, LLM fields).

    w_bit / a_bit / is_dynamic choose the default scheme: (8, 8) w8a8, (8, 8, dynamic)
    w8a8_dynamic, (8, 16) w8a16, (4, 16) w4a16. mm_tensor=True quantizes weights per tensor,
    False per output channel (msModelSlim's default is True; False is recommended). act_method:
    1/"minmax", 2/"histogram", 3/"mixed" (or any fxquant observer name). pr: probability that a
    later layer's calibration input is the quantized (rather than float) output of earlier
    layers; 0 calibrates on float activations only. dev_type/dev_id: where calibration runs.

    CV fields (seed 004): disable_names=[] (an explicit empty list) keeps the first and the last
    quantizable layer float, as msModelSlim does; amp_num rolls back the amp_num layers whose
    quantization hurts the model output most on the calibration data; input_shape (e.g.
    [1, 3, 224, 224]) makes synthetic inputs when there is no calib_data (data-free);
    keep_acc {"admm": [bool, iters], "easy_quant": [bool, iters], "round_opt": bool} turns on the
    accuracy keepers; sigma (seed 004) chooses the activation statistics when act_method is not
    given or is 0: sigma > 0 observes mean +- sigma*std (clipped to min/max), sigma=0 min-max (an
    explicit act_method 1/2/3 or observer name wins over sigma, with a warning); a_signed=False gives uint8 activation codes [0, 255]; act_quant=False is weight-only;
    quant_mode 0 = data-free (input_shape, no calib_data), 1 = label-free (calib_data), None =
    decided by whether calib_data is given; device is an alias of dev_type. Convolution weights
    are always per output channel (mm_tensor governs Linear layers). quant_small_ops: give the
    add / bmm / matmul small ops static int8 inputs too (w8a8 only), so that a runtime can run whole
    residual blocks in int8 (onnxruntime fuses QLinearConv -> QLinearAdd).

    w_method (not in the seeds): "minmax" rounds weights to nearest; "gptq" rounds each layer's
    weight with GPTQ's error compensation on its calibration inputs (int8 per-tensor / per-channel
    schemes).
    """

    w_bit: int = 8
    a_bit: int = 8
    w_sym: bool = True
    a_sym: bool = False
    act_method: int | str | None = None
    disable_names: Sequence[str] | None = None
    dev_type: str = "cpu"
    dev_id: int | None = None
    pr: float = 1.0
    mm_tensor: bool = True
    is_dynamic: bool = False
    group_size: int = 128
    disable_last_linear: bool = True
    w_signed: bool = True
    a_signed: bool = True
    input_shape: Sequence[int] | None = None
    act_quant: bool = True
    quant_mode: int | None = None
    amp_num: int = 0
    keep_acc: Mapping[str, Any] | None = None
    sigma: float | None = None
    device: str | None = None
    quant_small_ops: bool = False
    w_method: str = "minmax"
    options: SchemeOptions = field(init=False, repr=False)
    keepers: KeepAcc = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.device is not None:
            self.dev_type = self.device
        if not self.act_quant:
            self.a_bit = 16
        self._check_cv_fields()
        for name in ("w_bit", "a_bit", "group_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        if self.w_bit not in (4, 8):
            raise ConfigError(f"w_bit={self.w_bit} is not supported; valid: 4, 8")
        if self.a_bit not in (8, 16):
            raise ConfigError(f"a_bit={self.a_bit} is not supported; valid: 8, 16 (16 = weight-only)")
        key = (self.w_bit, self.a_bit, self.is_dynamic)
        if key not in BIT_SCHEMES:
            valid = ", ".join(f"w_bit={w}, a_bit={a}, is_dynamic={d}" for w, a, d in BIT_SCHEMES)
            raise ConfigError(f"w_bit={self.w_bit}, a_bit={self.a_bit}, is_dynamic={self.is_dynamic} "
                              f"is not a supported combination; valid: {valid}")
        if self.quant_small_ops and self.scheme != "w8a8":
            raise ConfigError(f"quant_small_ops needs static w8a8 (w_bit=8, a_bit=8, is_dynamic=False), "
                              f"not {self.scheme}")
        if self.a_bit == 8 and not self.w_sym:
            raise ConfigError("w8a8 needs symmetric weights (w_sym=True): the int8 matmul has no weight offset")
        if not 0.0 <= float(self.pr) <= 1.0:
            raise ConfigError(f"pr must be in [0, 1], got {self.pr}")
        if self.group_size < 1:
            raise ConfigError(f"group_size must be >= 1, got {self.group_size}")
        if self.dev_type not in DEV_TYPES:
            raise ConfigError(f"dev_type {self.dev_type!r} is not supported; valid: {', '.join(DEV_TYPES)}")
        if isinstance(self.disable_names, str):
            raise ConfigError(f"disable_names must be a list of layer names, got the string "
                              f"{self.disable_names!r} (write [{self.disable_names!r}])")
        if self.disable_names is not None and not all(isinstance(n, str) for n in self.disable_names):
            raise ConfigError(f"disable_names must be a list of layer names (str), got {self.disable_names!r}")
        observer = self.act_observer
        kwargs = (("k", float(self.sigma or DEFAULT_SIGMA)),) if observer == "sigma" else ()
        self.options = SchemeOptions(act_method=observer, w_sym=self.w_sym, a_sym=self.a_sym, a_signed=self.a_signed,
                                     group_size=self.group_size, w_per_channel=not self.mm_tensor,
                                     act_observer_kwargs=kwargs,
                                     offset_in_rounding=True)  # Ascend quantize: round(x/s + offset)
        self.keepers = KeepAcc.parse(self.keep_acc)
        check_w_method(self.w_method, self.scheme)

    def _check_cv_fields(self) -> None:
        if self.w_signed is not True:
            raise ConfigError("w_signed=False is not supported: int8 kernels (ONNX, Ascend) take signed weights")
        if not isinstance(self.amp_num, int) or isinstance(self.amp_num, bool) or self.amp_num < 0:
            raise ConfigError(f"amp_num must be an integer >= 0, got {self.amp_num!r}")
        if self.quant_mode not in (None, 0, 1):
            raise ConfigError(f"quant_mode={self.quant_mode!r} is not supported; valid: 0 (data-free), "
                              "1 (label-free), None (from whether calib_data is given)")
        if self.sigma is not None and (isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float))
                                       or not self.sigma >= 0):
            raise ConfigError(f"sigma must be a number >= 0 (0 = min-max), got {self.sigma!r}")
        if self.input_shape is not None and (
                isinstance(self.input_shape, str)
                or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in self.input_shape)):
            raise ConfigError(f"input_shape must be a list of positive ints such as [1, 3, 224, 224], "
                              f"got {self.input_shape!r}")

    @property
    def act_observer(self) -> str:
        """The observer name behind act_method."""
        m = self.act_method
        if isinstance(m, bool) or not isinstance(m, (int, str, type(None))):
            raise ConfigError(f"act_method must be 0, 1, 2, 3 or an observer name, got {m!r}")
        if m is None or m == 0:
            sigma = DEFAULT_SIGMA if self.sigma is None and m == 0 else self.sigma
            return "sigma" if sigma else "minmax"
        if self.sigma:
            log.warning("sigma=%s is ignored: act_method=%r chooses the activation observer", self.sigma, m)
        if isinstance(m, int):
            if m not in ACT_METHOD_CODES:
                raise ConfigError(f"act_method={m} is not supported; valid: 0 (data-free: sigma, or minmax "
                                  "when sigma=0), 1 (minmax), 2 (histogram), 3 (mixed)")
            return ACT_METHOD_CODES[m]
        if m not in ACT_METHODS and not re.fullmatch(r"top_\d+", m):
            raise ConfigError(f"act_method {m!r} is not supported; valid: {', '.join(ACT_METHODS)}, top_<k>")
        return m

    @classmethod
    def for_scheme(cls, scheme: str, **fields: Any) -> QuantConfig:
        """The QuantConfig whose bit widths select `scheme`, weights per output channel
        (mm_tensor=False), other fields as given."""
        by_scheme = {s: key for key, s in BIT_SCHEMES.items()}
        if scheme not in by_scheme:
            raise ConfigError(f"QuantConfig has no bit widths for scheme {scheme!r}; valid: {', '.join(by_scheme)}")
        w_bit, a_bit, dynamic = by_scheme[scheme]
        return cls(**{"w_bit": w_bit, "a_bit": a_bit, "is_dynamic": dynamic, "mm_tensor": False, **fields})

    @property
    def scheme(self) -> str:
        """The default scheme these bit widths select."""
        return BIT_SCHEMES[(self.w_bit, self.a_bit, self.is_dynamic)]

    def torch_device(self) -> torch.device:
        """The calibration device; a clear error when its backend is missing."""
        if self.dev_type == "npu":
            try:
                import torch_npu  # noqa: F401
            except ImportError:
                raise ConfigError("dev_type='npu' needs torch_npu, which is not installed; "
                                  "use dev_type='cpu' or install the 'ascend' extra") from None
        if self.dev_type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("dev_type='cuda' but CUDA is not available; use dev_type='cpu'")
        return torch.device(self.dev_type if self.dev_id is None else f"{self.dev_type}:{self.dev_id}")


def parse_disable_level(level: str) -> int:
    """n of 'L<n>' (n >= 0); ConfigError for anything else ('L-1', 'Lx', 3, ...)."""
    if not isinstance(level, str) or not re.fullmatch(r"L\d+", level):
        raise ConfigError(f"disable_level must be 'L<n>' with an integer n >= 0 (e.g. 'L0', 'L3'), got {level!r}")
    return int(level[1:])
