"""Graph passes, one per module; each is a callable GraphModule -> GraphModule. Installed as fxquant.passes."""

from .awq_scale import AWQScale
from .calibrate import Calibrate
from .flex_smooth import FlexSmooth
from .fold_batchnorm import fold_batchnorm
from .freeze import Freeze, freeze
from .functional_to_modules import functional_to_modules
from .hadamard_rotation import HadamardRotation
from .insert_quant_oprs import InsertQuantOprs
from .iter_smooth import IterSmooth
from .lower_onnx_to_ascend import lower_onnx_to_ascend
from .lower_to_ascend import LowerToAscend
from .lower_to_qdq import lower_to_qdq
from .online_hadamard import OnlineHadamard
from .pass_manager import PassManager, lint_ir
from .quantize_attention import QuantizeAttention
from .replay_smoothing import ReplaySmoothing
from .resolve_schemes import ResolveSchemes, quantizable_nodes
from .rollback import Rollback
from .smooth_quant import SmoothQuant
from .unmap_kept_tensors import unmap_kept_tensors

__all__ = [
    "AWQScale", "Calibrate", "FlexSmooth", "HadamardRotation", "InsertQuantOprs", "IterSmooth", "LowerToAscend", "OnlineHadamard", "PassManager",
    "Freeze", "QuantizeAttention", "ReplaySmoothing", "ResolveSchemes", "Rollback", "SmoothQuant", "fold_batchnorm", "freeze", "functional_to_modules", "lint_ir",
    "lower_onnx_to_ascend", "lower_to_qdq",
    "quantizable_nodes", "unmap_kept_tensors",
]
