"""Quantized compute, dispatched by device. Installed as `fxquant.kernels`."""

from .ascend_ops import AscendOps, ascend_ops, reference_ops
from .int_conv import default_conv_kernel
from .int_matmul import code_matmul, code_row_sums, codes_matmul, default_kernel, int8_matmul
from .npu_reference import decode_scale, encode_scale_int64

__all__ = ["AscendOps", "ascend_ops", "decode_scale", "code_matmul", "code_row_sums", "codes_matmul", "default_conv_kernel", "default_kernel", "encode_scale_int64", "int8_matmul", "reference_ops"]
