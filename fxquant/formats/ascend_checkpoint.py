"""Save a quantized model as an Ascend-ready checkpoint (msModelSlim / vllm-ascend) and load it back."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import fx

from fxquant.kernels import AscendOps

from ..errors import ConfigError, FxquantError
from ..hadamard import KroneckerRotation, RotatedInput, online_rotations
from ..ir import get_attr_path, set_tensor
from ..quant_opr import QAttentionInput, QuantOpr
from ..quantizer import StaticQuantizer
from ..resources import release_unused_memory
from ..save_pretrained_guard import refuse_save_pretrained
from ..timestep import TimestepQuantizer
from .ascend_format import attention_tensors, layer_tensors, quant_type, savable
from .ascend_modules import ASCEND_MODULES, build_ascend_layer
from .safetensors_io import AtomicFolderWriter, read_safetensors_folder, write_safetensors

log = logging.getLogger(__name__)

SAVE_TYPES = ("safe_tensor", "ascendV1")
ASCEND_V1_DESCRIPTION = "quant_model_description.json"
NON_TENSOR_KEYS = ("model_quant_type", "fa_quant_type", "timestep_sep", "version", "metadata")
#: msModelSlim's tensors of a layer's online input rotation x -> M^T X N (x viewed [..., m, p]),
#: float32, listed in the description's metadata.quarot.kronecker_rotation.layers, not described per tensor
KRONECKER_SUFFIXES = ("kronecker_rotation_m", "kronecker_rotation_n")
#: the tensors each saved layer type must have, and the dtypes fixed by the format
LAYER_TENSORS = {
    "W8A8": ("weight", "input_scale", "input_offset", "quant_bias", "deq_scale", "weight_scale", "weight_offset"),
    "W8A8_TIMESTEP": ("weight", "input_scale", "input_offset", "quant_bias", "deq_scale", "weight_scale",
                      "weight_offset"),
    "W8A8_DYNAMIC": ("weight", "weight_scale", "weight_offset"),
    "W8A16": ("weight", "weight_scale", "weight_offset"),
    "W4A16": ("weight", "weight_scale", "weight_offset"),
}
LAYER_DTYPES = {kind: {"weight": torch.int8, **({"quant_bias": torch.int32} if "quant_bias" in names else {})}
                for kind, names in LAYER_TENSORS.items()}
TENSOR_TYPES = ("FLOAT", *LAYER_TENSORS, "FAKQuant", "FOLDED")


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """dtype of the model's first floating parameter (float32 if none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def ascend_state(gm: fx.GraphModule, float_model: torch.nn.Module,
                 default_scheme: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, description) of the whole model: quantized linears in the Ascend format, every
    other tensor of float_model's state_dict under its own name as FLOAT, taken from the graph
    module where a pass replaced it (a norm weight with smoothing scales folded in)."""
    dtype = model_dtype(float_model)
    folded = {bn: layer for bn, layer in gm.meta.get("fxquant_folded_bn", {}).items()
              if isinstance(gm.get_submodule(layer), QuantOpr)}  # float layers keep their BatchNorm
    unfolded = tuple(f"{layer}." for bn, layer in gm.meta.get("fxquant_folded_bn", {}).items() if bn not in folded)
    quantized = {f"{name}.{suffix}" for name, module in gm.named_modules()
                 if isinstance(module, QuantOpr) and not isinstance(module, QAttentionInput) and savable(module)
                 for suffix in ("weight", "bias")}  # saved in the layer's format below: their float
    # values are not read (a frozen layer would dequantize its codes into a float copy for each)
    tensors = {k: v if k.startswith(unfolded) else _graph_tensor(gm, path, v)
               for k, (path, v) in _model_state(float_model).items() if k not in quantized}
    types = dict.fromkeys(tensors, "FLOAT")
    extra: dict[str, str] = {}
    _warn_rounding_differs(gm)
    for name, module in gm.named_modules():
        if not isinstance(module, QuantOpr):
            continue
        if isinstance(module, QAttentionInput):
            for suffix, t in attention_tensors(module).items():
                tensors[f"{name}.{suffix}"] = t
                types[f"{name}.{suffix}"] = "FAKQuant"
            extra["fa_quant_type"] = "FAKQuant"
            continue
        if not savable(module):
            log.warning("%s (%s, %s) has no Ascend weight format; saved float", name,
                        type(module).__name__, module.scheme)
            continue
        kind, layer = layer_tensors(module, dtype)
        for suffix, t in layer.items():
            tensors[f"{name}.{suffix}"] = t
            types[f"{name}.{suffix}"] = kind
    for bn in folded:
        for key in [k for k in types if k.startswith(bn + ".")]:
            types[key] = "FOLDED"  # already inside the preceding layer's weights
    timestep = [m for m in gm.modules() if isinstance(m, TimestepQuantizer)]
    if timestep:
        extra["timestep_sep"] = timestep[0].spec.timestep_sep
    description = {"model_quant_type": quant_type(default_scheme), **extra, **types}
    rotated, layers = _online_rotation_tensors(gm)
    if layers:
        tensors.update(rotated)
        # the rotation mixes all of a layer's input channels: a tensor-parallel shard of the layer
        # would need its peers' inputs, so the checkpoint is valid for tp_size 1
        description["metadata"] = {"quarot": {"max_tp_size": 1, "heads_rotation": {"layers": []},
                                              "kronecker_rotation": {"layers": layers}}}
    return tensors, description


def _warn_rounding_differs(gm: fx.GraphModule) -> None:
    """Log a warning naming the static layers whose inputs round as ONNX does, round(x / s) + z:
    Ascend's npu_quantize rounds x / s + z in one step, so with a zero point the reloaded layer
    takes other codes where the two differ (ties, and float sums that cross a half), and a static
    model amplifies those flips (SmolLM2 w8a8: 84% top-1 agreement with the reload)."""
    differ = [name for name, module in gm.named_modules()
              if isinstance(module, QuantOpr) and not isinstance(module, QAttentionInput) and savable(module)
              and isinstance(aq := module.input_quantizer, StaticQuantizer) and aq.enabled and aq.calibrated
              and not aq.spec.offset_in_rounding and bool((aq.zero_point != 0).any())]
    if differ:
        log.warning("%d layers (e.g. %s) round their inputs as ONNX does, round(x / s) + offset; the Ascend "
                    "checkpoint rounds x / s + offset together, so the reloaded model will not reproduce "
                    "this one. For an Ascend-bound model quantize with "
                    "SchemeOptions(offset_in_rounding=True) (the Calibrator, the session and "
                    "`fxquant quantize --format ascend` do).", len(differ), ", ".join(differ[:3]))


def _online_rotation_tensors(gm: fx.GraphModule) -> tuple[dict[str, torch.Tensor], list[str]]:
    """({"<layer>.kronecker_rotation_m" / "_n": M / N float32}, ["<layer>.", ...]) of the layers whose
    input a KroneckerRotation rotates online; ConfigError for a transform that feeds anything else."""
    rotations = online_rotations(gm)
    stray = [n.target for n in gm.graph.nodes if n.op == "call_module"
             and isinstance(gm.get_submodule(n.target), KroneckerRotation) and n not in rotations.values()]
    if stray:
        raise ConfigError(f"the Ascend checkpoint stores an online rotation only as the input rotation of one "
                          f"layer (kronecker_rotation_m / _n), but {stray[0]} feeds something else; export the "
                          "QDQ ONNX, which expresses it")
    tensors = {}
    for layer, node in rotations.items():
        transform = gm.get_submodule(node.target)
        tensors[f"{layer.target}.{KRONECKER_SUFFIXES[0]}"] = transform.left.detach().float().clone()
        tensors[f"{layer.target}.{KRONECKER_SUFFIXES[1]}"] = transform.right.detach().float().clone()
    return tensors, sorted(f"{layer.target}." for layer in rotations)


def _model_state(model: torch.nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    """{checkpoint name: (path in `model`, tensor)}: model.state_dict()'s names, or, for a graph
    fxquant.capture made, the state_dict names of the model it was captured from."""
    names = model.meta.get("fxquant_state_names") if isinstance(model, fx.GraphModule) else None
    if names is None:
        return {name: (name, t) for name, t in model.state_dict().items()}
    return {name: (path, get_attr_path(model, path).detach()) for name, path in names.items()}


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
    if isinstance(save_type, str):
        raise ConfigError(f"save_type must be a list of save types, got the string {save_type!r} "
                          f"(write [{save_type!r}]); valid: {', '.join(SAVE_TYPES)}")
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
    config = getattr(float_model, "config", None)
    has_config = config is not None and hasattr(config, "to_json_string")
    names = [weights_name, *dict.fromkeys(json_names)] + (["config.json"] if has_config else [])
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash or not weights_name.endswith(".safetensors") or any(not n.endswith(".json") for n in json_names):
        raise ConfigError(f"file names {names} must be distinct, the weights ending in .safetensors and "
                          f"the descriptions in .json (clash: {clash or 'none'})")
    tensors, description = ascend_state(gm, float_model, default_scheme)
    written: list[str] = []
    stale = [p for p in Path(output_path).glob("quant_model_*") if p.is_file()] if Path(output_path).is_dir() else []
    with AtomicFolderWriter(output_path) as writer:
        written += write_safetensors(writer, tensors, weights_name, part_file_size)
        for name in dict.fromkeys(json_names):
            writer.write_text(name, json.dumps(description, indent=2))
            written.append(name)
        if has_config:
            writer.write_text("config.json", config.to_json_string())
            written.append("config.json")
        # an earlier checkpoint's files (another scheme, other shards) would confuse loading
        writer.remove_on_commit([p for p in stale if p.name not in written])
    log.info("saved %d tensors to %s: %s", len(tensors), output_path, ", ".join(written))
    return written


def read_description(path: str | os.PathLike, json_name: str | None = None) -> dict[str, Any]:
    """The description JSON of a saved folder (json_name, else quant_model_description.json, else
    the only quant_model_description_*.json), checked to be a flat {tensor name: type} object."""
    folder = Path(path)
    if not folder.is_dir():
        raise FxquantError(f"no checkpoint folder {folder}")
    if json_name is not None:
        candidates = [folder / json_name]
    elif (folder / ASCEND_V1_DESCRIPTION).exists():
        candidates = [folder / ASCEND_V1_DESCRIPTION]
    else:
        candidates = sorted(folder.glob("quant_model_description_*.json"))
    if len(candidates) != 1 or not candidates[0].exists():
        found = [p.name for p in candidates]
        raise FxquantError(f"expected one description JSON in {folder}, found {found or 'none'}; pass json_name")
    path = candidates[0]
    try:
        description = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FxquantError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(description, dict):
        raise FxquantError(f"{path}: expected a JSON object {{tensor name: type}}, got a {type(description).__name__}")
    bad = {k: v for k, v in description.items()
           if k not in NON_TENSOR_KEYS and v not in TENSOR_TYPES}
    if bad:
        name, value = next(iter(bad.items()))
        raise FxquantError(f"{path}: tensor {name!r} has type {value!r}; valid: {', '.join(TENSOR_TYPES)}")
    return description


def _check_layer(name: str, kind: str, parts: dict[str, torch.Tensor], types: dict[str, str], where: str) -> None:
    """Raise FxquantError naming the tensor when a saved layer's tensors contradict its type."""
    for suffix in parts:
        if types[f"{name}.{suffix}"] != kind:
            raise FxquantError(f"{where}: {name}.{suffix} is described as {types[f'{name}.{suffix}']} but "
                               f"{name}.weight as {kind}")
    missing = [s for s in LAYER_TENSORS[kind] if s not in parts]
    if missing:
        raise FxquantError(f"{where}: {kind} layer {name} has no {', '.join(f'{name}.{s}' for s in missing)}")
    for suffix, dtype in LAYER_DTYPES.get(kind, {}).items():
        if parts[suffix].dtype != dtype:
            raise FxquantError(f"{where}: {name}.{suffix} is {parts[suffix].dtype}, but a {kind} layer "
                               f"stores it as {dtype}")


