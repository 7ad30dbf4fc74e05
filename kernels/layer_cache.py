"""The base of a layer's cache of operands derived from its stored weight codes (oneDNN's packed
weights): tied to the codes it was built from, never copied or saved."""

from __future__ import annotations

import torch


class WeightCodesCache:
    """Operands derived from one stored codes tensor, for one process. `matches` says whether they
    are still those of the codes; a deep copy or an unpickled copy is None, so that the copied
    layer builds its own from its own codes (oneDNN's packed layouts are per process)."""

    def __init__(self, source: torch.Tensor) -> None:
        self.source = (source.data_ptr(), source._version, tuple(source.shape))

    def matches(self, source: torch.Tensor) -> bool:
        """True when built from these stored codes as they are now (same storage, version and shape)."""
        return self.source == (source.data_ptr(), source._version, tuple(source.shape))

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self) -> tuple:
        return _no_cache, ()


def _no_cache() -> None:
    return None
