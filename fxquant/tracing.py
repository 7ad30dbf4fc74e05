"""One lock for the tracers of torch (fx symbolic tracing, torch.export, torch.onnx).

Those tracers keep their state in process-global stacks (fx's patcher, the dispatch mode stack), so
two traces in two threads corrupt each other. Every fxquant entry point that traces holds this
lock while it does; calibration and inference need no lock (their state is in the model).
"""

from __future__ import annotations

import threading

TRACE_LOCK = threading.RLock()
