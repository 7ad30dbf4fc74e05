"""Calibrator: msModelSlim's LLM post-training quantization API (seed 000) over fxquant passes."""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx

from fxquant.passes import (
    Calibrate,
    InsertQuantOprs,
    PassManager,
    ResolveSchemes,
    fold_batchnorm,
    freeze,
    functional_to_modules,
)
from fxquant.passes.lower_onnx_to_ascend import lower_onnx_to_ascend
from fxquant.passes.lower_to_qdq import lower_to_qdq
from fxquant.passes.rollback import Rollback

from ..calib_data import (
    check_fits_signature,
    normalise_calib_data,
    synthetic_example,
    synthetic_inputs,
)
from ..capture import capture
from ..errors import CalibrationDataError, ConfigError
from ..formats.onnx_export import ONNX_TARGETS, to_onnx_model, write_onnx
from ..ir import scheme_decisions
from ..keep_acc import AdaRound, ADMMWeights, EasyQuantScales, weight_rounding
from ..quant_opr import QuantOpr
from ..quantizer import StaticQuantizer
from ..schemes import refuse_static_without_data
from ..weighted_quant_opr import WeightedQuantOpr
from .amp import select_amp_rollback
from .quant_config import QuantConfig, parse_disable_level

log = logging.getLogger(__name__)


