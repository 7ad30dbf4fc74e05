"""Capture a model as a torch.fx.GraphModule in fxquant's IR.

Front ends, tried in order: torch.fx symbolic tracing (quantizable layers as leaves), then
torch.export(strict=False) with dynamic dimensions, normalised so that every Linear/Conv call is a
call_module node named by the layer's original fully qualified name. Both give a GraphModule whose
forward takes the original argument names and returns the original output type.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx
from torch.fx.graph import CodeGen, _PyTreeCodeGen, _PyTreeInfo
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from . import guards
from .captured_module import CapturedGraphModule, quiet_treespec_copies
from .errors import CaptureError, ConfigError
from .ir import bind_inputs, get_attr_path
from .quant_opr import QuantOpr
from .quant_opr_table import QUANTIZABLE_LAYERS
from .tracing import TRACE_LOCK

log = logging.getLogger(__name__)

_ATEN_LAYER_OPS = {
    torch.ops.aten.linear.default: torch.nn.Linear,
    torch.ops.aten.conv1d.default: torch.nn.Conv1d,
    torch.ops.aten.conv2d.default: torch.nn.Conv2d,
}


_PASSTHROUGH_ATTRS = ("config", "generation_config", "main_input_name")
_SHAPE_GUARDS = "input_shape_guards"  # the submodule that checks torch.export's shape conditions


class QuantLeafTracer(fx.Tracer):
    """fx.Tracer that keeps torch.nn modules (quantizable layers included) as leaves.

    fx patches `nn.Module.__call__` and `__getattr__` process-wide while it traces; this tracer
    answers those patched calls only in the thread that traces, so that models running in other
    threads (calibration, inference) meanwhile see plain module calls, not proxies.
    """

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self._tracing_thread = threading.get_ident()
        return super().trace(root, concrete_args)

    def _other_thread(self) -> bool:
        return threading.get_ident() != getattr(self, "_tracing_thread", None)

    def call_module(self, m: torch.nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if self._other_thread():
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self._other_thread():
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, QUANTIZABLE_LAYERS) or super().is_leaf_module(m, qualname)


class _SignatureCodeGen(_PyTreeCodeGen):
    """Plain forward(arg=default, ...) signature, original output type rebuilt from `out_spec`."""

    def gen_fn_def(self, free_vars, maybe_return_annotation, *, expanded_def: bool = False) -> str:
        return CodeGen.gen_fn_def(self, free_vars, maybe_return_annotation, expanded_def=expanded_def)

    def process_inputs(self, *inputs: Any) -> Any:
        return inputs


def capture(
    model: torch.nn.Module,
    example_inputs: tuple = (),
    example_kwargs: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Capture `model` as a GraphModule in fxquant's IR.

    example_inputs / example_kwargs: one real call (tensors of any shape). Tensor inputs stay graph
    inputs; other values are baked in (the graph rejects calls that change them).
    Raises CaptureError with the reason of every front end when none succeeds.
    """
    example_kwargs = dict(example_kwargs or {})
    quantized = [name for name, m in model.named_modules() if isinstance(m, QuantOpr)]
    if quantized:
        raise ConfigError(f"{type(model).__name__} is already quantized ({len(quantized)} QuantOprs, e.g. "
                          f"{quantized[0]!r}); quantize the float model instead")
    if isinstance(model, fx.GraphModule) and model.meta.get("fxquant_capture"):
        with quiet_treespec_copies():
            graph = copy.deepcopy(model.graph)
        gm = CapturedGraphModule(model, graph, type(model).__name__)
        gm.meta.update(model.meta)
        _pass_through_attributes(model, gm)
        return gm.eval()  # a new graph and module tree: passes never mutate the caller's graph
    was_training = model.training
    with TRACE_LOCK:  # torch's tracers are not thread-safe
        model.eval()
        try:
            return _capture_with_front_ends(model, example_inputs, example_kwargs)
        finally:
            model.train(was_training)


def _pass_through_attributes(model: torch.nn.Module, gm: fx.GraphModule) -> None:
    """Give gm the model's attributes that callers read (config, ...): HF wrappers such as
    sentence-transformers, and generation utilities, look them up."""
    for attr in _PASSTHROUGH_ATTRS:
        if hasattr(model, attr) and not hasattr(gm, attr):
            setattr(gm, attr, getattr(model, attr))


def _capture_with_front_ends(model: torch.nn.Module, example_inputs: tuple,
                             example_kwargs: dict[str, Any]) -> fx.GraphModule:
    """The first front end's GraphModule; CaptureError with every front end's reason otherwise."""
    errors: dict[str, str] = {}
    for front_end in (_symbolic_capture, _export_capture):
        try:
            gm = front_end(model, example_inputs, example_kwargs)
        except Exception as exc:  # noqa: BLE001 - every front end failure is reported together
            errors[front_end.__name__.strip("_")] = f"{type(exc).__name__}: {exc}".strip()[:2000]
            log.debug("capture with %s failed", front_end.__name__, exc_info=True)
            continue
        gm.meta["fxquant_capture"] = front_end.__name__.strip("_").replace("_capture", "")
        gm.meta["fxquant_state_names"] = _state_names(model, gm)
        _pass_through_attributes(model, gm)
        log.info("captured %s with %s (%d nodes)", type(model).__name__,
                 gm.meta["fxquant_capture"], len(gm.graph.nodes))
        return gm.eval()
    reasons = "\n".join(f"  - {name}: {why}" for name, why in errors.items())
    raise CaptureError(f"could not capture {type(model).__name__} as an FX graph:\n{reasons}")


