"""Decide the scheme of every quantizable node, with seed 000's priority, and record why.

Priority: rollback (disable_names, automatic rollback names, disabled module types, disabled
submodules, first/last layer) > exact layer name in mix_cfg > first matching fnmatchcase pattern
in mix_cfg (dict order) > default. The decision lands in node.meta["fxquant"] as
{"scheme": name, "reason": text}.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
from torch import fx

from fxquant.errors import ConfigError
from fxquant.ir import fxq_meta, module_of
from fxquant.quant_opr_table import QUANTIZABLE_LAYERS
from fxquant.schemes import check_scheme_name
from fxquant.small_ops import SMALL_OP_TYPES

log = logging.getLogger(__name__)


def quantizable_nodes(gm: fx.GraphModule, extra_types: tuple[type, ...] = ()) -> list[fx.Node]:
    """call_module nodes of Linear/Conv layers (and of `extra_types`), in topological order."""
    types = QUANTIZABLE_LAYERS + tuple(extra_types)
    return [n for n in gm.graph.nodes if isinstance(module_of(gm, n), types)]


@dataclass
class ResolveSchemes:
    """Pass: write node.meta["fxquant"]["scheme"/"reason"] for layers and small ops.

    disabled_submodules: fnmatchcase patterns over names ("classifier*" matches the module and
    everything under it, linger's disable_submodel). small_op_scheme: scheme of add/bmm/matmul
    modules unless mix_cfg names them exactly. model_layers: the names of all the model's layers in
    execution order, for a graph that holds only some of them (torch.compile graph breaks): first /
    last layer and disable_names are then judged against the whole model.
    """

    default: str = "w8a8"
    mix_cfg: dict[str, str] | None = None
    disable_names: Sequence[str] = ()
    rollback_names: Sequence[str] = ()
    disabled_types: tuple[type, ...] = ()
    disabled_submodules: Sequence[str] = ()
    disable_first_layer: bool = False
    disable_last_layer: bool = True
    small_op_scheme: str = "float"
    strict_names: bool = True
    custom_schemes: Sequence[str] = ()  # scheme names a front end builds itself (InsertQuantOprs.schemes)
    extra_layer_types: tuple[type, ...] = ()  # layers quantized beyond Linear/Conv (linger: LSTM, GRU)
    model_layers: Sequence[str] = ()  # every layer of the model in order, when the graph holds part of it
    decisions: dict[str, tuple[str, str]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        for name in (self.default, self.small_op_scheme):
            if name not in self.custom_schemes:
                check_scheme_name(name)
        for label in ("disable_names", "rollback_names", "disabled_submodules"):
            self._check_name_list(label, getattr(self, label))
        if self.mix_cfg is not None and not isinstance(self.mix_cfg, Mapping):
            raise ConfigError(f"mix_cfg must be a dict {{layer name or pattern: scheme}}, got a "
                              f"{type(self.mix_cfg).__name__}: {self.mix_cfg!r}")
        self.mix_cfg = dict(self.mix_cfg or {})
        for key, value in self.mix_cfg.items():
            if not isinstance(key, str):
                raise ConfigError(f"mix_cfg keys must be layer names or patterns (str), got {key!r}")
            try:
                if value not in self.custom_schemes:
                    check_scheme_name(value)
            except ConfigError as exc:
                raise ConfigError(f"mix_cfg[{key!r}]: {exc}") from None

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        layers = quantizable_nodes(gm, self.extra_layer_types)
        names = [n.target for n in layers]
        model_names = list(self.model_layers) or names  # first / last layer and name checks: the whole model's
        self._check_names(model_names)
        first = model_names[0] if model_names else None
        last = model_names[-1] if model_names else None
        self.decisions = {}
        for node in layers:
            scheme, reason = self._decide(node.target, module_of(gm, node), first, last)
            self._record(node, scheme, reason)
        for node in gm.graph.nodes:
            if isinstance(module_of(gm, node), SMALL_OP_TYPES):
                if node.target in self.mix_cfg:
                    self._record(node, self.mix_cfg[node.target], "mix_cfg exact name")
                else:
                    self._record(node, self.small_op_scheme, "small_op_scheme")
        for pattern in self.mix_cfg:
            if not any(fnmatchcase(n, pattern) for n in model_names):
                log.warning("mix_cfg entry %r matches no quantizable layer", pattern)
        return gm

    @staticmethod
    def _check_name_list(label: str, names: object) -> None:
        if isinstance(names, str):
            raise ConfigError(f"{label} must be a list of layer names, got the string {names!r} "
                              f"(write [{names!r}])")
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{label} must be a list of layer names (str), got {names!r}")

    def _record(self, node: fx.Node, scheme: str, reason: str) -> None:
        meta = fxq_meta(node)
        meta["scheme"], meta["reason"] = scheme, reason
        self.decisions[node.target] = (scheme, reason)

    def _check_names(self, names: list[str]) -> None:
        if not self.strict_names:
            return
        known = set(names)
        for label, given in (("disable_names", self.disable_names), ("rollback_names", self.rollback_names)):
            for name in given:
                if name not in known:
                    close = difflib.get_close_matches(name, names, n=3)
                    hint = f"; did you mean {', '.join(close)}?" if close else ""
                    raise ConfigError(f"{label} entry {name!r} names no quantizable layer "
                                      f"({len(names)} layers: Linear/Conv1d/Conv2d){hint}")

    def _decide(self, name: str, module: torch.nn.Module, first: str | None, last: str | None) -> tuple[str, str]:
        if name in self.disable_names:
            return "float", "disable_names"
        if name in self.rollback_names:
            return "float", "automatic rollback (disable_level)"
        if self.disabled_types and isinstance(module, self.disabled_types):
            return "float", f"disabled module type {type(module).__name__}"
        for pattern in self.disabled_submodules:
            if fnmatchcase(name, pattern) or fnmatchcase(name, pattern.rstrip("*") + ".*") \
                    or name == pattern:
                return "float", f"disabled submodule {pattern!r}"
        if self.disable_last_layer and name == last:
            return "float", "last layer stays float (disable_last_linear)"
        if self.disable_first_layer and name == first:
            return "float", "first layer stays float"
        if name in self.mix_cfg:
            return self.mix_cfg[name], "mix_cfg exact name"
        for pattern, scheme in self.mix_cfg.items():
            if fnmatchcase(name, pattern):
                return scheme, f"mix_cfg pattern {pattern!r}"
        return self.default, "default"
