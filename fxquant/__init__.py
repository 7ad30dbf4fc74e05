"""fxquant: post-training quantization for PyTorch as composable torch.fx passes."""

from .api import quantize
from .calibration import CalibrationRunner
from .calibrator import Calibrator, QuantConfig
from .capture import capture
from .captured_module import CapturedGraphModule
from .compiler import compile_backend, quantizing_backend, skip_frozen_layer_guards
from .errors import CalibrationDataError, CaptureError, ConfigError, FxquantError
from .formats.ascend_checkpoint import load_ascend, save_ascend
from .inspection import compare, draw_graph, inspect, report, to_networkx
from .install import apply
from .quant_conv import QConv1d, QConv2d
from .quant_linear import QLinear
from .quant_opr import QBMM, QAdd, QMatMul, QuantOpr
from .quantizer import DynamicQuantizer, IdentityQuantizer, QuantSpec, StaticQuantizer
from .schemes import SCHEME_NAMES, Scheme, SchemeOptions, make_scheme
from .timestep import set_timestep

__all__ = [
    "SCHEME_NAMES", "CalibrationDataError", "apply", "compile_backend", "CalibrationRunner", "Calibrator", "QuantConfig",
    "load_ascend", "save_ascend", "CaptureError", "CapturedGraphModule", "ConfigError",
    "DynamicQuantizer", "FxquantError", "IdentityQuantizer", "QAdd", "QBMM", "QConv1d", "QConv2d",
    "QLinear", "QMatMul", "QuantOpr", "QuantSpec", "Scheme", "SchemeOptions", "StaticQuantizer",
    "capture", "compare", "draw_graph", "inspect", "report", "make_scheme", "quantize", "quantizing_backend", "set_timestep",
    "skip_frozen_layer_guards", "to_networkx",
]
__version__ = "0.1.0"
