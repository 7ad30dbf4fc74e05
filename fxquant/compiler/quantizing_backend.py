"""torch.compile(float_model, backend=fxquant.quantizing_backend(...)): quantize what Dynamo captures.

Each graph Dynamo hands over (one per graph break) is lifted into fxquant's IR and quantized with
the passes of fxquant.quantize, then compiled by the "fxquant" backend. Calibration needs every
graph's inputs over the calibration data, and with graph breaks those are intermediate values that
only running the model gives. So the first call of the compiled module runs `calib_data` through
it once (the graphs run float and record their inputs), then quantizes every graph, each layer
named and judged (first / last layer, mix_cfg, disable_names) as in the whole model; that call and
all later ones run quantized. Graphs Dynamo hands over later (new shapes) reuse the calibrated
layers by name, and fold the smoothing scales those layers were calibrated with (ReplaySmoothing).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from fxquant.api import quantization_passes
from fxquant.calib_data import normalise_calib_data
from fxquant.errors import CalibrationDataError, ConfigError
from fxquant.passes import (
    Freeze,
    InsertQuantOprs,
    PassManager,
    ReplaySmoothing,
    ResolveSchemes,
    SmoothQuant,
    fold_batchnorm,
    functional_to_modules,
)
from fxquant.passes.calibrate import needs_activation_data
from fxquant.passes.replay_smoothing import smoothing_of
from fxquant.quant_opr import QuantOpr
from fxquant.schemes import SchemeOptions, make_scheme
from fxquant.weighted_quant_opr import WeightedQuantOpr

from .backend import CompileBackend, compile_backend
from .dynamo_graph import LiftedGraph, lift_dynamo_graph

log = logging.getLogger(__name__)


class _CompiledGraph:
    """What the backend returns for one Dynamo graph: float while calibration records its inputs,
    its quantized, compiled form afterwards."""

    def __init__(self, backend: QuantizingBackend, dynamo_gm: fx.GraphModule, lifted: LiftedGraph) -> None:
        self.backend = backend
        self.dynamo_gm = dynamo_gm
        self.lifted = lifted
        self.recorded: list[list[Any]] = []
        self.quantized: fx.GraphModule | None = None
        self.compiled: Callable[..., Any] | None = None
        self.inner: CompileBackend | None = None

    def __call__(self, *args: Any) -> Any:
        backend = self.backend
        if backend.phase == "pending":
            backend.calibrate()
        if backend.phase == "recording":
            self.recorded.append([a.detach() if isinstance(a, torch.Tensor) else a
                                  for a in self.lifted.inputs_of(args)])
            return self.dynamo_gm(*args)
        if self.compiled is None:
            backend.quantize_late_graph(self)
        return self.compiled(*self.lifted.inputs_of(args))


def _compiled_module_on_stack() -> torch.nn.Module | None:
    """The torch.compile'd module (OptimizedModule) whose call is running, found on the call stack."""
    from torch._dynamo.eval_frame import OptimizedModule

    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, OptimizedModule):
            return candidate
        frame = frame.f_back
    return None


