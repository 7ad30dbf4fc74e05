"""linger.constrain: float training with clamped weights, biases and outputs, so that the trained
model quantizes with less loss (seed 001, clamp_info)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .config import ClampInfo, LingerConfig
from .selection import check_disable_module, check_disable_submodel, is_disabled, load_config


class _Constrained:
    """Mixin of a Linear / Conv layer whose forward clamps: weight to +-clamp_weight_value, else to
    +-clamp_factor_value * mean|W| (the bound itself carries no gradient); bias to
    +-clamp_bias_value; output to +-clamp_activation_value. None turns a clamp off."""

    clamp: ClampInfo

    def clamped_weight(self) -> torch.Tensor:
        w, c = self.weight, self.clamp
        if c.clamp_weight_value is not None:
            return torch.clamp(w, -c.clamp_weight_value, c.clamp_weight_value)
        if c.clamp_factor_value is not None:
            bound = (w.detach().abs().mean() * c.clamp_factor_value).item()
            return torch.clamp(w, -bound, bound)
        return w

    def clamped_bias(self) -> torch.Tensor | None:
        b, c = self.bias, self.clamp
        if b is None or c.clamp_bias_value is None:
            return b
        return torch.clamp(b, -c.clamp_bias_value, c.clamp_bias_value)

    def clamp_output(self, y: torch.Tensor) -> torch.Tensor:
        v = self.clamp.clamp_activation_value
        return y if v is None else torch.clamp(y, -v, v)

    def to_plain(self) -> torch.nn.Module:
        """The layer as its torch class, holding the clamped weight and bias (output clamp dropped:
        the quantizer's range takes its place)."""
        plain = copy.copy(self)
        plain.__class__ = self._plain_class
        plain._parameters = dict(self._parameters)
        with torch.no_grad():
            plain.weight = torch.nn.Parameter(self.clamped_weight().detach().clone(),
                                              requires_grad=self.weight.requires_grad)
            if self.bias is not None:
                plain.bias = torch.nn.Parameter(self.clamped_bias().detach().clone(),
                                                requires_grad=self.bias.requires_grad)
        del plain.__dict__["clamp"]
        return plain


class ConstrainedLinear(_Constrained, torch.nn.Linear):
    _plain_class = torch.nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clamp_output(F.linear(x, self.clamped_weight(), self.clamped_bias()))


class ConstrainedConv1d(_Constrained, torch.nn.Conv1d):
    _plain_class = torch.nn.Conv1d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clamp_output(self._conv_forward(x, self.clamped_weight(), self.clamped_bias()))


class ConstrainedConv2d(_Constrained, torch.nn.Conv2d):
    _plain_class = torch.nn.Conv2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clamp_output(self._conv_forward(x, self.clamped_weight(), self.clamped_bias()))


_CONSTRAINED = {torch.nn.Linear: ConstrainedLinear, torch.nn.Conv1d: ConstrainedConv1d,
                torch.nn.Conv2d: ConstrainedConv2d}


def constrain(model: torch.nn.Module, config_file: str | None = None, disable_module: Sequence[type] = (),
              disable_submodel: Sequence[str] = (), *, config: LingerConfig | None = None) -> torch.nn.Module:
    """A copy of `model` whose Linear / Conv1d / Conv2d layers clamp as clamp_info says while it
    trains (same parameters' values, same names: its state_dict loads into the float model and
    into init's prepared model). disable_module / disable_submodel as in init."""
    cfg = load_config(config_file, config)
    types = check_disable_module(disable_module)
    patterns = check_disable_submodel(model, disable_submodel)
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        cls = _CONSTRAINED.get(type(m))
        if cls is None or isinstance(m, types) or is_disabled(name, patterns):
            continue
        m.__class__ = cls
        m.clamp = copy.deepcopy(cfg.clamp_info)
    return model


def strip_constraints(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every constrained layer replaced by its torch class holding the clamped weights."""
    if isinstance(model, _Constrained):
        return model.to_plain()
    for name, m in list(model.named_modules()):
        if isinstance(m, _Constrained) and name:
            model.set_submodule(name, m.to_plain())
    return model
