"""The Ascend ops vllm-ascend calls: torch_npu's when it imports, else the exact references."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import npu_reference

OP_NAMES = ("npu_quantize", "npu_dynamic_quant", "npu_quant_matmul", "npu_weight_quant_batchmatmul")


@dataclass(frozen=True)
class AscendOps:
    """One implementation of the four ops; `backend` is "torch_npu" or "reference"."""

    backend: str
    npu_quantize: Callable
    npu_dynamic_quant: Callable
    npu_quant_matmul: Callable
    npu_weight_quant_batchmatmul: Callable


def reference_ops() -> AscendOps:
    """The pure-PyTorch reference implementations (any device)."""
    return AscendOps("reference", *(getattr(npu_reference, n) for n in OP_NAMES))


def ascend_ops(prefer_npu: bool = True) -> AscendOps:
    """torch_npu's ops if torch_npu imports (and prefer_npu), otherwise the reference ones.

    The import happens here, at call time, never when fxquant is imported.
    """
    if prefer_npu:
        try:
            import torch_npu  # noqa: F401
        except ImportError:
            pass
        else:
            return AscendOps("torch_npu", *(getattr(torch_npu, n) for n in OP_NAMES))
    return reference_ops()
