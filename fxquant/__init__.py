"""fxquant: post-training quantization for PyTorch as composable torch.fx passes."""

from .api import quantize
from .calibration import CalibrationRunner
from .capture import capture
from .errors import CalibrationDataError, CaptureError, ConfigError, FxquantError
from .quant_opr import QBMM, QAdd, QConv1d, QConv2d, QLinear, QMatMul, QuantOpr
from .quantizer import DynamicQuantizer, IdentityQuantizer, QuantSpec, StaticQuantizer
from .schemes import SCHEME_NAMES, Scheme, SchemeOptions, make_scheme

__all__ = [
    "SCHEME_NAMES", "CalibrationDataError", "CalibrationRunner", "CaptureError", "ConfigError",
    "DynamicQuantizer", "FxquantError", "IdentityQuantizer", "QAdd", "QBMM", "QConv1d", "QConv2d",
    "QLinear", "QMatMul", "QuantOpr", "QuantSpec", "Scheme", "SchemeOptions", "StaticQuantizer",
    "capture", "make_scheme", "quantize",
]
__version__ = "0.1.0"
