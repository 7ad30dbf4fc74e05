"""Quantization sessions (seed 002): SessionConfig with processors, and run(model, session_config)."""

from .config import (
    FA3ProcessorConfig,
    M3ProcessorConfig,
    M4ProcessorConfig,
    M6Config,
    M6ProcessorConfig,
    QuaRotProcessorConfig,
    SaveProcessorConfig,
    SessionConfig,
    W8A8DynamicProcessorConfig,
    W8A8DynamicQuantConfig,
    W8A8ProcessorConfig,
    W8A8QuantConfig,
    W8A8TimeStepProcessorConfig,
    W8A8TimeStepQuantConfig,
    session_from_dict,
)
from .runner import run

__all__ = [
    "FA3ProcessorConfig", "M3ProcessorConfig", "M4ProcessorConfig", "M6Config", "M6ProcessorConfig",
    "QuaRotProcessorConfig", "SaveProcessorConfig", "SessionConfig", "W8A8DynamicProcessorConfig", "W8A8DynamicQuantConfig",
    "W8A8ProcessorConfig", "W8A8QuantConfig", "W8A8TimeStepProcessorConfig", "W8A8TimeStepQuantConfig", "run",
    "session_from_dict",
]
