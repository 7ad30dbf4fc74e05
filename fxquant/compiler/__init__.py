"""torch.compile integration: the "fxquant" backend for quantized models, and a backend that
quantizes the float model it compiles."""

from .backend import CompileBackend, compile_backend, fxquant_backend, record_kernels
from .eager_rounding import keep_eager_rounding
from .frozen_guards import skip_frozen_layer_guards
from .quantizing_backend import QuantizingBackend, quantizing_backend

__all__ = ["CompileBackend", "QuantizingBackend", "compile_backend", "fxquant_backend", "keep_eager_rounding",
           "quantizing_backend", "record_kernels", "skip_frozen_layer_guards"]
