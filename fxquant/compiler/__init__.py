"""torch.compile integration: the "fxquant" backend for quantized models."""

from .backend import CompileBackend, compile_backend, fxquant_backend, record_kernels

__all__ = ["CompileBackend", "compile_backend", "fxquant_backend", "record_kernels"]
