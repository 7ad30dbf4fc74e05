"""build_quantizer: the quantizer class that serves a QuantSpec.

It lives apart from quantizer.py so that the per-timestep quantizer (timestep.py, built on the
quantizers of quantizer.py) can be chosen here without an import cycle.
"""

from __future__ import annotations

from .pow2_quantizer import QAT_QUANTIZERS
from .quantizer import DynamicQuantizer, IdentityQuantizer, Quantizer, QuantSpec, StaticQuantizer
from .timestep import TimestepQuantizer


def build_quantizer(spec: QuantSpec | None) -> Quantizer:
    """The quantizer that serves `spec`: IdentityQuantizer for None (stays float),
    TimestepQuantizer when spec.timestep_sep is set, linger's MOM / TQT power-of-two quantizers
    when spec.qat is set, else Dynamic (per-token) or Static."""
    if spec is None:
        return IdentityQuantizer()
    if spec.qat is not None:
        return QAT_QUANTIZERS[spec.qat](spec)
    if spec.timestep_sep is not None:
        return TimestepQuantizer(spec)
    return DynamicQuantizer(spec) if spec.dynamic else StaticQuantizer(spec)
