"""msModelSlim's Calibrator front end (seeds 000 and 004): QuantConfig, the Calibrator and its
automatic mixed precision."""

from .calibrator import Calibrator
from .quant_config import QuantConfig, parse_disable_level

__all__ = ["Calibrator", "QuantConfig", "parse_disable_level"]
