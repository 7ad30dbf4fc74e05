"""Which config and which modules a linger call works on: the YAML, disable_module, disable_submodel."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

import torch

from fxquant.errors import ConfigError

from .config import LingerConfig


def load_config(config_file: str | None, config: LingerConfig | None) -> LingerConfig:
    """The config from config_file, or `config`, or linger's defaults."""
    if config_file is not None and config is not None:
        raise ConfigError("pass config_file or config, not both")
    if config is not None:
        return config
    return LingerConfig.from_yaml(config_file) if config_file is not None else LingerConfig()


def check_disable_module(disable_module: Any) -> tuple[type, ...]:
    """disable_module as a tuple of module types (ConfigError for anything else)."""
    if disable_module is None:
        return ()
    if isinstance(disable_module, type):
        disable_module = (disable_module,)
    bad = [m for m in disable_module if not (isinstance(m, type) and issubclass(m, torch.nn.Module))]
    if bad:
        raise ConfigError(f"disable_module takes module types such as (nn.LSTM, nn.Linear); got {bad[0]!r}")
    return tuple(disable_module)


def check_disable_submodel(model: torch.nn.Module, disable_submodel: Any) -> tuple[str, ...]:
    """disable_submodel as a tuple of patterns, each naming at least one module of `model`."""
    if disable_submodel is None:
        return ()
    if isinstance(disable_submodel, str):
        raise ConfigError(f"disable_submodel takes a tuple of names, got the string {disable_submodel!r} "
                          f"(write ({disable_submodel!r},))")
    names = [n for n, _ in model.named_modules() if n]
    for pattern in disable_submodel:
        if not isinstance(pattern, str):
            raise ConfigError(f"disable_submodel entries are module names ('classifier*'), got {pattern!r}")
        stem = pattern.rstrip("*")
        if not any(fnmatchcase(n, pattern) or n == stem or n.startswith(stem + ".") for n in names):
            top = sorted({n.split(".")[0] for n in names})
            raise ConfigError(f"disable_submodel entry {pattern!r} names no module of {type(model).__name__}; "
                              f"top-level modules: {', '.join(top)}")
    return tuple(disable_submodel)


def is_disabled(name: str, patterns: tuple[str, ...]) -> bool:
    """True when module `name` is one a disable_submodel pattern names ('name*': it and below)."""
    for p in patterns:
        stem = p.rstrip("*")
        if fnmatchcase(name, p) or name == stem or name.startswith(stem + "."):
            return True
    return False
