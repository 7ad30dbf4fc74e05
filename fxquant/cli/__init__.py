"""The `fxquant` command line (console entry point fxquant.cli:console_main)."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
