"""Fold BatchNorm into the convolution or linear layer that feeds it."""

from __future__ import annotations

import copy

import torch
from torch import fx
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from fxquant.ir import module_of

from .pass_manager import replace_submodule

_FOLDABLE = {
    torch.nn.Conv1d: (torch.nn.BatchNorm1d,),
    torch.nn.Conv2d: (torch.nn.BatchNorm2d,),
    torch.nn.Linear: (torch.nn.BatchNorm1d,),
}


def fold_batchnorm(gm: fx.GraphModule) -> fx.GraphModule:
    """Conv/Linear -> BatchNorm (eval statistics, sole consumer) becomes one layer with new weights.

    The original layer's tensors are not modified: the folded layer is a copy. The names of the
    folded BatchNorms are kept in gm.meta["fxquant_folded_bn"] ({batchnorm: layer}) so that a
    checkpoint can say they are already inside their layer.
    """
    folded_bn = gm.meta.setdefault("fxquant_folded_bn", {})
    for node in list(gm.graph.nodes):
        bn = module_of(gm, node)
        if not isinstance(bn, torch.nn.modules.batchnorm._BatchNorm) or not bn.track_running_stats:
            continue
        prev = node.args[0]
        layer = module_of(gm, prev) if isinstance(prev, fx.Node) else None
        if layer is None or type(bn) not in _FOLDABLE.get(type(layer), ()) or len(prev.users) != 1:
            continue
        fuse = fuse_conv_bn_eval if isinstance(layer, torch.nn.modules.conv._ConvNd) else fuse_linear_bn_eval
        folded = fuse(copy.deepcopy(layer).eval(), bn.eval())
        replace_submodule(gm, prev.target, folded)
        folded_bn[node.target] = prev.target
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    return gm