@dataclass
class QuantizingBackend:
    """A torch.compile backend that quantizes the float model it compiles (see quantizing_backend).

    After calibration, `graphs` holds one entry per Dynamo graph (its `quantized` GraphModule and
    `inner` CompileBackend) and `layers` the quantized layers by name."""

    scheme: str
    calib_data: Any = field(repr=False)
    mix_cfg: dict[str, str] | None = None
    disable_names: Sequence[str] = ()
    options: SchemeOptions | None = None
    disable_last_layer: bool = True
    disable_first_layer: bool = False
    small_op_scheme: str = "float"
    asym: bool = False
    smooth_alpha: float | None = None
    progress: bool = False
    inner: str | Callable[..., Any] = "inductor"
    phase: str = field(default="pending", init=False)  # pending -> recording -> quantized
    graphs: list[_CompiledGraph] = field(default_factory=list, init=False, repr=False)
    layers: dict[str, QuantOpr] = field(default_factory=dict, init=False, repr=False)
    model_layers: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        make_scheme(self.scheme, self.options)
        self._resolve()  # checks mix_cfg, disable_names and small_op_scheme now, not at the first call
        if self.calib_data is None:
            raise CalibrationDataError("quantizing_backend needs calib_data: the first call runs it through the "
                                       "model to find and calibrate every graph Dynamo captures (graph breaks "
                                       "included); weight-only and dynamic schemes need one sample")
        self._batches = normalise_calib_data(self.calib_data)
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise ConfigError(f"smooth_alpha={self.smooth_alpha} must be in [0, 1]")

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        graph = _CompiledGraph(self, gm, lift_dynamo_graph(gm, example_inputs))
        self.graphs.append(graph)
        log.info("quantizing backend: Dynamo graph %d, %d layers, %d inputs", len(self.graphs),
                 len(graph.lifted.layer_names), len(graph.lifted.input_positions))
        return graph

    def calibrate(self) -> None:
        """Run calib_data through the compiled module (graphs run float and record their inputs), then
        quantize every graph that ran, judging first / last layer against all of them in order."""
        module = _compiled_module_on_stack()
        if module is None:
            raise ConfigError("quantizing_backend calibrates by running calib_data through the compiled "
                              "module: compile an nn.Module, torch.compile(model, backend=quantizing_backend(...)), "
                              "not a function or a bound method")
        self.phase = "recording"
        try:
            with torch.no_grad():
                for args, kwargs in self._batches:
                    module(*args, **kwargs)
            ran = [g for g in self.graphs if g.recorded]
            self.model_layers = [name for g in ran for name in g.lifted.layer_names]
            for graph in ran:
                self._quantize(graph)
        except BaseException:
            self.phase = "pending"
            for graph in self.graphs:
                graph.recorded.clear()
            raise
        self.phase = "quantized"

    def _resolve(self, strict_names: bool = True) -> ResolveSchemes:
        return ResolveSchemes(default=self.scheme, mix_cfg=self.mix_cfg, disable_names=list(self.disable_names),
                              disable_last_layer=self.disable_last_layer, disable_first_layer=self.disable_first_layer,
                              small_op_scheme=self.small_op_scheme, model_layers=self.model_layers,
                              strict_names=strict_names)

    def _quantize(self, graph: _CompiledGraph) -> None:
        """fxquant.quantize's passes on one lifted graph, calibrated on the inputs it recorded."""
        data = graph.recorded
        smooth = SmoothQuant(data, alpha=self.smooth_alpha) if self.smooth_alpha is not None else None
        passes = quantization_passes(self._resolve(), self.options or SchemeOptions(), data, suppression=smooth,
                                     asym=self.asym, progress=self.progress)
        qgm = PassManager(passes)(graph.lifted.gm)
        graph.recorded = []
        for name, module in qgm.named_modules():
            if isinstance(module, QuantOpr):
                if name in self.layers:
                    log.warning("layer %s was calibrated in two Dynamo graphs (calibration samples of different "
                                "shapes or arguments); the later graph keeps its own calibration", name)
                self.layers[name] = module
        self._install(graph, qgm)

    def quantize_late_graph(self, graph: _CompiledGraph) -> None:
        """A graph Dynamo hands over after calibration (a recompilation, e.g. for a new shape): layers
        calibration reached become the calibrated QuantOprs of the same names; a layer it never
        reached is quantized if its scheme needs no activation data, else CalibrationDataError. Layers
        smoothed in calibration get their inputs divided by the same scales (ReplaySmoothing)."""
        options = self.options or SchemeOptions()
        smoothed = self.smoothing()
        replay = [ReplaySmoothing(smoothed)] if smoothed else []
        gm = PassManager([fold_batchnorm, functional_to_modules, self._resolve(strict_names=False), *replay,
                          InsertQuantOprs(options)])(graph.lifted.gm)
        for name, module in list(gm.named_modules()):
            if isinstance(module, QuantOpr) and name in self.layers:
                gm.set_submodule(name, self.layers[name])
        static = [n for n in needs_activation_data(gm) if n not in self.layers]
        if static:
            raise CalibrationDataError(
                f"Dynamo compiled a graph with layers no calibration sample reached ({static[:3]}); add "
                "calibration samples that run through them (same shapes and arguments as the calls)")
        for name, module in gm.named_modules():
            if isinstance(module, QuantOpr) and name not in self.layers:
                if isinstance(module, WeightedQuantOpr):
                    module.calibrate_weight()
                module.set_quant(True, True)
        self._install(graph, PassManager([Freeze()])(gm))

    def smoothing(self) -> dict[str, tuple[str, torch.Tensor]]:
        """{layer: (fold kind, s [k])} of every layer smoothed in the graphs quantized so far (read
        from their node.meta, where SmoothQuant records it)."""
        return {name: fold for g in self.graphs if g.quantized is not None
                for name, fold in smoothing_of(g.quantized).items()}

    def _install(self, graph: _CompiledGraph, qgm: fx.GraphModule) -> None:
        graph.quantized = qgm.eval()
        graph.inner = compile_backend(inner=self.inner)
        graph.compiled = torch.compile(qgm, backend=graph.inner)


def quantizing_backend(scheme: str = "w8a8", calib_data: Any = None, **kwargs: Any) -> QuantizingBackend:
    """A torch.compile backend that quantizes the float module it compiles with fxquant.quantize's
    passes, then compiles the result with the "fxquant" backend:

        compiled = torch.compile(model, backend=fxquant.quantizing_backend("w8a8", calib_data=data))
        compiled(x)   # the first call calibrates on calib_data, then runs quantized

    calib_data: samples of the module's inputs, as for fxquant.quantize; required (the first call
    runs them through the model to find and calibrate every graph Dynamo captures, graph breaks
    included). kwargs: mix_cfg, disable_names, options, disable_last_layer, disable_first_layer,
    small_op_scheme, asym, smooth_alpha and progress as fxquant.quantize takes them; inner: what
    compiles the quantized graphs ("inductor", "eager" or a backend callable).
    Calibration samples of one shape give one graph per graph break, calibrated on all of them.
    """
    return QuantizingBackend(scheme, calib_data, **kwargs)
