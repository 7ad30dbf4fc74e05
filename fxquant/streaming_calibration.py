"""Calibration in whole forward passes, one sample at a time, where that equals the layerwise one.

Without asym storage, weight optimizers or per-layer measurements, layerwise calibration (seed
003, fxquant.calibration) shows each QuantOpr's input observer the float outputs of the nodes
before it, sample after sample. A float forward of each sample with the observers hooked onto the
QuantOprs' inputs shows every observer the same values in the same order, so the qparams are the
same; but it holds one sample's activations at a time instead of every sample's output of every
live node (SmolLM2 static w8a8, 16 x 512 tokens: hundreds of MB of stored activations less).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx
from tqdm.auto import tqdm

from .calib_data import check_finite, normalise_calib_data
from .layer_major import bind_sample
from .partial_forward import forward_until
from .quant_opr import QuantOpr
from .quantizer import StaticQuantizer
from .resources import release_freed_memory
from .timestep import TimestepQuantizer
from .weighted_quant_opr import WeightedQuantOpr

log = logging.getLogger(__name__)


def can_stream(gm: fx.GraphModule) -> bool:
    """True when every QuantOpr calibrates from its inputs' observers alone: no timestep
    quantizers (they need each sample's step) and no layer-specific calibrate_from_inputs
    (recurrent layers replay their stored inputs)."""
    for m in gm.modules():
        if not isinstance(m, QuantOpr):
            continue
        if type(m).calibrate_from_inputs is not QuantOpr.calibrate_from_inputs:
            return False
        if any(isinstance(q, TimestepQuantizer) for q in m.input_quantizers):
            return False
    return True


@torch.no_grad()
def streaming_calibration(gm: fx.GraphModule, calib_data: Any, progress: bool = True) -> None:
    """Observe every static input quantizer over float forwards of each sample, then set the
    activation qparams and calibrate the weights. The caller turns quantization on afterwards."""
    oprs = {name: m for name, m in gm.named_modules() if isinstance(m, QuantOpr)}
    producers = {}  # module name -> names of the nodes feeding its tensor inputs (first call site)
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in oprs and node.target not in producers:
            producers[node.target] = [a.name for a in node.args if isinstance(a, fx.Node)]
    batch = [0]
    handles, observed = [], []
    for name, m in oprs.items():
        m.set_quant(False, False)
        static = [(i, q) for i, q in enumerate(m.input_quantizers) if isinstance(q, StaticQuantizer)]
        for _, q in static:
            q.reset_observer()
        if static:
            handles.append(m.register_forward_pre_hook(_observer_hook(name, static, producers.get(name, []), batch)))
            observed.append(name)
    batches = normalise_calib_data(calib_data)
    try:
        with forward_until(gm, observed) as run:
            for b, (args, kwargs) in enumerate(tqdm(batches, desc="calibrating", unit="sample", disable=not progress)):
                batch[0] = b
                bind_sample(gm, b, args, kwargs)  # names a sample that does not fit, or NaN / Inf in it
                run(*args, **kwargs)
                release_freed_memory()
    finally:
        for h in handles:
            h.remove()
    for m in oprs.values():
        for q in m.input_quantizers:
            if isinstance(q, StaticQuantizer):
                q.calc_qparams()
        if isinstance(m, WeightedQuantOpr):
            m.calibrate_weight()
    log.info("calibrated %d QuantOprs in %d forward passes", len(oprs), len(batches))


def _observer_hook(name: str, static: list[tuple[int, StaticQuantizer]], producers: list[str], batch: list[int]):
    """A pre-hook feeding the module's tensor inputs to their observers (NaN / Inf named like the
    layerwise runner names them: layer, producing node, batch)."""
    def hook(module: torch.nn.Module, args: tuple) -> None:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        for i, q in static:
            if i < len(tensors):
                source = producers[i] if i < len(producers) else f"input {i}"
                check_finite(tensors[i], f"the input of {name!r} (from node {source!r}) in calibration batch {batch[0]}")
                q.observe(tensors[i])
    return hook
