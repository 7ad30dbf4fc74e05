"""Online Hadamard rotation of a layer's input, for inputs whose producer cannot absorb a rotation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch

import torch
from torch import fx

from fxquant.errors import ConfigError
from fxquant.hadamard import HadamardTransform
from fxquant.ir import module_of, mutable_storages
from fxquant.resources import release_freed_memory
from fxquant.rotation_folds import rotate_linear

log = logging.getLogger(__name__)


@dataclass
class OnlineHadamard:
    """Pass: before each Linear whose name matches one of `patterns` (fnmatch, e.g. "*down_proj"),
    insert a HadamardTransform module computing x R [..., k] at run time and fold R into the layer
    (W [n, k] becomes W R), so the float function is unchanged and the layer's input is spread
    over all k channels. The gated product before an MLP's down projection is the usual case: no
    weight produces it linearly. Runs after smoothing (whose up_proj -> down_proj fold needs the
    product to feed down_proj directly) and before QuantOpr insertion. `rotated` lists the layers.

    mutable: data_ptrs of tensors the pass may change in place (default: the model's untied
    tensors when gm.meta["fxquant_consumes_model"]).
    """

    patterns: Sequence[str]
    seed: int = 2
    mutable: set[int] | None = None
    rotated: list[str] = field(default_factory=list, init=False)

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        mutable = self.mutable if self.mutable is not None else (
            mutable_storages(gm) if gm.meta.get("fxquant_consumes_model") else set())
        self.rotated = []
        matrices: dict[int, torch.Tensor] = {}  # one R [k, k] per width, made once: a fresh 18 MB
        # float64 temporary per layer would be left resident by the allocator
        for node in list(gm.graph.nodes):
            lin = module_of(gm, node)
            if not (isinstance(lin, torch.nn.Linear) and any(fnmatch(node.target, p) for p in self.patterns)):
                continue
            transform = HadamardTransform(lin.in_features, self.seed)
            if lin.in_features not in matrices:
                matrices[lin.in_features] = transform.matrix().to(lin.weight.dtype)
            name = f"{node.target}_hadamard"
            gm.add_submodule(name, transform)
            x = node.args[0]
            with gm.graph.inserting_before(node):
                rotated = gm.graph.call_module(name, (x,))
            rotated.meta.update({k: v for k, v in x.meta.items() if k in ("val", "tensor_meta", "nn_module_stack")})
            node.replace_input_with(x, rotated)
            rotate_linear(gm, mutable, node, "online_input", inputs=matrices[lin.in_features])
            self.rotated.append(node.target)
        if not self.rotated:
            raise ConfigError(f"online rotation patterns {list(self.patterns)} match no Linear layer of the graph")
        del matrices
        release_freed_memory()
        gm.recompile()
        gm.meta.setdefault("fxquant_rotation", {})["online"] = list(self.rotated)
        log.info("rotating the inputs of %d layers online", len(self.rotated))
        return gm
