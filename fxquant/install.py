"""Install a quantized GraphModule's layers into the model it was captured from.

The model then keeps its own Python forward and everything around it (Hugging Face generate()
with its KV cache, hooks, attributes) while its layers compute quantized. This works when the
quantized graph differs from the model only in modules and tensors at the model's own names:
quantized layers (QLinear / QConv), smoothed norms and layers, rescaled weights. Graph rewrites
with no place in the model (small-op quantization, fa3 attention inputs, runtime smoothing
scales, folded BatchNorm) stay in the GraphModule and are refused with the reason.
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from .errors import ConfigError
from .hadamard import RotatedInput, online_rotations
from .ir import get_attr_path
from .quant_opr import QuantOpr
from .resources import release_unused_memory
from .save_pretrained_guard import refuse_save_pretrained
from .weighted_quant_opr import WeightedQuantOpr

log = logging.getLogger(__name__)


def apply(model: torch.nn.Module, qmodel: fx.GraphModule) -> torch.nn.Module:
    """Write `qmodel`'s quantized layers (and the tensors its passes rescaled) into `model` in
    place, under the layers' original names; returns `model`. `qmodel` must come from
    fxquant.quantize(model, ...) (or the passes) on this model. Then releases what the replaced
    float layers held (fxquant.resources.release_unused_memory). Raises ConfigError naming every
    part of the graph that has no counterpart in the model."""
    if qmodel.meta.get("fxquant_folded_bn"):
        raise ConfigError("the quantized graph folded BatchNorm layers into convolutions "
                          f"({len(qmodel.meta['fxquant_folded_bn'])} of them); use the GraphModule itself")
    modules, tensors, problems = [], [], []
    rotations = online_rotations(qmodel)
    for node in qmodel.graph.nodes:
        if node.op == "call_module":
            new = qmodel.get_submodule(node.target)
            if node in rotations.values():
                continue  # installed with the layer it feeds
            try:
                old = model.get_submodule(node.target)
            except AttributeError:
                old = None
            if node in rotations and old is not None and (old is new or _can_replace(old, new)):
                modules.append((node.target, RotatedInput(qmodel.get_submodule(rotations[node].target), new)))
                continue
            if old is new or (old is None and _stateless(new)):
                continue  # float small ops, export's guards: what the model's own code computes
            if old is None or not _can_replace(old, new):
                what = type(new).__name__ + (f" ({new.scheme})" if isinstance(new, QuantOpr) else "")
                problems.append(f"{node.target}: {what} has no counterpart in the model"
                                + ("" if old is None else f" (there: {type(old).__name__})"))
                continue
            modules.append((node.target, new))
        elif node.op == "get_attr":
            new = get_attr_path(qmodel, node.target)
            try:
                old = get_attr_path(model, node.target)
            except AttributeError:
                old = None
            if old is new or not isinstance(new, torch.Tensor):
                continue
            if not isinstance(old, torch.Tensor) or old.shape != new.shape:
                problems.append(f"{node.target}: tensor {tuple(new.shape)} has no counterpart in the model")
                continue
            tensors.append((node.target, new))
    if problems:
        raise ConfigError("cannot install the quantized graph into " + type(model).__name__ + ":\n"
                          + "\n".join(f"  - {p}" for p in problems)
                          + "\nquantize with small_op_scheme='float', attention_quant=False and a suppression "
                            "that folds into weights, or use the GraphModule itself")
    for target, module in modules:
        _set(model, target, module)
    for target, tensor in tensors:
        _set(model, target, tensor)
    log.info("installed %d modules and %d tensors of the quantized graph into %s",
             len(modules), len(tensors), type(model).__name__)
    refuse_save_pretrained(model, "Save it with torch.save(model) (reload with torch.load(..., weights_only=False), "
                                  "same fxquant and torch versions), or save the quantized GraphModule as an Ascend "
                                  "checkpoint before installing it (fxquant.save_ascend; fxquant.load_ascend reloads "
                                  "it into the float model).")
    release_unused_memory(model)
    return model


def _stateless(module: torch.nn.Module) -> bool:
    """A float helper module with no tensors of its own (e.g. the Add of x + y)."""
    return not isinstance(module, QuantOpr) and next(iter(module.state_dict()), None) is None


def _can_replace(old: torch.nn.Module, new: torch.nn.Module) -> bool:
    """A quantized layer for its float layer, or a module of the same type (e.g. rescaled)."""
    if isinstance(new, WeightedQuantOpr):
        return isinstance(old, new.float_type) and tuple(old.weight.shape) == new.weight_shape
    if isinstance(new, QuantOpr):
        return False  # small ops and attention inputs are graph nodes, not model attributes
    return type(old) is type(new)


def _set(model: torch.nn.Module, target: str, value: torch.nn.Module | torch.Tensor) -> None:
    parent_name, _, leaf = target.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(value, torch.Tensor) and leaf in parent._parameters:
        param = value if isinstance(value, torch.nn.Parameter) else torch.nn.Parameter(value, requires_grad=False)
        parent._parameters[leaf] = param
    elif isinstance(value, torch.Tensor) and leaf in parent._buffers:
        parent._buffers[leaf] = value
    else:
        setattr(parent, leaf, value)
