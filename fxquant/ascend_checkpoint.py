"""Save a quantized model as an Ascend-ready checkpoint (msModelSlim / vllm-ascend) and load it back."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import fx

from fxquant.kernels import AscendOps

from .ascend_format import attention_tensors, layer_tensors, quant_type
from .ascend_modules import build_ascend_linear
from .errors import ConfigError, FxquantError
from .ir import get_attr_path
from .quant_opr import QAttentionInput, QLinear, QuantOpr
from .safetensors_io import AtomicFolderWriter, read_safetensors_folder, write_safetensors
from .timestep import TimestepQuantizer

log = logging.getLogger(__name__)

SAVE_TYPES = ("safe_tensor", "ascendV1")
ASCEND_V1_DESCRIPTION = "quant_model_description.json"
NON_TENSOR_KEYS = ("model_quant_type", "fa_quant_type", "timestep_sep", "version")


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """dtype of the model's first floating parameter (float32 if none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def ascend_state(gm: fx.GraphModule, float_model: torch.nn.Module,
                 default_scheme: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, description) of the whole model: quantized linears in the Ascend format, every
    other tensor of float_model's state_dict under its own name as FLOAT, taken from the graph
    module where a pass replaced it (a norm weight with smoothing scales folded in)."""
    dtype = model_dtype(float_model)
    tensors = {k: _graph_tensor(gm, k, v) for k, v in float_model.state_dict().items()}
    types = dict.fromkeys(tensors, "FLOAT")
    extra: dict[str, str] = {}
    for name, module in gm.named_modules():
        if not isinstance(module, QuantOpr):
            continue
        if isinstance(module, QAttentionInput):
            for suffix, t in attention_tensors(module).items():
                tensors[f"{name}.{suffix}"] = t
                types[f"{name}.{suffix}"] = "FAKQuant"
            extra["fa_quant_type"] = "FAKQuant"
            continue
        if not isinstance(module, QLinear):
            log.warning("%s (%s) has no Ascend weight format; saved float", name, type(module).__name__)
            continue
        kind, layer = layer_tensors(module, dtype)
        for suffix in ("weight", "bias"):
            tensors.pop(f"{name}.{suffix}", None)
            types.pop(f"{name}.{suffix}", None)
        for suffix, t in layer.items():
            tensors[f"{name}.{suffix}"] = t
            types[f"{name}.{suffix}"] = kind
    timestep = [m for m in gm.modules() if isinstance(m, TimestepQuantizer)]
    if timestep:
        extra["timestep_sep"] = timestep[0].spec.timestep_sep
    description = {"model_quant_type": quant_type(default_scheme), **extra, **types}
    return tensors, description


def _graph_tensor(gm: fx.GraphModule, name: str, original: torch.Tensor) -> torch.Tensor:
    """The tensor `name` as the graph module now holds it, else `original`."""
    try:
        value = get_attr_path(gm, name)
    except AttributeError:
        return original
    if isinstance(value, torch.Tensor) and value.shape == original.shape:
        return value.detach()
    return original


def save_ascend(gm: fx.GraphModule, float_model: torch.nn.Module, output_path: str | os.PathLike,
                default_scheme: str, save_type: list[str] | None = None, safetensors_name: str | None = None,
                json_name: str | None = None, part_file_size: float | None = None) -> list[str]:
    """Write weights + description (+ the HF config.json when the model has one) atomically.

    save_type: "safe_tensor" writes quant_model_description_<scheme>.json, "ascendV1" writes
    quant_model_description.json (what vllm-ascend reads); both may be given. Returns file names.
    """
    save_type = list(save_type or ["safe_tensor"])
    bad = [t for t in save_type if t not in SAVE_TYPES]
    if bad or not save_type:
        raise ConfigError(f"unknown save_type {bad or save_type}; valid: {', '.join(SAVE_TYPES)}")
    suffix = default_scheme.lower()
    weights_name = safetensors_name or f"quant_model_weight_{suffix}.safetensors"
    json_names = []
    if "safe_tensor" in save_type:
        json_names.append(json_name or f"quant_model_description_{suffix}.json")
    if "ascendV1" in save_type:
        json_names.append(ASCEND_V1_DESCRIPTION)
    tensors, description = ascend_state(gm, float_model, default_scheme)
    written: list[str] = []
    with AtomicFolderWriter(output_path) as writer:
        written += write_safetensors(writer, tensors, weights_name, part_file_size)
        for name in dict.fromkeys(json_names):
            writer.write_text(name, json.dumps(description, indent=2))
            written.append(name)
        config = getattr(float_model, "config", None)
        if config is not None and hasattr(config, "to_json_string"):
            writer.write_text("config.json", config.to_json_string())
            written.append("config.json")
    log.info("saved %d tensors to %s: %s", len(tensors), output_path, ", ".join(written))
    return written


def read_description(path: str | os.PathLike, json_name: str | None = None) -> dict[str, str]:
    """The description JSON of a saved folder (json_name, else quant_model_description.json, else
    the only quant_model_description_*.json)."""
    folder = Path(path)
    if json_name is not None:
        candidates = [folder / json_name]
    elif (folder / ASCEND_V1_DESCRIPTION).exists():
        candidates = [folder / ASCEND_V1_DESCRIPTION]
    else:
        candidates = sorted(folder.glob("quant_model_description_*.json"))
    if len(candidates) != 1 or not candidates[0].exists():
        found = [p.name for p in candidates]
        raise FxquantError(f"expected one description JSON in {folder}, found {found or 'none'}; pass json_name")
    return json.loads(candidates[0].read_text())


def load_ascend(model: torch.nn.Module, path: str | os.PathLike, json_name: str | None = None,
                ops: AscendOps | None = None) -> torch.nn.Module:
    """Rebuild `model` (the float architecture) from a saved Ascend folder: quantized linears become
    Ascend runtime modules, every FLOAT tensor is loaded by name. Returns the model in eval mode."""
    description = read_description(path, json_name)
    tensors = read_safetensors_folder(path)
    types = {k: v for k, v in description.items() if k not in NON_TENSOR_KEYS}
    if set(types) != set(tensors):
        only_desc, only_file = sorted(set(types) - set(tensors)), sorted(set(tensors) - set(types))
        raise FxquantError(f"description and weights disagree: described but not saved {only_desc[:5]}, "
                           f"saved but not described {only_file[:5]}")
    layers = sorted(k[: -len(".weight")] for k, t in types.items() if k.endswith(".weight") and t != "FLOAT")
    for name in layers:
        prefix = name + "."
        parts = {k[len(prefix):]: tensors[k] for k in tensors if k.startswith(prefix) and "." not in k[len(prefix):]}
        target = model.get_submodule(name)
        if not isinstance(target, torch.nn.Linear) or tuple(parts["weight"].shape) != tuple(target.weight.shape):
            raise FxquantError(f"saved layer {name} {tuple(parts['weight'].shape)} does not match the model's "
                               f"{type(target).__name__} {tuple(getattr(target, 'weight', torch.empty(0)).shape)}")
        model.set_submodule(name, build_ascend_linear(types[prefix + "weight"], parts, ops))
    float_state = {k: t for k, t in tensors.items() if types[k] == "FLOAT"}
    result = model.load_state_dict(float_state, strict=False)
    quantized_prefixes = tuple(n + "." for n in layers)
    missing = [k for k in result.missing_keys if not k.startswith(quantized_prefixes)]
    if missing or result.unexpected_keys:
        raise FxquantError(f"checkpoint does not match the model: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    return model.eval()
