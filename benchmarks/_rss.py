"""Peak resident memory of this process."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_mb() -> float:
    """Peak RSS in MB of this process image.

    Reads VmHWM from /proc/self/status (Linux), which starts afresh at exec; ru_maxrss would
    include the memory of a large parent that forked this process (e.g. a test runner holding
    models). Falls back to ru_maxrss elsewhere.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
