"""Validation of calibration data in seed 000's template `[[input1], [input2], ...]`."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import CalibrationDataError

TEMPLATE = ("expected a non-empty list of samples, each a list/tuple of positional inputs "
            "([[input1], [input2], ...]), a dict of keyword inputs, or a single tensor")

CalibBatch = tuple[tuple, dict[str, Any]]


def normalise_calib_data(calib_data: Any) -> list[CalibBatch]:
    """[(args, kwargs), ...] from calib_data; CalibrationDataError naming the bad item otherwise."""
    if calib_data is None:
        raise CalibrationDataError(f"calib_data is None; {TEMPLATE}")
    if isinstance(calib_data, (torch.Tensor, Mapping)) or not isinstance(calib_data, Sequence) \
            or isinstance(calib_data, (str, bytes)):
        raise CalibrationDataError(
            f"calib_data must be a list of samples, got {type(calib_data).__name__}; {TEMPLATE} "
            "(wrap a single sample in a list)")
    if len(calib_data) == 0:
        raise CalibrationDataError(f"calib_data is empty; {TEMPLATE}")
    return [_normalise_item(i, item) for i, item in enumerate(calib_data)]


def _normalise_item(index: int, item: Any) -> CalibBatch:
    if isinstance(item, torch.Tensor):
        return (item,), {}
    if isinstance(item, Mapping):
        if not item:
            raise CalibrationDataError(f"calib_data[{index}] is an empty dict; {TEMPLATE}")
        bad = [k for k in item if not isinstance(k, str)]
        if bad:
            raise CalibrationDataError(f"calib_data[{index}] has non-string keys {bad!r}")
        return (), dict(item)
    if isinstance(item, (list, tuple)):
        if len(item) == 0:
            raise CalibrationDataError(f"calib_data[{index}] is an empty list; {TEMPLATE}")
        return tuple(item), {}
    raise CalibrationDataError(f"calib_data[{index}] is a {type(item).__name__}; {TEMPLATE}")


def check_finite(value: Any, where: str) -> None:
    """Raise CalibrationDataError if a floating tensor in `value` holds NaN or Inf (tested on its
    min and max, which NaN and +-Inf reach: one read, no bool tensor of value's size)."""
    if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel()):
        return
    lo, hi = torch.aminmax(value.detach())
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        n_nan = int(torch.isnan(value).sum())
        n_inf = int(torch.isinf(value).sum())
        raise CalibrationDataError(f"non-finite values in {where}: {n_nan} NaN, {n_inf} Inf")


def check_fits_signature(model: torch.nn.Module, batches: list[CalibBatch]) -> None:
    """Raise CalibrationDataError naming the first sample that cannot be passed to model.forward:
    arguments that do not bind, an empty tensor, a floating input whose dtype is not the model's,
    or a tensor whose rank or dtype differs from the same input of calib_data[0]."""
    sig = inspect.signature(model.forward)
    model_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    first: dict[str, torch.Tensor] = {}
    for i, (args, kwargs) in enumerate(batches):
        try:
            bound = sig.bind(*args, **kwargs).arguments
        except TypeError as exc:
            raise CalibrationDataError(
                f"calib_data[{i}] does not fit the model's inputs {type(model).__name__}.forward{sig}: {exc}"
            ) from None
        for name, value in bound.items():
            if not isinstance(value, torch.Tensor):
                continue
            where = f"calib_data[{i}] input {name!r}"
            if value.numel() == 0:
                raise CalibrationDataError(f"{where} is empty (shape {tuple(value.shape)})")
            if value.is_floating_point() and model_dtype is not None and value.dtype != model_dtype:
                raise CalibrationDataError(f"{where} is {value.dtype} but the model's parameters are "
                                           f"{model_dtype}; convert the data (or the model) to one dtype")
            ref = first.setdefault(name, value)
            if value.dim() != ref.dim() or value.dtype != ref.dtype:
                raise CalibrationDataError(
                    f"{where} is {value.dtype} {tuple(value.shape)} but calib_data[0] gives "
                    f"{ref.dtype} {tuple(ref.shape)}: every sample needs the same rank and dtype")


def synthetic_example(model: torch.nn.Module) -> dict[str, Any]:
    """A capture example (keyword inputs) for data-free runs: random token ids [1, 16] for HF text models."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if getattr(model, "main_input_name", None) == "input_ids" and vocab:
        return {"input_ids": torch.randint(0, int(vocab), (1, 16))}
    raise CalibrationDataError(
        f"data-free quantization of {type(model).__name__} needs one example input to capture the "
        "graph: pass calib_data=[[example]] (weight-only and dynamic schemes use it only for capture)")


def synthetic_inputs(input_shape: Sequence[int], count: int = 8, seed: int = 0) -> list[list[torch.Tensor]]:
    """Data-free calibration samples: `count` standard-normal float32 tensors of input_shape,
    in the [[input1], [input2], ...] template."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(*input_shape, generator=gen)] for _ in range(count)]
