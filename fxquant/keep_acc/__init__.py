"""Accuracy keepers of seed 004 (keep_acc): per-layer weight optimisation on stored inputs.

Each keeper is called by the calibration runner as `keeper(module, inputs, targets)` right after
the layer's quantizers are calibrated: `inputs` are the layer's calibration inputs (the
quantized storage's under asym), `targets` its float outputs. A keeper keeps its result only
when it lowers the layer's output error on those samples.
"""

from .adaround import AdaRound
from .admm import ADMMWeights
from .easy_quant import EasyQuantScales
from .spec import KeepAcc

__all__ = ["ADMMWeights", "AdaRound", "EasyQuantScales", "KeepAcc"]
