"""w_method: how weights are rounded onto their integer grid ("minmax": round to nearest; "gptq")."""

from __future__ import annotations

from fxquant.calibration import WeightOptimizer
from fxquant.errors import ConfigError

from .gptq import GPTQWeights

W_METHODS = ("minmax", "gptq")
#: schemes whose weights GPTQ can round (per-tensor / per-channel int8, w4a16's per-group int4)
GPTQ_SCHEMES = ("w8a8", "w8a8_dynamic", "w8a8_timestep", "w8a16", "w4a16")


def check_w_method(w_method: str, scheme: str | None = None) -> str:
    """w_method itself, or ConfigError naming the valid choices (and the schemes gptq supports)."""
    if w_method not in W_METHODS:
        raise ConfigError(f"unknown w_method {w_method!r}; valid: {', '.join(W_METHODS)}")
    if w_method == "gptq" and scheme is not None and scheme not in GPTQ_SCHEMES:
        raise ConfigError(f"w_method='gptq' needs static integer weights; scheme {scheme!r} "
                          f"is not one of {', '.join(GPTQ_SCHEMES)}")
    return w_method


def weight_rounding(w_method: str) -> list[WeightOptimizer]:
    """The weight optimizers that implement w_method (none for round-to-nearest)."""
    return [GPTQWeights()] if check_w_method(w_method) == "gptq" else []
