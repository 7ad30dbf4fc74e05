"""Write a calibrated graph as a quantized ONNX file (QDQ, or Ascend ops), atomically."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import fx

from ..atomic_files import written_atomically
from ..errors import ConfigError, FxquantError
from ..tracing import TRACE_LOCK

log = logging.getLogger(__name__)

ONNX_TARGETS = ("qdq", "ascend")
OPSET = 18


#: torch.onnx's op registry warns at every export that torchvision's ops (nms, roi_align, ...) are
#: not registered when torchvision is not installed: four lines a user can do nothing about
_ONNX_REGISTRATION_LOGGER = "torch.onnx._internal.exporter._registration"


@contextlib.contextmanager
def _logger_quiet(name: str) -> Iterator[None]:
    """Within the block, the logger `name` passes on errors only; its level is restored after."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _graph_input_names(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]


def to_onnx_model(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any],
                  input_names: Sequence[str] | None = None) -> onnx.ModelProto:
    """torch.onnx (dynamo) export of `module` called with args/kwargs.

    input_names: one per tensor input of forward, in the order of its signature (default: the
    parameter names); graph inputs are renamed by parameter name, never by position. Every
    dimension the graph does not specialise (batch, sequence length) stays dynamic.
    """
    bound = {k: v for k, v in inspect.signature(module.forward).bind(*args, **kwargs).arguments.items()
             if isinstance(v, torch.Tensor)}
    if input_names is None:
        input_names = list(bound)
    if len(input_names) != len(bound):
        raise ConfigError(f"input_names has {len(input_names)} names but the model takes {len(bound)} inputs "
                          f"({', '.join(bound)}); give one name per input, in the order of forward's parameters")
    shapes = {name: {d: torch.export.Dim.AUTO for d in range(v.dim())} for name, v in bound.items()}
    with TRACE_LOCK, warnings.catch_warnings(), _logger_quiet(_ONNX_REGISTRATION_LOGGER):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (), kwargs=bound, dynamo=True, opset_version=OPSET,
                                    dynamic_shapes=shapes, verbose=False)
    if program is None:
        raise FxquantError("torch.onnx.export returned no program")
    model = program.model_proto
    _rename_inputs(model, dict(zip(bound, input_names)))
    return model


def _rename_inputs(model: onnx.ModelProto, names: dict[str, str]) -> None:
    """Rename graph inputs (and their uses) from parameter names to the requested names."""
    present = {i.name for i in model.graph.input}
    missing = sorted(set(names) - present)
    if missing:
        raise FxquantError(f"exported graph has no inputs named {missing}; it has {sorted(present)}")
    for value in model.graph.input:
        value.name = names.get(value.name, value.name)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in names:
                node.input[i] = names[name]
    for out in model.graph.output:
        if out.name in names:
            raise FxquantError(f"graph input {out.name!r} is also an output; cannot rename it")


def write_onnx(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Check `model` with onnx.checker and write it to `path` through a temporary file and rename."""
    onnx.checker.check_model(model)
    path = Path(path)
    with written_atomically(path) as tmp:
        onnx.save(model, tmp)
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path
