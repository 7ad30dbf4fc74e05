"""Calibrate all QuantOprs layer by layer, then turn fake quantization on."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from fxquant.calib_data import check_finite
from fxquant.calibration import CalibrationRunner, WeightOptimizer
from fxquant.errors import CalibrationDataError, ConfigError, FxquantError
from fxquant.quant_opr import QuantOpr
from fxquant.quantizer import StaticQuantizer
from fxquant.storage import graph_live_set_size
from fxquant.streaming_calibration import can_stream, streaming_calibration
from fxquant.timestep import TimestepQuantizer
from fxquant.weighted_quant_opr import WeightedQuantOpr

log = logging.getLogger(__name__)


def needs_activation_data(gm: fx.GraphModule) -> list[str]:
    """Names of QuantOprs with static activation quantizers (they need calibration data)."""
    return [name for name, m in gm.named_modules()
            if isinstance(m, QuantOpr)
            and any(isinstance(q, (StaticQuantizer, TimestepQuantizer)) for q in m.input_quantizers)]


def data_free_refusal(weight_optimizers: bool, measure_layers: bool) -> str:
    """The reason calibration without data refuses weight optimizers or measure_layers (both work
    on the layers' calibration inputs, which data-free calibration does not have)."""
    asked = [what for what, on in (("weight_optimizers (GPTQ, AdaRound, ...)", weight_optimizers),
                                   ("measure_layers", measure_layers)) if on]
    return f"{' and '.join(asked)} work on the layers' calibration inputs: pass calib_data, or leave them out"


@dataclass
class Calibrate:
    """Pass: run CalibrationRunner over `calib_data` (or, with no static activations, only
    calibrate weights, which needs no data). Leaves every QuantOpr with set_quant(True, True).

    measure_layers: also record each QuantOpr's output error and input statistics in
    node.meta["fxquant"] (see CalibrationRunner), for fxquant.inspect and fxquant.report; runs
    the calibration runner even for weight-only and dynamic schemes when calib_data is given.
    streaming: observe in whole float forwards, one sample at a time (fxquant.streaming_calibration)
    instead of the layerwise runner's stored activations; None (default) streams exactly where the
    qparams are the same (no asym, weight optimizers, measure_layers, input_overrides, timestep
    or recurrent layers), False always runs layerwise."""

    calib_data: Any = None
    device: str | torch.device = "cpu"
    asym: bool = False
    offload: bool = True
    progress: bool = True
    input_overrides: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    measure_layers: bool = False
    pr: float = 1.0
    weight_optimizers: Sequence[WeightOptimizer] = ()
    streaming: bool | None = None

    def __post_init__(self) -> None:
        if self.calib_data is None and (self.weight_optimizers or self.measure_layers):
            raise CalibrationDataError(data_free_refusal(bool(self.weight_optimizers), self.measure_layers))

    def _calibrate_streaming(self, gm: fx.GraphModule) -> bool:
        """Streaming calibration; False when a sample fails in a forward, so that the layerwise
        runner, which runs node by node, names the sample and the node it fails at."""
        try:
            streaming_calibration(gm, self.calib_data, progress=self.progress)
        except FxquantError:
            raise
        except Exception:  # noqa: BLE001 - re-run layerwise for the diagnosis
            log.debug("streaming calibration failed; calibrating layerwise", exc_info=True)
            return False
        return True

    def _may_stream(self, gm: fx.GraphModule) -> bool:
        """Whole forward passes instead of layerwise storage: when asked (streaming=True, refused
        where it would differ) or, by default, where the two give the same qparams."""
        equal = (not self.asym and not self.weight_optimizers and not self.measure_layers
                 and not self.input_overrides and can_stream(gm))
        if self.streaming and not equal:
            raise ConfigError("streaming calibration needs asym=False, no weight optimizers, no measure_layers, "
                              "no input_overrides and no timestep or recurrent layers; use streaming=None")
        return equal if self.streaming is None else self.streaming

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        gm.eval()  # calibrate what inference runs: no dropout, BatchNorm on running statistics
        static = needs_activation_data(gm)
        wants_runner = static or self.measure_layers or self.weight_optimizers  # asym only matters for static inputs
        if self.calib_data is None and static:
            missing = [n for n in static if n not in self.input_overrides]
            if missing:
                raise CalibrationDataError(
                    f"{len(missing)} layers quantize activations statically (e.g. {missing[0]!r}) and "
                    "need calibration data: pass calib_data, or use a weight-only or dynamic scheme")
            self._calibrate_from_overrides(gm)
        elif wants_runner and self.calib_data is not None:
            if not (self._may_stream(gm) and self._calibrate_streaming(gm)):
                runner = CalibrationRunner(gm, self.calib_data, input_overrides=self.input_overrides,
                                           measure_layers=self.measure_layers, pr=self.pr,
                                           weight_optimizers=self.weight_optimizers)
                runner.layerwise_calibration(self.device, asym=self.asym, w_quant=True, a_quant=True,
                                             offload=self.offload, progress=self.progress)
                gm.meta["fxquant_peak_live"] = runner.storage.peak_live
                gm.meta["fxquant_live_set"] = graph_live_set_size(gm.graph, runner.nodes_to_run())
        else:
            for m in gm.modules():
                if isinstance(m, WeightedQuantOpr):
                    m.calibrate_weight()
        for m in gm.modules():
            if isinstance(m, QuantOpr):
                m.set_quant(True, True)
        return gm

    def _calibrate_from_overrides(self, gm: fx.GraphModule) -> None:
        """Data-free: weights from themselves, static inputs from input_overrides only."""
        for name, m in gm.named_modules():
            if isinstance(m, WeightedQuantOpr):
                m.calibrate_weight()
            if isinstance(m, QuantOpr) and isinstance(m.input_quantizer, StaticQuantizer):
                q = m.input_quantizer
                q.reset_observer()
                for i, t in enumerate(self.input_overrides[name]):
                    check_finite(t, f"all_tensors[{name!r}][{i}]")
                    q.observe(t)
                q.calc_qparams()