def _state_names(model: torch.nn.Module, gm: fx.GraphModule) -> dict[str, str]:
    """{name in model.state_dict(): the graph module's path to the same tensor}, for every state
    tensor the graph holds: a checkpoint saved from the graph then carries the model's own names
    (both names of a tied weight, no non-persistent buffer)."""
    held: dict[int, str] = {}
    for path, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        held.setdefault(id(t), path)
    return {name: held[id(t)] for name, t in model.state_dict(keep_vars=True).items() if id(t) in held}


def _symbolic_capture(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> fx.GraphModule:
    sig = inspect.signature(model.forward)
    bound = sig.bind_partial(*args, **kwargs).arguments
    constants = [k for k, v in bound.items() if not isinstance(v, torch.Tensor)]
    if constants:
        raise CaptureError(f"non-tensor inputs {constants} need specialisation; left to torch.export")
    tracer = QuantLeafTracer()
    graph = tracer.trace(model)
    gm = CapturedGraphModule(tracer.root, graph, type(model).__name__)
    if args or kwargs:
        with torch.no_grad():
            ShapeProp(gm).propagate(*bind_inputs(gm, args, kwargs).values())
    return gm


@contextlib.contextmanager
def _without_stack_traces() -> Iterator[None]:
    """torch.export without node.meta["stack_trace"] (the Python stack of every traced op, which
    fxquant never reads): SmolLM2's capture takes 13% less time (6.7 s -> 5.8 s). torch keeps the
    switch in its fx config; it is set only while TRACE_LOCK is held and restored after."""
    previous = torch.fx.config.do_not_emit_stack_traces
    torch.fx.config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        torch.fx.config.do_not_emit_stack_traces = previous


def _export_capture(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> fx.GraphModule:
    sig = inspect.signature(model.forward)
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_POSITIONAL and args:
            raise CaptureError(
                f"forward(*{p.name}) takes a variable number of positional inputs, which torch.export "
                f"cannot name; wrap the model in a module whose forward names each input, e.g. "
                f"`forward(self, a, b): return model(a, b)`, and quantize the wrapper")
    bound = dict(sig.bind_partial(*args, **kwargs).arguments)
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD and bound.get(p.name):
            raise CaptureError(f"inputs {sorted(bound[p.name])} are not named parameters of "
                               f"{type(model).__name__}.forward (they would go to **{p.name}); "
                               "pass only the named inputs")
    forced = {}
    if "use_cache" in sig.parameters and bound.get("use_cache", False) is False:
        # a captured graph keeps no KV cache: use_cache=False, given or not, becomes its default
        forced["use_cache"] = bound["use_cache"] = False
    dynamic = {
        k: ({i: torch.export.Dim.AUTO for i in range(v.dim())} if isinstance(v, torch.Tensor) else None)
        for k, v in bound.items()
    }
    # torch.export specialises dimensions of size 1: a batch-1 example (seed 000's template) would
    # give a graph that accepts batch 1 only. Export with the batch repeated to 2 first.
    widened = {k: v.repeat(2, *[1] * (v.dim() - 1)) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 1
               else v for k, v in bound.items()}
    with _without_stack_traces():
        try:
            ep = torch.export.export(model, (), widened, dynamic_shapes=dynamic, strict=False)
        except Exception:  # noqa: BLE001 - a model whose leading size-1 dims are not a batch: export as given
            if all(widened[k] is bound[k] for k in bound):
                raise
            log.debug("export with the batch repeated to 2 failed; exporting the example as given", exc_info=True)
            ep = torch.export.export(model, (), bound, dynamic_shapes=dynamic, strict=False)
    src = ep.module(check_guards=False)  # torch's guard module does not pickle: ShapeGuards replaces it
    return _normalise_exported(src, model, sig, bound, forced, _export_shape_guards(ep, src))


def _export_shape_guards(ep: torch.export.ExportedProgram, src: fx.GraphModule) -> guards.ShapeGuards | None:
    """The shape conditions `ep.module()` would check (specialised and related dimensions, ranges,
    the tracer's guards), as a ShapeGuards over src's placeholders; None if there are none."""
    from torch.export import _unlift  # where ExportedProgram.module() writes the same conditions

    placeholders = src.graph.find_nodes(op="placeholder")
    if not placeholders or not ep.example_inputs:
        return None
    sig = inspect.signature(src.forward)
    paths = _unlift._get_input_paths(ep.example_inputs, sig)
    code = _unlift._get_input_guards_for_graph(placeholders, ep.range_constraints, paths)
    code += _unlift._force_gm_signature_match(_unlift._force_ep_signature_match(ep._guards_code, paths), sig)
    conditions = []
    for condition in code:
        actual = readable = condition
        for i, path in enumerate(paths):
            source = "L" + pytree.keystr(path)
            actual = actual.replace(source, f"args[{i}]")
            readable = readable.replace(source, path[0].key + pytree.keystr(path[1:]))
        conditions.append((actual, " ".join(readable.split())))
    return guards.ShapeGuards(conditions) if conditions else None


def _normalise_exported(src: fx.GraphModule, model: torch.nn.Module, sig: inspect.Signature,
                        bound: dict[str, Any], forced: dict[str, Any],
                        shape_guards: guards.ShapeGuards | None) -> fx.GraphModule:
    """Rebuild an exported module in the IR: signature placeholders, guards, call_module layers.

    forced: inputs fxquant specialised on its own (use_cache=False); they become the defaults.
    shape_guards: called on src's placeholders, in their order, before anything else runs.
    """
    graph = fx.Graph()
    src_phs = [n for n in src.graph.nodes if n.op == "placeholder"]
    if len(src_phs) != len(bound):
        raise CaptureError(f"exported graph has {len(src_phs)} inputs for {len(bound)} example inputs")
    src_by_name = dict(zip(bound, src_phs))
    val_map: dict[fx.Node, fx.Node] = {}
    names: list[str] = []
    seen_default = False
    var_keyword = None
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            var_keyword = p.name
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        has_default = p.default is not inspect.Parameter.empty
        seen_default = seen_default or has_default
        default = p.default if has_default else (None if seen_default else inspect.Signature.empty)
        default = forced.get(p.name, default)
        ph = graph.placeholder(p.name, default_value=default)
        names.append(p.name)
        if p.name in bound:
            value = bound[p.name]
            val_map[src_by_name[p.name]] = ph
            ph.meta.update(src_by_name[p.name].meta)
            if isinstance(value, torch.Tensor):
                graph.call_function(guards.expect_tensor, (ph, p.name))
            else:
                graph.call_function(guards.expect_constant, (ph, value, p.name))
        else:
            graph.call_function(guards.expect_unused, (ph, None if default is inspect.Signature.empty
                                                        else default, p.name))
    if var_keyword is not None:
        extra = graph.placeholder(f"**{var_keyword}")
        graph.call_function(guards.expect_no_tensors, (extra, var_keyword))
    root: dict[str, Any] = {}
    if shape_guards is not None:
        graph.call_module(_SHAPE_GUARDS, tuple(val_map[ph] for ph in src_phs))
        root[_SHAPE_GUARDS] = shape_guards
    out = graph.graph_copy(src.graph, val_map)
    graph.output(out)
    out_spec = getattr(src, "_out_spec", None)
    graph.set_codegen(_SignatureCodeGen(_PyTreeInfo(names, None, out_spec)))

    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _ATEN_LAYER_OPS:
            _layer_to_call_module(graph, node, model, src, root)
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target not in root:
            root[node.target] = get_attr_path(src, node.target)
        if node.op == "get_attr":
            if not node.users:
                graph.erase_node(node)
                continue
            try:
                root[node.target] = get_attr_path(model, node.target)
            except AttributeError:
                root[node.target] = get_attr_path(src, node.target)
    graph.lint()
    return CapturedGraphModule(root, graph, type(model).__name__)


def _layer_to_call_module(graph: fx.Graph, node: fx.Node, model: torch.nn.Module,
                          src: fx.GraphModule, root: dict[str, Any]) -> None:
    """Replace aten.linear/conv on a layer's own weight by call_module(<layer fqn>)."""
    layer_type = _ATEN_LAYER_OPS[node.target]
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return
    fqn = list(stack.values())[-1][0]
    try:
        layer = model.get_submodule(fqn)
    except AttributeError:
        return
    if type(layer) is not layer_type:
        return
    w_node = node.args[1]
    b_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if not (isinstance(w_node, fx.Node) and w_node.op == "get_attr"):
        return
    if get_attr_path(src, w_node.target) is not layer.weight and \
            not torch.equal(get_attr_path(src, w_node.target), layer.weight):
        return
    has_bias = isinstance(b_node, fx.Node)
    if has_bias != (layer.bias is not None):
        return
    if layer_type is not torch.nn.Linear:
        stride, padding, dilation, groups = (list(node.args[3:7]) + [None] * 4)[:4]
        if (tuple(stride or layer.stride), tuple(padding or layer.padding) if not isinstance(padding, str) else padding,
                tuple(dilation or layer.dilation), groups or layer.groups) != (
                tuple(layer.stride), layer.padding if isinstance(layer.padding, str) else tuple(layer.padding),
                tuple(layer.dilation), layer.groups) or layer.padding_mode != "zeros":
            return
    with graph.inserting_before(node):
        new = graph.call_module(fqn, (node.args[0],))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    root[fqn] = layer
