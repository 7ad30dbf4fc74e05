"""linger's front end (seed 001): init, calibration, constrain and the YAML config, on fxquant's IR."""

from .config import ClampInfo, LingerConfig, QuantInfo
from .constrain import constrain
from .prepare import calibration, config_of, config_save_to_yaml, init, linger_scheme

__all__ = ["ClampInfo", "LingerConfig", "QuantInfo", "calibration", "config_of", "config_save_to_yaml",
           "constrain", "init", "linger_scheme"]
