"""PassManager: run GraphModule -> GraphModule passes in order, lint after each, time and dump."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import fx

from fxquant.errors import GraphLintError
from fxquant.ir import replace_submodule
from fxquant.resources import peak_rss_bytes

log = logging.getLogger(__name__)

__all__ = ["Pass", "PassManager", "lint_ir", "pass_name", "replace_submodule"]

Pass = Callable[[fx.GraphModule], fx.GraphModule]


def pass_name(p: Pass) -> str:
    """Readable name of a pass (function name or dataclass type)."""
    return getattr(p, "__name__", type(p).__name__)


def lint_ir(gm: fx.GraphModule) -> None:
    """Check the IR contract: a sound graph whose call_module targets and get_attrs all resolve."""
    try:
        gm.graph.lint()
    except Exception as exc:  # noqa: BLE001
        raise GraphLintError(f"graph lint failed: {exc}") from exc
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in modules:
            raise GraphLintError(f"node {node.name!r} calls missing module {node.target!r}")


class PassManager:
    """Runs `passes` on a GraphModule.

    lint: check the IR after every pass. dump_dir: write the code after each pass as
    NN_<pass>.py. `timings` holds (pass name, seconds) of the last run.
    """

    def __init__(self, passes: Sequence[Pass], lint: bool = True, dump_dir: str | Path | None = None) -> None:
        self.passes = list(passes)
        self.lint = lint
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.timings: list[tuple[str, float]] = []

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        self.timings = []
        for i, p in enumerate(self.passes):
            name = pass_name(p)
            start = time.perf_counter()
            out = p(gm)
            if not isinstance(out, fx.GraphModule):
                raise GraphLintError(f"pass {name} returned {type(out).__name__}, not a GraphModule")
            gm = out
            gm.recompile()
            if self.lint:
                lint_ir(gm)
            elapsed = time.perf_counter() - start
            self.timings.append((name, elapsed))
            log.info("pass %s: %.2fs, process peak RSS %.0f MB", name, elapsed, peak_rss_bytes() / 2**20)
            if self.dump_dir is not None:
                self.dump_dir.mkdir(parents=True, exist_ok=True)
                (self.dump_dir / f"{i:02d}_{name}.py").write_text(gm.code)
        return gm

    def __repr__(self) -> str:
        return f"PassManager([{', '.join(pass_name(p) for p in self.passes)}])"
