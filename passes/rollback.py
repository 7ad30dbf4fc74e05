"""Roll QuantOprs back to their float modules (automatic rollback, sensitive layers)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import fx

from fxquant.errors import ConfigError
from fxquant.ir import fxq_meta, module_of
from fxquant.quant_opr import QuantOpr

from .pass_manager import replace_submodule


@dataclass
class Rollback:
    """Pass: replace the QuantOprs named in `names` by their float modules; meta records `reason`."""

    names: Sequence[str]
    reason: str = "automatic rollback (disable_level)"

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        todo = set(self.names)
        for node in gm.graph.nodes:
            module = module_of(gm, node)
            if node.target in todo and isinstance(module, QuantOpr):
                replace_submodule(gm, node.target, module.to_float())
                meta = fxq_meta(node)
                meta["scheme"], meta["reason"] = "float", self.reason
                todo.discard(node.target)
        if todo:
            raise ConfigError(f"cannot roll back {sorted(todo)}: not quantized layers of this graph")
        return gm
