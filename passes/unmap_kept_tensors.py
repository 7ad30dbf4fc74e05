"""Move the tensors that stay float out of the checkpoint's file mapping, early."""

from __future__ import annotations

from torch import fx

from fxquant.ir import META_KEY, module_of
from fxquant.resources import copy_out_of_file_mappings


def unmap_kept_tensors(gm: fx.GraphModule) -> fx.GraphModule:
    """Copy every tensor quantization keeps (all but the weights of layers resolved to a quantized
    scheme: embeddings, norms, biases, a float head) out of file mappings. Runs after ResolveSchemes.

    A checkpoint loaded with mmap stays mapped while any of its tensors lives, with every page
    calibration read resident; a kept float embedding alone would pin all the replaced float
    weights. Copied now, while little else is resident, the mapping goes with the float layers at
    the end (fxquant.resources.release_unused_memory); copied at the end, the copy would add to the
    peak. Tensors keep their identity (`.data` is swapped), so a model that shares them sees the
    same values.
    """
    replaced = set()
    for node in gm.graph.nodes:
        scheme = node.meta.get(META_KEY, {}).get("scheme")
        module = module_of(gm, node)
        if scheme not in (None, "float") and module is not None and getattr(module, "weight", None) is not None:
            replaced.add(id(module.weight))
    copy_out_of_file_mappings(t for t in [*gm.parameters(), *gm.buffers()] if id(t) not in replaced)
    return gm
