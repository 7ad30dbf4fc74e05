"""Checks shared by the tests of the layers that cache derived weight operands (kernels/layer_cache.py)."""

from __future__ import annotations

import copy
import io

import torch


def assert_copies_rebuild_the_cache(layer: torch.nn.Module, x: torch.Tensor, expected: torch.Tensor) -> None:
    """A deep copy and a saved-and-loaded copy of `layer` each build their own packed operands from
    their own codes and give `expected` on x; torch.compile runs the layer in one graph. Call under
    torch.no_grad."""
    copied = copy.deepcopy(layer)
    assert copied.__dict__["_packed"] is not layer.__dict__["_packed"]
    assert copied.__dict__["_packed"].matches(copied.weight_codes)
    torch.testing.assert_close(copied(x), expected)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.__dict__["_packed"].matches(loaded.weight_codes)
    torch.testing.assert_close(loaded(x), expected)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-6, atol=1e-6)
