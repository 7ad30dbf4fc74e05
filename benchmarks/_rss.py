"""Peak resident memory of this process."""

from __future__ import annotations

from fxquant.resources import peak_rss_bytes


def peak_rss_mb() -> float:
    """Peak RSS in MB of this process image (VmHWM; see fxquant.resources.peak_rss_bytes)."""
    return peak_rss_bytes() / 2**20
