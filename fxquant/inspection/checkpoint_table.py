"""What each layer of a saved artifact is: an Ascend checkpoint folder or a QDQ ONNX file."""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fxquant.formats.ascend_checkpoint import NON_TENSOR_KEYS, read_description
from fxquant.formats.safetensors_io import read_safetensors_folder

from .text_table import text_table


@dataclass
class SavedLayer:
    """One layer of a saved artifact: its type (W8A8, W8A8_DYNAMIC, W8A16, W4A16, FLOAT, ...), the
    stored weight's dtype and shape, and its quantization parameters' ranges."""

    name: str
    type: str
    weight_dtype: str
    weight_shape: tuple[int, ...]
    weight_scale_min: float | None = None
    weight_scale_max: float | None = None
    group_size: int | None = None
    input_scale: float | None = None
    input_offset: float | None = None
    nbytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SavedModelTable:
    """Rows of a saved artifact, with its format and path."""

    path: str
    format: str
    rows: list[SavedLayer]

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def to_dicts(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.rows]

    def __str__(self) -> str:
        kinds = Counter(r.type for r in self.rows)
        total = sum(r.nbytes for r in self.rows)
        head = (f"{self.path} ({self.format}): {len(self.rows)} weights, "
                + ", ".join(f"{k} {c}" for k, c in kinds.most_common()) + f"; {total / 2**20:.1f} MiB")
        headers = ["layer", "type", "weight", "shape", "w scale min", "w scale max", "group", "in scale",
                   "in offset"]
        rows = [[r.name, r.type, r.weight_dtype, "x".join(map(str, r.weight_shape)), r.weight_scale_min,
                 r.weight_scale_max, r.group_size, r.input_scale, r.input_offset] for r in self.rows]
        return head + "\n" + text_table(headers, rows)


def _scalar(t: torch.Tensor | None) -> float | None:
    return float(t.reshape(-1)[0]) if t is not None and t.numel() else None


def inspect_ascend(folder: str | os.PathLike) -> SavedModelTable:
    """The weights of an Ascend checkpoint folder (description JSON + safetensors), one row per
    `*.weight` tensor, FLOAT ones included."""
    description = read_description(folder)
    tensors = read_safetensors_folder(folder)
    rows = []
    for key, kind in description.items():
        if key in NON_TENSOR_KEYS or not key.endswith(".weight") or key not in tensors:
            continue
        name = key[: -len(".weight")]
        w = tensors[key]
        scale = tensors.get(f"{name}.weight_scale")
        row = SavedLayer(name, kind, str(w.dtype).replace("torch.", ""), tuple(w.shape),
                         nbytes=sum(t.numel() * t.element_size() for k, t in tensors.items()
                                    if k.startswith(name + ".") and "." not in k[len(name) + 1:]))
        if scale is not None and scale.is_floating_point():
            row.weight_scale_min, row.weight_scale_max = float(scale.min()), float(scale.max())
            if kind == "W4A16" and scale.dim() == 2 and scale.shape[1] > 1:
                row.group_size = w.shape[-1] // scale.shape[1]
        row.input_scale = _scalar(tensors.get(f"{name}.input_scale"))
        row.input_offset = _scalar(tensors.get(f"{name}.input_offset"))
        rows.append(row)
    rows.sort(key=lambda r: _natural_key(r.name))
    return SavedModelTable(str(folder), "ascend", rows)


def _natural_key(name: str) -> list[Any]:
    """'model.layers.10.x' after 'model.layers.9.x': numbers compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def inspect_onnx(path: str | os.PathLike) -> SavedModelTable:
    """The integer weights of a QDQ ONNX file: one row per DequantizeLinear of an initializer
    (type "QDQ int8" etc.), with its per-channel scale range."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    rows = []
    n_act = 0
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits:
            n_act += 1
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[0]])
        scale = numpy_helper.to_array(inits[node.input[1]]) if node.input[1] in inits else None
        rows.append(SavedLayer(node.input[0], f"QDQ {w.dtype}", str(w.dtype), tuple(w.shape),
                               float(scale.min()) if scale is not None else None,
                               float(scale.max()) if scale is not None else None, nbytes=int(w.nbytes)))
    table = SavedModelTable(f"{path} ({n_act} activation QuantizeLinear)", "onnx", rows)
    return table


def inspect_saved(path: str | os.PathLike) -> SavedModelTable:
    """inspect_ascend for a folder with a description JSON, inspect_onnx for a .onnx file (or a
    folder holding exactly one)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".onnx":
        return inspect_onnx(p)
    if p.is_dir():
        if any(p.glob("quant_model_description*.json")):
            return inspect_ascend(p)
        onnx_files = sorted(p.glob("*.onnx"))
        if len(onnx_files) == 1:
            return inspect_onnx(onnx_files[0])
    raise FileNotFoundError(f"{str(p)!r} is not an Ascend checkpoint folder (quant_model_description*.json) "
                            "or a .onnx file")
