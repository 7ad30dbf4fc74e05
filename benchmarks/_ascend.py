"""A quantized model's Ascend checkpoint, saved and reloaded: what a CPU user of the checkpoint runs."""

from __future__ import annotations

import copy
import tempfile

import torch

import fxquant


def ascend_reload(model: torch.nn.Module, quantized: torch.nn.Module, scheme: str) -> torch.nn.Module:
    """`quantized` (a GraphModule quantized from the float `model`, default scheme `scheme`) saved as
    an Ascend checkpoint and reloaded into a copy of `model` (fxquant.load_ascend: without torch_npu,
    fxquant's CPU kernels)."""
    with tempfile.TemporaryDirectory() as folder:
        fxquant.save_ascend(quantized, model, folder, scheme)
        return fxquant.load_ascend(copy.deepcopy(model), folder)