def load_ascend(model: torch.nn.Module, path: str | os.PathLike, json_name: str | None = None,
                ops: AscendOps | None = None) -> torch.nn.Module:
    """Rebuild `model` (the float architecture) from a saved Ascend folder: quantized linears and
    convolutions become Ascend runtime modules, every FLOAT tensor is loaded by name. Returns the
    model in eval mode.

    All or nothing: the checkpoint is read and checked against the model (names, types, dtypes,
    shapes) before anything changes; a failure leaves `model` as it was. Loading into a model that
    already holds Ascend modules is an error.
    """
    already = [n for n, m in model.named_modules() if isinstance(m, ASCEND_MODULES)]
    if already:
        raise FxquantError(f"{type(model).__name__} already holds Ascend layers (e.g. {already[0]!r}); "
                           "load into a fresh float model")
    description = read_description(path, json_name)
    tensors = read_safetensors_folder(path)
    where = str(path)
    types = {k: v for k, v in description.items() if k not in NON_TENSOR_KEYS}
    rotations = _read_online_rotations(description, tensors, where)  # takes their tensors out
    if set(types) != set(tensors):
        only_desc, only_file = sorted(set(types) - set(tensors)), sorted(set(tensors) - set(types))
        raise FxquantError(f"{where}: description and weights disagree: described but not saved {only_desc[:5]}, "
                           f"saved but not described {only_file[:5]}")
    layers = sorted(k[: -len(".weight")] for k, t in types.items() if k.endswith(".weight") and t in LAYER_TENSORS)
    replacements: dict[str, torch.nn.Module] = {}
    for name in layers:
        prefix = name + "."
        parts = {k[len(prefix):]: tensors[k] for k in tensors if k.startswith(prefix) and "." not in k[len(prefix):]}
        kind = types[prefix + "weight"]
        _check_layer(name, kind, parts, types, where)
        try:
            target = model.get_submodule(name)
        except AttributeError:
            raise FxquantError(f"{where}: saved layer {name} is not a module of {type(model).__name__}") from None
        replacements[name] = build_ascend_layer(kind, parts, target, ops)
    folded = sorted({k.rsplit(".", 1)[0] for k, t in types.items() if t == "FOLDED"})
    for name in folded:  # a BatchNorm folded into its layer at save time: now the identity
        replacements[name] = torch.nn.Identity()
    quantized_prefixes = tuple(n + "." for n in [*layers, *folded])
    float_state = {k: t for k, t in tensors.items() if types[k] == "FLOAT"}
    own = model.state_dict()
    expected = {k for k in own if not k.startswith(quantized_prefixes)}
    missing, unexpected = sorted(expected - set(float_state)), sorted(set(float_state) - set(own))
    if missing or unexpected:
        raise FxquantError(f"{where}: checkpoint does not match {type(model).__name__}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    for k, t in float_state.items():
        if t.shape != own[k].shape or t.is_floating_point() != own[k].is_floating_point():
            raise FxquantError(f"{where}: FLOAT tensor {k} is {t.dtype} {tuple(t.shape)}, the model's is "
                               f"{own[k].dtype} {tuple(own[k].shape)}")
    for name, transform in rotations.items():
        try:
            width = replacements[name].in_features if name in replacements else model.get_submodule(name).in_features
        except AttributeError:
            raise FxquantError(f"{where}: rotated layer {name} is not a Linear of {type(model).__name__}") from None
        if transform.n != width:
            raise FxquantError(f"{where}: {name}'s online rotation is of order {transform.n}, its input has {width} "
                               "channels")
    for name, module in replacements.items():  # every check passed: now change the model
        model.set_submodule(name, module)
    _untie_differing(model, own, float_state)
    model.load_state_dict(float_state, strict=False)
    for name, transform in rotations.items():
        model.set_submodule(name, RotatedInput(transform, model.get_submodule(name)))
    release_unused_memory(model)  # the float layers just replaced may share a file mapping with what stays
    refuse_save_pretrained(model, f"The checkpoint it was loaded from ({os.fspath(path)}) is its saved form; "
                                  "torch.save(model) also keeps it.")
    return model.eval()


def _read_online_rotations(description: dict[str, Any], tensors: dict[str, torch.Tensor],
                           where: str) -> dict[str, KroneckerRotation]:
    """{layer name: its online input rotation} from metadata.quarot of a description, popping each
    layer's kronecker_rotation_m / _n from `tensors`. FxquantError for what this loader cannot run
    (heads_rotation) or a listed layer without both factors."""
    metadata = description.get("metadata") or {}
    quarot = metadata.get("quarot") or {} if isinstance(metadata, dict) else None
    if not isinstance(quarot, dict) or not all(isinstance(quarot.get(k, {}), dict)
                                               for k in ("heads_rotation", "kronecker_rotation")):
        raise FxquantError(f"{where}: metadata.quarot must be {{\"heads_rotation\": {{\"layers\": [...]}}, "
                           f"\"kronecker_rotation\": {{\"layers\": [...]}}}}, got {description.get('metadata')!r:.200}")
    heads = (quarot.get("heads_rotation") or {}).get("layers") or []
    if heads:
        raise FxquantError(f"{where}: online heads_rotation of o_proj inputs ({heads[0]}, ...) is not supported "
                           "here; supported: kronecker_rotation")
    out = {}
    for layer in (quarot.get("kronecker_rotation") or {}).get("layers") or []:
        name = layer.rstrip(".")
        keys = [f"{name}.{s}" for s in KRONECKER_SUFFIXES]
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise FxquantError(f"{where}: metadata.quarot lists {name} as rotated online, but {missing[0]} is not saved")
        try:
            out[name] = KroneckerRotation(*(tensors.pop(k) for k in keys))
        except ValueError as exc:
            raise FxquantError(f"{where}: {name}: {exc}") from None
    return out


def _untie_differing(model: torch.nn.Module, own: dict[str, torch.Tensor], float_state: dict[str, torch.Tensor]) -> None:
    """Give a tensor its own storage where the model ties it to another name but the checkpoint
    holds different values for the two (a rotated model's embedding table and head): loading would
    otherwise write one over the other."""
    by_storage: dict[int, list[str]] = {}
    for k, t in own.items():
        if k in float_state:
            by_storage.setdefault(t.data_ptr(), []).append(k)
    for keys in by_storage.values():
        first = float_state[keys[0]]
        for k in keys[1:]:
            if not torch.equal(float_state[k], first):
                log.info("untying %s from %s: the checkpoint holds different values", k, keys[0])
                set_tensor(model, k, torch.nn.Parameter(own[k].detach().clone(), requires_grad=False))
