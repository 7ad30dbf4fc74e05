"""Quantized compute, dispatched by device. Installed as `fxquant.kernels`."""

from .int_matmul import int8_matmul

__all__ = ["int8_matmul"]
