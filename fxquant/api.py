"""fxquant.quantize: capture, resolve schemes, insert QuantOprs, calibrate, freeze."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import fx

from fxquant.passes import (
    Calibrate,
    Freeze,
    HadamardRotation,
    InsertQuantOprs,
    OnlineHadamard,
    PassManager,
    QuantizeAttention,
    ResolveSchemes,
    SmoothQuant,
    fold_batchnorm,
    functional_to_modules,
    unmap_kept_tensors,
)

from .calib_data import check_fits_signature, normalise_calib_data
from .calibration import WeightOptimizer
from .capture import capture
from .errors import CalibrationDataError, ConfigError
from .install import apply
from .ir import scheme_decisions
from .resources import peak_rss_bytes, release_freed_memory, release_unused_memory, storage_bytes
from .schemes import SchemeOptions, refuse_static_without_data

log = logging.getLogger(__name__)


def quantization_passes(
    resolve: ResolveSchemes,
    options: SchemeOptions,
    calib_data: Any,
    *,
    rotation: Callable[[fx.GraphModule], fx.GraphModule] | None = None,
    suppression: Callable[[fx.GraphModule], fx.GraphModule] | None = None,
    attention_quant: bool = False,
    device: str | torch.device = "cpu",
    asym: bool = False,
    progress: bool = True,
    weight_optimizers: Sequence[WeightOptimizer] = (),
    measure_layers: bool = False,
    keep_float_weight: bool = False,
) -> list[Callable[[fx.GraphModule], fx.GraphModule]]:
    """The passes fxquant.quantize runs on a captured graph, in order (the arguments are quantize's):
    fold BatchNorm, small ops to modules, resolve schemes, kept tensors out of file mappings,
    rotation, suppression, online rotation, insert QuantOprs, attention quantization, calibrate,
    freeze."""
    online = None
    if isinstance(rotation, HadamardRotation) and rotation.online:  # smoothing folds into the gated
        # product before the product is rotated online
        rotation, online = replace(rotation, online=()), OnlineHadamard(rotation.online, rotation.seed + 2)
    smooth = [p for p in (rotation, suppression, online) if p is not None]
    attention = [QuantizeAttention(options.act_method)] if attention_quant else []
    return [
        fold_batchnorm,
        functional_to_modules,
        resolve,
        unmap_kept_tensors,
        *smooth,
        InsertQuantOprs(options),
        *attention,
        Calibrate(calib_data, device=device, asym=asym, progress=progress, weight_optimizers=weight_optimizers,
                  measure_layers=measure_layers),
        Freeze(keep_float_weight),
    ]


def quantize(
    model: torch.nn.Module,
    calib_data: Any = None,
    scheme: str = "w8a8",
    mix_cfg: dict[str, str] | None = None,
    disable_names: Sequence[str] | None = None,
    *,
    options: SchemeOptions | None = None,
    example_inputs: Any = None,
    rollback_names: Sequence[str] = (),
    disable_last_layer: bool = True,
    disable_first_layer: bool = False,
    small_op_scheme: str = "float",
    asym: bool = False,
    smooth_alpha: float | None = None,
    rotation: bool | Callable[[fx.GraphModule], fx.GraphModule] = False,
    suppression: Callable[[fx.GraphModule], fx.GraphModule] | None = None,
    attention_quant: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    dump_dir: str | None = None,
    weight_optimizers: Sequence[WeightOptimizer] = (),
    keep_float_weight: bool = False,
    inplace: bool = False,
    consume_model: bool = False,
    measure_layers: bool = False,
) -> fx.GraphModule | torch.nn.Module:
    """Quantize `model`; returns a GraphModule called like `model` (same arguments, same output type).

    calib_data: `[[input1], [input2], ...]` (an item may be a dict of keyword inputs); optional for
    weight-only (w8a16, w4a16) and dynamic (w8a8_dynamic) schemes, which then need
    `example_inputs` (one sample in the same form) to capture the graph.
    scheme: default scheme (see fxquant.schemes.SCHEME_NAMES); mix_cfg: {layer name or fnmatch
    pattern: scheme}; disable_names: layers kept float. smooth_alpha: fold SmoothQuant scales
    (alpha in [0, 1]) into norms / producing linears before calibration (needs calib_data).
    suppression: an outlier-suppression pass run instead (SmoothQuant, IterSmooth, FlexSmooth,
    AWQScale, ...). rotation: True (or a HadamardRotation pass) rotates the residual stream and the
    attention values of a pre-RMSNorm transformer by Hadamard matrices folded into the weights, before
    any suppression (QuaRot; fxquant.passes.HadamardRotation). weight_optimizers: per-layer weight rounding run during calibration
    (fxquant.keep_acc: GPTQWeights, AdaRound, ...). attention_quant: fa3, per-head int8 Q/K/V of every sdpa (QuantizeAttention).
    measure_layers: record each quantized layer's output error and input statistics on calib_data
    (one more quantized run per layer) for fxquant.inspect and fxquant.report. keep_float_weight:
    frozen layers keep their float weights beside the codes (for fine-tuning).
    consume_model: the model is handed over: smoothing folds change its weights in place rather
    than copying them (one float copy of the smoothed layers less at the peak), so it no longer
    computes the float model; its float layers stay in it until fxquant.apply replaces them (and
    releases their memory). inplace: consume the model and install the quantized layers into it
    (fxquant.apply); returns `model`. Refused up front with attention_quant or quantized small
    ops, which have no place in the model.
    The result's gm.meta holds fxquant_timings (pass, seconds), fxquant_decisions,
    fxquant_float_bytes (the float model's parameters and buffers) and fxquant_peak_rss_bytes.
    Raises ConfigError, CalibrationDataError or CaptureError with the reason.
    """
    refuse_static_without_data(scheme, options, calib_data is not None, mix_cfg)
    resolve = ResolveSchemes(default=scheme, mix_cfg=mix_cfg, disable_names=disable_names or [],
                             rollback_names=rollback_names, disable_last_layer=disable_last_layer,
                             disable_first_layer=disable_first_layer, small_op_scheme=small_op_scheme)
    batches = normalise_calib_data(calib_data) if calib_data is not None else None
    if batches is not None:
        check_fits_signature(model, batches)
        example_args, example_kwargs = batches[0]
    elif example_inputs is not None:
        example_args, example_kwargs = normalise_calib_data([example_inputs])[0]
    else:
        raise CalibrationDataError("pass calib_data ([[input1], [input2], ...]) or, for weight-only "
                                   "and dynamic schemes, example_inputs (one sample) to capture the model")
    if smooth_alpha is not None and (batches is None or not 0.0 <= smooth_alpha <= 1.0):
        raise ConfigError(f"smooth_alpha={smooth_alpha} needs calib_data and a value in [0, 1]")
    if smooth_alpha is not None and suppression is not None:
        raise ConfigError("pass either smooth_alpha or suppression, not both")
    if inplace and (attention_quant or small_op_scheme != "float"):
        raise ConfigError("inplace=True installs the quantized layers into the model, which has no place for "
                          f"{'fa3 attention inputs' if attention_quant else 'quantized small ops'}; "
                          "use inplace=False and the returned GraphModule")
    if smooth_alpha is not None:
        suppression = SmoothQuant(calib_data, alpha=smooth_alpha)
    if rotation is True:
        rotation = HadamardRotation(calib_data)
    # the passes are built before capture: each refuses its bad configuration without a graph
    manager = PassManager(quantization_passes(
        resolve, options or SchemeOptions(), calib_data, rotation=rotation or None, suppression=suppression, attention_quant=attention_quant,
        device=device, asym=asym, progress=progress, weight_optimizers=weight_optimizers,
        measure_layers=measure_layers, keep_float_weight=keep_float_weight), dump_dir=dump_dir)
    float_bytes = storage_bytes(model)
    start = time.perf_counter()
    gm = capture(model, example_args, example_kwargs)
    capture_seconds = time.perf_counter() - start
    gm.meta["fxquant_scheme_options"] = options or SchemeOptions()  # for passes that simulate the schemes
    gm.meta["fxquant_consumes_model"] = consume_model or inplace  # passes may change the model's tensors
    gm = manager(gm)
    gm.meta["fxquant_timings"] = [("capture", capture_seconds), *manager.timings]
    gm.meta["fxquant_decisions"] = scheme_decisions(gm)
    gm.meta["fxquant_float_bytes"] = float_bytes
    gm.meta["fxquant_peak_rss_bytes"] = peak_rss_bytes()
    if inplace:
        return apply(model, gm)  # which releases the float layers it replaces
    if consume_model:
        release_freed_memory()  # the model's float layers, still installed, go with fxquant.apply
    else:
        release_unused_memory(gm)  # what the passes freed, capture's cycles, the checkpoint mapping
    return gm.eval()
