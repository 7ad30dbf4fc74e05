"""Automatic mixed precision (seed 004's amp_num): pick the layers whose quantization hurts the
model output most, measured on calibration data, to roll back to float."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import fx
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from ..calib_data import CalibBatch
from ..quant_opr import QuantOpr
from ..weighted_quant_opr import WeightedQuantOpr

log = logging.getLogger(__name__)


def _output_tensors(out: object) -> list[torch.Tensor]:
    return [t.float() for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


@torch.no_grad()
def select_amp_rollback(gm: fx.GraphModule, batches: Sequence[CalibBatch], count: int,
                        already_float: Sequence[str] = (), progress: bool = True) -> list[str]:
    """Greedily choose `count` quantized layers: each round rolls back (in simulation) the layer
    whose float version lowers the model-output squared error against fp32 the most, summed over
    `batches`. Layers in already_float are simulated float throughout. Returns their names in
    the order chosen. The model's quantizers are left enabled as they were."""
    modules = dict(gm.named_modules())
    oprs = {n: m for n, m in modules.items() if isinstance(m, QuantOpr)}
    candidates = [n for n, m in oprs.items() if isinstance(m, WeightedQuantOpr) and n not in already_float]
    for m in oprs.values():
        m.set_quant(False, False)
    reference = [_output_tensors(gm(*args, **kwargs)) for args, kwargs in batches]

    def error() -> float:
        total = 0.0
        for (args, kwargs), ref in zip(batches, reference):
            outs = _output_tensors(gm(*args, **kwargs))
            total += sum(float(((o - r) ** 2).sum()) for o, r in zip(outs, ref))
        return total

    floated = set(already_float)
    for name, m in oprs.items():
        m.set_quant(name not in floated, name not in floated)
    chosen: list[str] = []
    rounds = min(count, len(candidates))
    bar = tqdm(total=rounds * len(candidates), desc="amp", unit="trial", disable=not progress)
    try:
        base = error()
        for _ in range(rounds):
            scores: dict[str, float] = {}
            for name in candidates:
                if name in chosen:
                    continue
                oprs[name].set_quant(False, False)
                scores[name] = error()
                oprs[name].set_quant(True, True)
                bar.update()
            best = min(scores, key=scores.get)
            log.info("amp: rolling back %s lowers the output error %.4g -> %.4g", best, base, scores[best])
            oprs[best].set_quant(False, False)
            chosen.append(best)
            base = scores[best]
    finally:
        bar.close()
        for m in oprs.values():
            m.set_quant(True, True)
    return chosen
