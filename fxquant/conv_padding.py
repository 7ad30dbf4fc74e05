"""The padding of a convolution per side, from its `padding` ("valid", "same" or integers)."""

from __future__ import annotations

import torch


def padding_sides(conv: torch.nn.modules.conv._ConvNd) -> list[tuple[int, int]]:
    """(before, after) zero padding of each spatial dimension of `conv`, in dimension order:
    none for "valid"; dilation x (kernel - 1) for "same" (stride 1), the odd extra one after, as
    torch pads it; the given integers on both sides otherwise."""
    if conv.padding == "valid":
        return [(0, 0)] * len(conv.kernel_size)
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in conv.padding]
