"""Layerwise calibration (seed 003): run the graph node by node over every calibration batch.

For each node in topological order: observe the inputs of a QuantOpr and set its activation
qparams, calibrate its weight, run the node on every batch, store its outputs and release the
values whose consumers have all run. Peak memory is the model plus the live activations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx
from tqdm.auto import tqdm

from .calib_data import CalibBatch, check_finite, normalise_calib_data
from .errors import FxquantError
from .ir import fxq_meta, get_attr_path
from .layer_major import ancestors, bound_inputs, run_node
from .layer_metrics import ErrorStats, TensorStats
from .quant_opr import QuantOpr
from .quantizer import StaticQuantizer
from .resources import file_mapped_ranges, page_out_file_pages, release_freed_memory
from .storage import ActivationStorage
from .timestep import TimestepQuantizer, step_indices
from .weighted_quant_opr import WeightedQuantOpr

log = logging.getLogger(__name__)

#: f(layer, its calibration inputs, its float outputs), e.g. fxquant.keep_acc.AdaRound()
WeightOptimizer = Callable[[WeightedQuantOpr, list[torch.Tensor], list[torch.Tensor]], None]


class OutputsOfInputs(list):
    """A WeightOptimizer's targets when they are the float layer's outputs on exactly the inputs
    passed beside them (no quantized storage or input override between the two): y = layer(x), so
    an optimizer may measure output error as ||(W' - W) x||. Otherwise the targets come as a
    plain list."""


class CalibrationRunner:
    """Calibrates the QuantOprs of a GraphModule layer by layer.

    model: GraphModule after insert_quant_oprs. calib_data: seed 000 template, or set later
    through prepare_calibration.
    """

    def __init__(self, model: fx.GraphModule, calib_data: Any = None,
                 input_overrides: dict[str, list[torch.Tensor]] | None = None,
                 measure_layers: bool = False, pr: float = 1.0, seed: int = 0,
                 weight_optimizers: Sequence[WeightOptimizer] = ()) -> None:
        """input_overrides: {layer name: tensors} observed instead of that layer's stored inputs
        (msModelSlim's all_tensors). measure_layers: record in each QuantOpr's
        node.meta["fxquant"] its output error on its calibration inputs ("sensitivity": the
        noise-to-signal ratio; "error": sqnr_db and rel_error) and its first input's statistics
        ("input_stats": min, max, absmax, std, outlier_ratio); costs one more quantized run of
        each QuantOpr. pr: with asym, the
        probability that an element of a stored quantized output is the quantized value rather
        than the float one (QDrop-style mixing; 1.0 = fully quantized). weight_optimizers: called
        as f(layer, inputs, float_outputs) after each weighted layer is calibrated (keep_acc); the
        outputs come as OutputsOfInputs where they are the float layer's on those very inputs."""
        self.model = model
        self.input_overrides = dict(input_overrides or {})
        self.measure_layers = measure_layers
        if not 0.0 <= pr <= 1.0:
            raise FxquantError(f"pr must be in [0, 1], got {pr}")
        self.pr = pr
        self.weight_optimizers = list(weight_optimizers)
        self._generator = torch.Generator().manual_seed(seed)
        self.batches: list[CalibBatch] | None = (
            normalise_calib_data(calib_data) if calib_data is not None else None)
        self.storage: ActivationStorage | None = None
        self.qstorage: ActivationStorage | None = None
        self._inputs: dict[fx.Node, list[Any]] = {}

    def prepare_calibration(self, calib_data: Any = None) -> None:
        """Bind every batch to the graph inputs and keep those input values for the first layers."""
        if calib_data is not None:
            self.batches = normalise_calib_data(calib_data)
        if self.batches is None:
            raise FxquantError("no calibration data: pass calib_data to the runner or prepare_calibration")
        has_steps = any(isinstance(m, TimestepQuantizer) for m in self.model.modules())
        self.batch_steps = step_indices(self.batches) if has_steps else None
        self._inputs = bound_inputs(self.model, self.batches)

    @torch.no_grad()
    def layerwise_calibration(
        self,
        device: str | torch.device = "cpu",
        asym: bool = False,
        w_quant: bool = False,
        a_quant: bool = False,
        offload: bool = True,
        progress: bool = True,
    ) -> None:
        """Calibrate every QuantOpr in topological order.

        asym: keep a second storage of quantized outputs (QuantOprs run with set_quant(w_quant,
        a_quant)); later input observers see those quantized values, so errors propagate.
        offload: keep stored activations on the CPU while nodes run on `device`.
        """
        if not self._inputs:
            self.prepare_calibration()
        device = torch.device(device)
        keep = "cpu" if offload else None
        graph = self.model.graph
        self.model.to(device)
        self._modules = dict(self.model.named_modules())
        run = self.nodes_to_run()
        self.storage = ActivationStorage(graph, keep, run)
        self.qstorage = ActivationStorage(graph, keep, run) if asym else None
        n_batches = len(self.batches)
        nodes = [n for n in graph.nodes if n in run]
        seen_modules: set[str] = set()  # a module called at several places is observed at all of them
        last_calls = {n.target: n for n in nodes if n.op == "call_module"}
        file_ranges = file_mapped_ranges()
        for node in tqdm(nodes, desc="calibrating", unit="node", disable=not progress):
            if node.op == "placeholder":
                values = self._inputs[node]
                self.storage.set(node, values)
                if asym:
                    self.qstorage.set(node, values)
            elif node.op in ("call_module", "call_function", "call_method"):
                module = self._modules.get(node.target) if node.op == "call_module" else None
                first_call = node.target not in seen_modules
                if isinstance(module, QuantOpr):
                    seen_modules.add(node.target)
                    module.set_quant(False, False)
                    self._calibrate_inputs(node, module, self.qstorage if asym else self.storage,
                                           first_call)
                    if isinstance(module, WeightedQuantOpr) and first_call:
                        module.calibrate_weight()
                    if first_call:
                        self._calibrate_internal(node, module, self.qstorage if asym else self.storage)
                outs = [self._run(node, self.storage, b, device) for b in range(n_batches)]
                if isinstance(module, WeightedQuantOpr) and self.weight_optimizers and first_call:
                    self._optimize_weight(node, module, self.qstorage if asym else self.storage, outs)
                if isinstance(module, QuantOpr) and self.measure_layers:
                    self._measure(node, module, self.qstorage if asym else self.storage, outs, device)
                self.storage.set(node, outs)
                if asym:
                    self.qstorage.set(node, self._quantized_outputs(node, module, outs, device,
                                                                    w_quant, a_quant))
            for store in (self.storage, self.qstorage):
                if store is not None:
                    store.finish_node(node)
            if node.op == "call_module" and isinstance(module, QuantOpr):
                if (isinstance(module, WeightedQuantOpr) and last_calls[node.target] is node and file_ranges
                        and not module.float_weight_released):
                    # calibration has read this float weight for the last time: its file pages
                    # (mmap loading) need not stay resident while the later layers run
                    page_out_file_pages(module.weight, file_ranges)
                release_freed_memory()  # released values leave holes that pin pages otherwise
        for store in (self.storage, self.qstorage):
            if store is not None:
                store.assert_empty()
        self._inputs = {}
        log.info("calibrated %d nodes over %d batches (peak %d live stored values)",
                 len(nodes), n_batches, self.storage.peak_live)

    def nodes_to_run(self) -> set[fx.Node]:
        """Nodes calibration must execute: every QuantOpr, every node one depends on, and checks
        with no consumers (input guards, asserts). Others, such as a float lm_head whose logits
        only reach the output, are skipped and never stored."""
        modules = dict(self.model.named_modules())
        run = ancestors(n for n in self.model.graph.nodes
                        if (n.op == "call_module" and isinstance(modules.get(n.target), QuantOpr))
                        or (n.op in ("call_function", "call_method") and not n.users))
        run.update(n for n in self.model.graph.nodes if n.op == "placeholder")
        return run

    def _calibrate_internal(self, node: fx.Node, module: QuantOpr, store: ActivationStorage) -> None:
        """module.calibrate_from_inputs with the stored values of the node's first input."""
        first = next((a for a in node.args if isinstance(a, fx.Node)), None)
        if first is not None and first.op != "get_attr":
            module.calibrate_from_inputs(list(store.get(first)))

    def _optimize_weight(self, node: fx.Node, module: WeightedQuantOpr, store: ActivationStorage,
                         outs: list[Any]) -> None:
        """Run the weight optimizers on the layer's stored inputs and its float outputs."""
        arg = next(a for a in node.args if isinstance(a, fx.Node))
        inputs = self.input_overrides.get(node.target) or store.get(arg)
        of_inputs = store is self.storage and node.target not in self.input_overrides
        module.set_quant(False, False)
        for optimize in self.weight_optimizers:
            optimize(module, list(inputs), OutputsOfInputs(outs) if of_inputs else list(outs))

    def _quantized_outputs(self, node: fx.Node, module: Any, outs: list[Any], device: torch.device,
                           w_quant: bool, a_quant: bool) -> list[Any]:
        """Outputs of `node` computed from the quantized storage; shares `outs` when nothing differs."""
        qs = self.qstorage
        if isinstance(module, QuantOpr):
            module.set_quant(w_quant, a_quant)
            try:
                qouts = [self._run(node, qs, b, device) for b in range(len(self.batches))]
            finally:
                module.set_quant(False, False)
            if self.pr < 1.0:
                qouts = [self._mix(q, f) for q, f in zip(qouts, outs)]
            return qouts
        same = all(qs.get(n) is self.storage.get(n) for n in node.all_input_nodes if n.op != "get_attr")
        if same:
            return outs
        return [self._run(node, qs, b, device) for b in range(len(self.batches))]

    def _mix(self, quant: Any, flt: Any) -> Any:
        """Element-wise: the quantized value with probability pr, else the float value."""
        if not isinstance(quant, torch.Tensor) or not quant.is_floating_point():
            return quant
        keep = torch.rand(quant.shape, generator=self._generator) < self.pr
        return torch.where(keep.to(quant.device), quant, flt)

    @torch.no_grad()
    def _measure(self, node: fx.Node, module: QuantOpr, store: ActivationStorage, outs: list[Any],
                 device: torch.device) -> None:
        """Record the QuantOpr's output error (quantized vs float, both on the float storage's
        inputs) and its first input's statistics (from `store`) in node.meta["fxquant"]."""
        error = ErrorStats()
        module.set_quant(True, True)
        try:
            for b, out in enumerate(outs):
                error.add(self._run(node, self.storage, b, device), out)
        finally:
            module.set_quant(False, False)
        stats = TensorStats()
        first = next((a for a in node.args if isinstance(a, fx.Node)), None)
        if first is not None and first.op != "get_attr":
            for value in store.get(first):
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    stats.add(value)
        meta = fxq_meta(node)
        meta["sensitivity"] = error.noise_to_signal
        meta["error"] = error.as_dict()
        if stats.count:
            meta["input_stats"] = stats.as_dict()

    def _calibrate_inputs(self, node: fx.Node, module: QuantOpr, store: ActivationStorage,
                          first_call: bool = True) -> None:
        """Feed each stored input of `node` (or its input_overrides) to its input quantizer's
        observer and set its qparams. A module called at several nodes keeps one observer over
        all of its calls (first_call=False adds this call's inputs to what earlier calls showed),
        so its one set of qparams covers every call site; weights and weight optimizers run at
        the first call only."""
        tensor_args = [a for a in node.args if isinstance(a, fx.Node)]
        for i, (quantizer, arg) in enumerate(zip(module.input_quantizers, tensor_args)):
            if not isinstance(quantizer, (StaticQuantizer, TimestepQuantizer)):
                continue
            if first_call:
                quantizer.reset_observer()
            if i == 0 and node.target in self.input_overrides:
                values = self.input_overrides[node.target]
            elif arg.op == "get_attr":
                values = [get_attr_path(self.model, arg.target)] * len(self.batches)
            else:
                values = store.get(arg)
            for b, value in enumerate(values):
                check_finite(value, f"the input of {node.target!r} (from node {arg.name!r}) in "
                                    f"calibration batch {b}")
                if isinstance(quantizer, TimestepQuantizer):
                    quantizer.step = self.batch_steps[b]
                quantizer.observe(value)
            quantizer.calc_qparams()

    def _value(self, node: fx.Node, store: ActivationStorage, b: int, device: torch.device) -> Any:
        if node.op == "get_attr":
            return get_attr_path(self.model, node.target)
        value = store.get(node)[b]
        if store.offload is not None:
            value = torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), value)
        return value

    def _run(self, node: fx.Node, store: ActivationStorage, b: int, device: torch.device) -> Any:
        return run_node(node, self._modules, lambda n: self._value(n, store, b, device), b)
