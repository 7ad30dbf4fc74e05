"""QuantConfig: msModelSlim's LLM quantization parameters, validated, mapped onto fxquant schemes."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .errors import ConfigError
from .schemes import ACT_METHODS, SchemeOptions

#: msModelSlim's integer act_method codes
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
    """

    w_bit: int = 8
    a_bit: int = 8
    w_sym: bool = True
    a_sym: bool = False
    act_method: int | str = 1
    disable_names: Sequence[str] | None = None
    dev_type: str = "cpu"
    dev_id: int | None = None
    pr: float = 1.0
    mm_tensor: bool = True
    is_dynamic: bool = False
    group_size: int = 128
    disable_last_linear: bool = True
    options: SchemeOptions = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.w_bit not in (4, 8):
            raise ConfigError(f"w_bit={self.w_bit} is not supported; valid: 4, 8")
        if self.a_bit not in (8, 16):
            raise ConfigError(f"a_bit={self.a_bit} is not supported; valid: 8, 16 (16 = weight-only)")
        key = (self.w_bit, self.a_bit, self.is_dynamic)
        if key not in BIT_SCHEMES:
            valid = ", ".join(f"w_bit={w}, a_bit={a}, is_dynamic={d}" for w, a, d in BIT_SCHEMES)
            raise ConfigError(f"w_bit={self.w_bit}, a_bit={self.a_bit}, is_dynamic={self.is_dynamic} "
                              f"is not a supported combination; valid: {valid}")
        if self.a_bit == 8 and not self.w_sym:
            raise ConfigError("w8a8 needs symmetric weights (w_sym=True): the int8 matmul has no weight offset")
        if not 0.0 <= float(self.pr) <= 1.0:
            raise ConfigError(f"pr must be in [0, 1], got {self.pr}")
        if self.group_size < 1:
            raise ConfigError(f"group_size must be >= 1, got {self.group_size}")
        if self.dev_type not in DEV_TYPES:
            raise ConfigError(f"dev_type {self.dev_type!r} is not supported; valid: {', '.join(DEV_TYPES)}")
        if self.disable_names is not None and (isinstance(self.disable_names, str)
                                               or not all(isinstance(n, str) for n in self.disable_names)):
            raise ConfigError("disable_names must be a list of layer names (str)")
        self.options = SchemeOptions(act_method=self.act_observer, w_sym=self.w_sym, a_sym=self.a_sym,
                                     group_size=self.group_size, w_per_channel=not self.mm_tensor,
                                     offset_in_rounding=True)  # Ascend quantize: round(x/s + offset)

    @property
    def act_observer(self) -> str:
        """The observer name behind act_method."""
        m = self.act_method
        if isinstance(m, bool) or not isinstance(m, (int, str)):
            raise ConfigError(f"act_method must be 1, 2, 3 or an observer name, got {m!r}")
        if isinstance(m, int):
            if m not in ACT_METHOD_CODES:
                raise ConfigError(f"act_method={m} is not supported; valid: 1 (minmax), 2 (histogram), 3 (mixed)")
            return ACT_METHOD_CODES[m]
        if m not in ACT_METHODS and not re.fullmatch(r"top_\d+", m):
            raise ConfigError(f"act_method {m!r} is not supported; valid: {', '.join(ACT_METHODS)}, top_<k>")
        return m

    @property
    def scheme(self) -> str:
        """The default scheme these bit widths select."""
        return BIT_SCHEMES[(self.w_bit, self.a_bit, self.is_dynamic)]

    def device(self) -> torch.device:
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
