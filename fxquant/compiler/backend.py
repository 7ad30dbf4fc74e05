"""The "fxquant" torch.compile backend: fxquant passes on Dynamo's graph, then an inner compiler.

`torch.compile(qmodel, backend="fxquant")` finds it through the `torch_dynamo_backends` entry
point of the installed package (nothing registers at import). A frozen quantized layer's
forward is already written in the device's integer kernels (torch._int_mm, exact fp32 GEMMs of
codes, weight-only GEMVs), so Dynamo's graph holds them as ops; the inner compiler (inductor)
fuses what surrounds them: per-token quantization, rescaling, bias, norms, activations.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from .eager_rounding import keep_eager_rounding

log = logging.getLogger(__name__)

#: Dynamo graph targets that are integer GEMMs, by kernel name
_INT_GEMM_TARGETS = {torch._int_mm: "int_mm", torch.ops.aten._int_mm.default: "int_mm"}

GraphPass = Callable[[fx.GraphModule], fx.GraphModule]

#: inductor options the "fxquant" backend compiles with (for its compilation only, nothing global):
#: let the C++ compiler contract a * b + c into fused multiply-adds. The dequantize-and-sum loops of
#: weight-only GEMVs are chains of them; SmolLM2 w4a16 decode on AVX-512 ran ~10% faster. Only the
#: rounding of those float sums changes (one rounding per FMA instead of two).
INDUCTOR_OPTIONS: dict[str, Any] = {"cpp.enable_floating_point_contract_flag": "fast"}
#: the options that replace those for a graph keep_eager_rounding marked (it rounds activations, so
#: every float before a quantizer must round as eager does: no contraction)
EAGER_ROUNDING_OPTIONS: dict[str, Any] = {"cpp.enable_floating_point_contract_flag": "off"}


def _int_gemm_kernel(target: object) -> str | None:
    """The kernel name of an integer GEMM call target, else None (fxquant's own ops by name: they
    are defined only once a layer needs them)."""
    if target in _INT_GEMM_TARGETS:
        return _INT_GEMM_TARGETS[target]
    return "onednn_split" if str(target).startswith("fxquant.split_mm") else None


def record_kernels(gm: fx.GraphModule) -> fx.GraphModule:
    """Pass: count the integer GEMMs in a Dynamo graph into gm.meta["fxquant_kernels"]
    ({kernel name: calls}) and log them."""
    counts = Counter(_int_gemm_kernel(n.target) for n in gm.graph.nodes if n.op == "call_function")
    counts.pop(None, None)
    gm.meta["fxquant_kernels"] = dict(counts)
    log.info("fxquant backend: graph of %d nodes, integer GEMMs %s", len(gm.graph.nodes), dict(counts) or "none")
    return gm


#: the passes a backend runs on each Dynamo graph unless given others
DEFAULT_PASSES: tuple[GraphPass, ...] = (record_kernels, keep_eager_rounding)


@dataclass
class CompileBackend:
    """A torch.compile backend: `passes` (each GraphModule -> GraphModule) run in order on every
    graph Dynamo hands over, then `inner` (a registered backend name such as "inductor" or
    "eager", or a backend callable) compiles the result; for inner "inductor", with the options of
    `inductor_options` patched into inductor's config, and EAGER_ROUNDING_OPTIONS over them for a
    graph that keep_eager_rounding marked. The graphs seen are kept in `graphs`."""

    passes: Sequence[GraphPass] = DEFAULT_PASSES
    inner: str | Callable[..., Any] = "inductor"
    inductor_options: Mapping[str, Any] = field(default_factory=lambda: dict(INDUCTOR_OPTIONS))
    graphs: list[fx.GraphModule] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        from torch._inductor import config
        known = config.get_config_copy()
        unknown = sorted(k for k in self.inductor_options if k not in known)
        if unknown:
            raise ValueError(f"unknown inductor options {unknown}; valid ones are the entries of "
                             f"torch._inductor.config, e.g. {sorted(INDUCTOR_OPTIONS)} or 'size_asserts'")

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        for graph_pass in self.passes:
            gm = graph_pass(gm)
        self.graphs.append(gm)
        inner = self.inner
        if inner == "inductor":
            from torch._inductor.compile_fx import compile_fx
            options = dict(self.inductor_options)
            if gm.meta.get("fxquant_eager_rounding"):
                options.update(EAGER_ROUNDING_OPTIONS)
            return compile_fx(gm, example_inputs, config_patches=options)
        if isinstance(inner, str):
            from torch._dynamo.backends.registry import lookup_backend
            inner = lookup_backend(inner)
        return inner(gm, example_inputs)


def compile_backend(passes: Sequence[GraphPass] | None = None, inner: str | Callable[..., Any] = "inductor",
                    inductor_options: Mapping[str, Any] | None = None) -> CompileBackend:
    """A backend object for torch.compile(model, backend=compile_backend(...)): `passes` (default:
    DEFAULT_PASSES) on each Dynamo graph, then `inner`; `inductor_options` (default INDUCTOR_OPTIONS)
    are inductor config entries for inner "inductor", e.g. {"cpp.enable_floating_point_contract_flag":
    "off"} for inductor's own rounding."""
    return CompileBackend(tuple(passes) if passes is not None else DEFAULT_PASSES, inner,
                          dict(INDUCTOR_OPTIONS if inductor_options is None else inductor_options))


def fxquant_backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    """The backend registered as "fxquant": compile_backend() with its defaults."""
    return compile_backend()(gm, example_inputs)
