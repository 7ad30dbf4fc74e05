"""KeepAcc: the validated keep_acc dict of seed 004."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fxquant.errors import ConfigError

KEEP_ACC_KEYS = ("admm", "easy_quant", "round_opt")


@dataclass(frozen=True)
class KeepAcc:
    """Which keepers run, and their iteration counts.

    From `{"admm": [bool, iters], "easy_quant": [bool, iters], "round_opt": bool}`; missing keys
    are off. round_opt_iters is AdaRound's optimisation steps per layer.
    """

    admm: bool = False
    admm_iters: int = 0
    easy_quant: bool = False
    easy_quant_iters: int = 0
    round_opt: bool = False
    round_opt_iters: int = 400

    @property
    def any(self) -> bool:
        return self.admm or self.easy_quant or self.round_opt

    @classmethod
    def parse(cls, keep_acc: Mapping[str, Any] | None) -> KeepAcc:
        """KeepAcc from seed 004's dict; ConfigError naming the bad key or value."""
        if keep_acc is None:
            return cls()
        if not isinstance(keep_acc, Mapping):
            raise ConfigError(f"keep_acc must be a dict with keys {', '.join(KEEP_ACC_KEYS)}, got {keep_acc!r}")
        unknown = sorted(set(keep_acc) - set(KEEP_ACC_KEYS))
        if unknown:
            raise ConfigError(f"keep_acc has unknown keys {unknown}; valid: {', '.join(KEEP_ACC_KEYS)}")
        fields: dict[str, Any] = {}
        for key in ("admm", "easy_quant"):
            if key not in keep_acc:
                continue
            value = keep_acc[key]
            if (not isinstance(value, (list, tuple)) or len(value) != 2 or not isinstance(value[0], bool)
                    or isinstance(value[1], bool) or not isinstance(value[1], int) or value[1] < 1):
                raise ConfigError(f"keep_acc[{key!r}] must be [bool, iterations >= 1], got {value!r}")
            fields[key], fields[f"{key}_iters"] = value[0], value[1]
        if "round_opt" in keep_acc:
            value = keep_acc["round_opt"]
            if isinstance(value, (list, tuple)) and len(value) == 1:
                value = value[0]
            if not isinstance(value, bool):
                raise ConfigError(f"keep_acc['round_opt'] must be a bool, got {value!r}")
            fields["round_opt"] = value
        return cls(**fields)
