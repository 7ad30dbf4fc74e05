"""The command line's own error: bad input that a user fixes (exit code 2)."""

from __future__ import annotations

from fxquant.errors import FxquantError


class UsageError(FxquantError):
    """A path, name or value given on the command line is wrong; the message says which."""
