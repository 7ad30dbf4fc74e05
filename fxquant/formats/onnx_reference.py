"""A reference runtime for Ascend-form ONNX: onnx's ReferenceEvaluator with AscendQuant,
AscendDequant, and exact integer Conv/MatMul on int8 inputs (int32 accumulation)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_conv import Conv as _FloatConv


class AscendQuant(OpRun):
    """int8 clip(round_half_even(x * scale + offset), -128, 127)."""

    op_domain = ""

    def _run(self, x, scale=None, offset=None, sqrt_mode=None, round_mode=None):  # noqa: D102
        s = np.float32(scale) * (np.float32(scale) if sqrt_mode else np.float32(1))
        y = np.rint(x.astype(np.float32) * s + np.float32(offset))
        return (np.clip(y, -128, 127).astype(np.int8),)


class AscendDequant(OpRun):
    """float32 x * deq_scale, deq_scale UINT64 holding fp32 bits per output channel (axis 1 of
    NCHW, last axis otherwise)."""

    op_domain = ""

    def _run(self, x, deq_scale, sqrt_mode=None, relu_flag=None, dtype=None):  # noqa: D102
        scale = deq_scale.astype(np.uint64).astype(np.uint32).view(np.float32).reshape(-1)
        shape = [1] * x.ndim
        axis = 1 if x.ndim == 4 else x.ndim - 1
        shape[axis] = -1
        y = x.astype(np.float32) * scale.reshape(shape)
        if relu_flag:
            y = np.maximum(y, 0)
        return (y.astype(np.float32),)


class Conv(_FloatConv):
    """ONNX Conv; int8 inputs accumulate exactly (float64 arithmetic on integers) into int32."""

    def _run(self, X, W, B=None, **kwargs):  # noqa: D102, N803
        if X.dtype != np.int8:
            return super()._run(X, W, B, **kwargs)
        (y,) = super()._run(X.astype(np.float64), W.astype(np.float64),
                            None if B is None else B.astype(np.float64), **kwargs)
        return (np.rint(y).astype(np.int32),)


class MatMul(OpRun):
    """ONNX MatMul; int8 x int8 accumulates in int64 and returns int32."""

    op_domain = ""

    def _run(self, a, b):  # noqa: D102
        if a.dtype == np.int8:
            return (np.matmul(a.astype(np.int64), b.astype(np.int64)).astype(np.int32),)
        return (np.matmul(a, b),)


def ascend_reference_session(model: onnx.ModelProto | str) -> ReferenceEvaluator:
    """A ReferenceEvaluator that runs the Ascend ONNX form on CPU."""
    return ReferenceEvaluator(model, new_ops=[AscendQuant, AscendDequant, Conv, MatMul])
