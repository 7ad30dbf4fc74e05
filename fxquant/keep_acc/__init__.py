"""Accuracy keepers of seed 004 (keep_acc): per-layer weight optimisation on stored inputs.

Each keeper is called by the calibration runner as `keeper(module, inputs, targets)` right after
the layer's quantizers are calibrated: `inputs` are the layer's calibration inputs (the
quantized storage's under asym), `targets` its float outputs. A keeper keeps its result only
when it lowers the layer's output error on those samples. GPTQWeights is also what
w_method="gptq" runs (LLM QuantConfig and the session quant configs).
"""

from .adaround import AdaRound
from .admm import ADMMWeights
from .easy_quant import EasyQuantScales
from .gptq import GPTQWeights
from .spec import KeepAcc
from .w_method import W_METHODS, check_w_method, weight_rounding

__all__ = ["ADMMWeights", "AdaRound", "EasyQuantScales", "GPTQWeights", "KeepAcc", "W_METHODS", "check_w_method",
           "weight_rounding"]
