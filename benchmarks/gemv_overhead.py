"""Eager weight-only decode, one row: where a frozen QLinear's time goes (microseconds per call).

For SmolLM2-135M's four linear shapes (576 -> 576, 576 -> 192, 576 -> 1536, 1536 -> 576), w8a16
and w4a16 (group 64), random weights, inputs of one row:
  layer          the frozen QLinear called as a module (what eager decode runs);
  bound kernel   its C GEMV as the layer keeps it bound (kernels.weight_only.NativeGemv);
  per-call bind  the same C GEMV bound on every call (native_codes_gemv);
  fp32 F.linear  the float layer, its weight in cache (in decode it streams from memory).

    python benchmarks/gemv_overhead.py [--calls 3000]

Minimum of three timings of `--calls` calls each, under torch.no_grad.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

import fxquant
from fxquant.kernels.weight_only import native_codes_gemv, native_gemv_available

SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576))
SCHEMES = ("w8a16", "w4a16")


def microseconds(fn: Callable[[torch.Tensor], object], x: torch.Tensor, calls: int) -> float:
    """Best of three: mean time of fn(x) over `calls` calls, after 200 warm-up calls."""
    best = float("inf")
    with torch.no_grad():
        for _ in range(200):
            fn(x)
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(calls):
                fn(x)
            best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def _per_call_bind(x: torch.Tensor, **operands: object) -> torch.Tensor:
    return native_codes_gemv(x, **operands)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=3000)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {torch.get_num_threads()}, C GEMV builds: {native_gemv_available()}")
    if not native_gemv_available():
        raise SystemExit("no C compiler here: eager decode runs torch ops, there is no C GEMV to time")
    torch.manual_seed(0)
    columns = ["layer", "bound kernel", "per-call bind", "fp32 F.linear"]
    print("\n| scheme | shape | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 2) + "|")
    totals = [0.0] * len(columns)
    for scheme in SCHEMES:
        for k, n in SHAPES:
            model = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False)).eval()
            weight = model[0].weight.detach().clone()
            x = torch.randn(1, 1, k)
            fxquant.quantize(model, scheme=scheme, example_inputs=[x], progress=False, inplace=True,
                             options=fxquant.SchemeOptions(group_size=64), disable_last_layer=False)
            layer = model[0]
            with torch.no_grad():
                bound = layer._eager_gemv(x)
            codes, scale, offset, bias = bound.operands
            per_call = partial(_per_call_bind, blocked=codes, bits=bound.bits, scale=scale, offset=offset, bias=bias)
            times = [microseconds(fn, x, args.calls) for fn in (layer, bound, per_call, partial(F.linear, weight=weight))]
            totals = [a + b for a, b in zip(totals, times)]
            print(f"| {scheme} | {k} -> {n} | " + " | ".join(f"{t:.1f}" for t in times) + " |")
    print("| all | sum | " + " | ".join(f"{t:.1f}" for t in totals) + " |")


if __name__ == "__main__":
    main()