class Calibrator:
    """Quantize `model` as `cfg` says; `run()`, then `model`, `save(...)`, `export_quant_onnx(...)`
    or `export_quant_safetensor(...)` (seed 000 for LLMs, seed 004 for CNNs and encoders).

    calib_data: `[[input1], [input2], ...]` (items may be dicts of keyword inputs); None is the
    data-free case, valid for weight-only and dynamic schemes. disable_level: 'L<n>' rolls back the
    n most sensitive quantized layers to float. all_tensors: {layer name: tensor or list of
    tensors} used as that layer's calibration inputs. mix_cfg: {layer name or fnmatch pattern:
    scheme}, exact names first, then the first matching pattern. progress: tqdm bars for
    calibration and amp (an addition to the seed; False for scripts and logs).
    """

    def __init__(self, model: torch.nn.Module, cfg: QuantConfig, calib_data: Any = None,
                 disable_level: str = "L0", all_tensors: Mapping[str, Any] | None = None,
                 mix_cfg: Mapping[str, str] | None = None, progress: bool = True) -> None:
        if not isinstance(cfg, QuantConfig):
            raise ConfigError(f"cfg must be a fxquant.QuantConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.float_model = model
        self.rollback_count = parse_disable_level(disable_level)
        ResolveSchemes(default=cfg.scheme, mix_cfg=mix_cfg)  # validates mix_cfg now
        self.mix_cfg = dict(mix_cfg or {})
        self.progress = progress
        if cfg.quant_mode == 0 and calib_data is not None:
            raise ConfigError("quant_mode=0 is data-free but calib_data was given; use quant_mode=1 "
                              "(label-free) or leave calib_data out")
        if cfg.quant_mode == 1 and calib_data is None:
            raise ConfigError("quant_mode=1 (label-free) needs calib_data; for data-free quantization use "
                              "quant_mode=0 with input_shape")
        if calib_data is None and cfg.input_shape is not None:
            calib_data = synthetic_inputs(cfg.input_shape)
            log.info("data-free: calibrating on %d synthetic inputs of shape %s", len(calib_data),
                     list(cfg.input_shape))
        self.batches = normalise_calib_data(calib_data) if calib_data is not None else None
        if self.batches is not None:
            check_fits_signature(model, self.batches)
        self.calib_data = calib_data
        self.all_tensors = _normalise_all_tensors(all_tensors)
        self.device = cfg.torch_device()
        refuse_static_without_data(cfg.scheme, cfg.options, self.batches is not None or bool(self.all_tensors),
                                   self.mix_cfg, "pass calib_data (or input_shape with quant_mode=0 for synthetic inputs)")
        self._model: fx.GraphModule | None = None
        self.sensitivity: dict[str, float] = {}
        self.amp_layers: list[str] = []

    @property
    def model(self) -> fx.GraphModule:
        """The quantized module, called like the original (available after run())."""
        if self._model is None:
            raise RuntimeError("Calibrator.run() has not been called yet")
        return self._model

    def run(self) -> None:
        """Capture, resolve schemes, calibrate, roll back the disable_level most sensitive layers, freeze."""
        cfg = self.cfg
        args, kwargs = self._example_inputs()
        gm = capture(self.float_model, args, kwargs)
        keep_ends = cfg.disable_names is not None and len(cfg.disable_names) == 0  # msModelSlim CV
        resolve = ResolveSchemes(default=cfg.scheme, mix_cfg=self.mix_cfg,
                                 disable_names=list(cfg.disable_names or ()),
                                 disable_first_layer=keep_ends,
                                 disable_last_layer=cfg.disable_last_linear or keep_ends,
                                 small_op_scheme=cfg.scheme if cfg.quant_small_ops else "float")
        gm = PassManager([fold_batchnorm, functional_to_modules, resolve, InsertQuantOprs(cfg.options)])(gm)
        layers = [n for n, m in gm.named_modules() if isinstance(m, WeightedQuantOpr)]
        self._check_all_tensors(gm)
        n = self.rollback_count
        if n > len(layers):
            raise ConfigError(f"disable_level 'L{n}' asks to roll back {n} layers but the model has "
                              f"{len(layers)} quantized layers")
        if cfg.amp_num > len(layers):
            raise ConfigError(f"amp_num={cfg.amp_num} asks to roll back more layers than the model's "
                              f"{len(layers)} quantized layers")
        has_data = self.batches is not None
        if (cfg.keepers.any or cfg.amp_num or cfg.w_method != "minmax") and not has_data:
            raise ConfigError("keep_acc, amp_num and w_method='gptq' need calibration inputs: pass calib_data, "
                              "or input_shape for synthetic ones")
        calibrate = Calibrate(self.calib_data, device=self.device, asym=has_data and cfg.pr > 0, pr=cfg.pr,
                              input_overrides=self.all_tensors, measure_layers=has_data and n > 0,
                              weight_optimizers=self._weight_optimizers(), progress=self.progress)
        gm = PassManager([calibrate])(gm)
        rollback: list[str] = []
        if n > 0:
            self.sensitivity = _sensitivities(gm)
            rollback = sorted(self.sensitivity, key=self.sensitivity.get, reverse=True)[:n]
            log.info("disable_level L%d rolls back %s", n, rollback)
        if cfg.amp_num:
            self.amp_layers = select_amp_rollback(gm, self.batches, cfg.amp_num, already_float=rollback,
                                                  progress=self.progress)
            rollback += self.amp_layers
        if rollback:
            passes = [Rollback(rollback)]
            if calibrate.asym:  # later layers were calibrated on the rolled-back layers' errors
                passes.append(Calibrate(self.calib_data, device=self.device, asym=True, pr=cfg.pr,
                                        input_overrides=self.all_tensors,
                                        weight_optimizers=calibrate.weight_optimizers, progress=self.progress))
            gm = PassManager(passes)(gm)
        gm = PassManager([freeze])(gm).to("cpu")
        gm.meta["fxquant_decisions"] = scheme_decisions(gm)
        self._model = gm.eval()

    def export_quant_onnx(self, name: str, output_dir: str | os.PathLike, input_names: Sequence[str] | None = None,
                          target: str = "qdq") -> Path:
        """Write the quantized model as ONNX into output_dir and return the file's path.

        target "qdq" (default): `{name}.onnx` with QuantizeLinear/DequantizeLinear and int8 weight
        initializers (per output channel, axis 0), opset 18, for onnxruntime and other QDQ runtimes.
        target "ascend": `{name}_ascend.onnx` with AscendQuant -> int8 Conv/MatMul (+ int32 bias) ->
        AscendDequant for ATC. input_names: one name per model input (default: the forward
        parameter names), in the order of forward's parameters. Batch and sequence dimensions stay
        dynamic.
        """
        if target not in ONNX_TARGETS:
            raise ConfigError(f"unknown ONNX target {target!r}; valid: {', '.join(ONNX_TARGETS)}")
        if not isinstance(name, str) or not name or "/" in name:
            raise ConfigError(f"name must be a non-empty file stem without '/', got {name!r}")
        args, kwargs = self._example_inputs()
        if input_names is not None and (isinstance(input_names, str)
                                        or not all(isinstance(n, str) for n in input_names)):
            raise ConfigError(f"input_names must be a list of str, got {input_names!r}")
        proto = to_onnx_model(lower_to_qdq(self.model), args, kwargs, input_names)
        if target == "ascend":
            proto = lower_onnx_to_ascend(proto)
        suffix = "_ascend" if target == "ascend" else ""
        return write_onnx(proto, Path(output_dir) / f"{name}{suffix}.onnx")

    def export_quant_safetensor(self, output_dir: str | os.PathLike) -> None:
        """Seed 004's safetensors export: the Ascend weight format (docs/formats.md) in output_dir,
        `quant_model_weight_{type}.safetensors` + `quant_model_description_{type}.json`."""
        self.save(str(output_dir), save_type=["safe_tensor"])

    def _example_inputs(self) -> tuple[tuple, dict]:
        if self.batches:
            return self.batches[0]
        return (), synthetic_example(self.float_model)

    def _weight_optimizers(self) -> list:
        keep = self.cfg.keepers
        out: list = weight_rounding(self.cfg.w_method)
        if keep.easy_quant:
            out.append(EasyQuantScales(iters=min(keep.easy_quant_iters, 100)))
        if keep.admm:
            out.append(ADMMWeights(iters=keep.admm_iters))
        if keep.round_opt:
            out.append(AdaRound(iters=keep.round_opt_iters))
        return out

    def save(self, output_path: str, save_type: list[str] | None = None, safetensors_name: str | None = None,
             json_name: str | None = None, part_file_size: float | None = None) -> None:
        """Write the Ascend-ready checkpoint (see docs/formats.md) atomically into output_path."""
        from ..formats.ascend_checkpoint import save_ascend

        save_ascend(self.model, self.float_model, output_path, default_scheme=self.cfg.scheme,
                    save_type=save_type, safetensors_name=safetensors_name, json_name=json_name,
                    part_file_size=part_file_size)

    def _check_all_tensors(self, gm: fx.GraphModule) -> None:
        quantized = {n: m for n, m in gm.named_modules() if isinstance(m, QuantOpr)}
        names = sorted(quantized)
        for name in self.all_tensors:
            if name not in quantized:
                close = difflib.get_close_matches(name, names, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"all_tensors names {name!r}, which is not a quantized layer of the "
                                  f"model ({len(names)} quantized layers){hint}")
            if not isinstance(quantized[name].input_quantizer, StaticQuantizer):
                log.warning("all_tensors[%r] given but that layer has no static activation quantizer", name)


def _normalise_all_tensors(all_tensors: Mapping[str, Any] | None) -> dict[str, list[torch.Tensor]]:
    out: dict[str, list[torch.Tensor]] = {}
    for name, value in (all_tensors or {}).items():
        values = [value] if isinstance(value, torch.Tensor) else list(value)
        if not values or not all(isinstance(v, torch.Tensor) for v in values):
            raise CalibrationDataError(f"all_tensors[{name!r}] must be a tensor or a non-empty list of tensors")
        out[name] = values
    return out


def _sensitivities(gm: fx.GraphModule) -> dict[str, float]:
    """Per quantized layer: the output noise-to-signal ratio measured in calibration, or, without
    data, the weight's quantization noise-to-signal ratio."""
    out: dict[str, float] = {}
    for node in gm.graph.nodes:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(module, WeightedQuantOpr):
            continue
        s = node.meta.get("fxquant", {}).get("sensitivity")
        if s is None:
            with torch.no_grad():
                w = module.weight.float()
                s = float(((module.quantized_weight().float() - w) ** 2).sum() / (w**2).sum().clamp(min=1e-30))
        out[node.target] = s
    return out
