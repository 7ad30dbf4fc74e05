"""Exceptions raised by fxquant. Each names the problem and, where there is a choice, the valid ones."""

from __future__ import annotations


class FxquantError(Exception):
    """Base class of every error fxquant raises on purpose."""


class CaptureError(FxquantError):
    """The model could not be captured as an FX graph by any front end."""


class ConfigError(FxquantError, ValueError):
    """A configuration value is invalid (unknown scheme, malformed level, bad names...)."""


class CalibrationDataError(FxquantError, ValueError):
    """Calibration data is missing, malformed or holds non-finite values."""


class NotQuantizableError(FxquantError):
    """A layer of a quantizable type that cannot be quantized as it is configured (the reason says why)."""


class GraphLintError(FxquantError):
    """A pass left the graph in a state that breaks the IR contract."""


class ModelLoadError(FxquantError):
    """A model or its tokenizer loaded, but wrongly (the reason names the check that failed)."""
