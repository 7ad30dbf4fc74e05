"""Eager decode, one row: where a frozen QLinear's time goes (microseconds per call).

For SmolLM2-135M's four linear shapes (576 -> 576, 576 -> 192, 576 -> 1536, 1536 -> 576), random
weights, inputs of one row, each scheme (w8a16, w4a16 with groups of 64, w8a8_dynamic, w8a8):
  layer          the frozen QLinear called as a module (what eager decode runs);
  bound kernel   its C kernel as the layer keeps it bound (weight-only: kernels.weight_only.
                 NativeGemv; W8A8: kernels.int8_decode.Int8DecodeLinear);
  per-call bind  weight-only: the same C GEMV bound on every call (native_codes_gemv);
  torch path     the layer with its C kernel switched off (what eager decode ran before it);
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
from fxquant.kernels.int8_decode import int8_decode_available
from fxquant.kernels.weight_only import native_codes_gemv, native_gemv_available

SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576))
SCHEMES = ("w8a16", "w4a16", "w8a8_dynamic", "w8a8")
COLUMNS = ("layer", "bound kernel", "per-call bind", "torch path", "fp32 F.linear")


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


def _torch_path_time(layer: torch.nn.Module, x: torch.Tensor, calls: int) -> float:
    """microseconds() of the layer without its eager C decode kernels."""
    layer._eager_gemv = layer._eager_int8_decode = lambda x: None  # instance attributes: this layer only
    try:
        return microseconds(layer, x, calls)
    finally:
        del layer._eager_gemv, layer._eager_int8_decode


def timings(scheme: str, k: int, n: int, calls: int) -> list[float | None]:
    """COLUMNS for one scheme and shape (None where a column does not apply)."""
    model = torch.nn.Sequential(torch.nn.Linear(k, n, bias=scheme.startswith("w8a8"))).eval()
    weight = model[0].weight.detach().clone()
    x = torch.randn(1, 1, k)
    calib = [[torch.randn(16, k)]] if scheme == "w8a8" else None
    fxquant.quantize(model, calib, scheme=scheme, example_inputs=None if calib else [x], progress=False,
                     inplace=True, options=fxquant.SchemeOptions(group_size=64), disable_last_layer=False)
    layer = model[0]
    with torch.no_grad():
        bound = layer._eager_gemv(x) if layer.codes_blocked else layer._eager_int8_decode(x)
    per_call = None
    if layer.codes_blocked:
        codes, scale, offset, bias = bound.operands
        per_call = partial(_per_call_bind, blocked=codes, bits=bound.bits, scale=scale, offset=offset, bias=bias)
    times = [None if fn is None else microseconds(fn, x, calls) for fn in (layer, bound, per_call)]
    return times + [_torch_path_time(layer, x, calls), microseconds(partial(F.linear, weight=weight), x, calls)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=3000)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {torch.get_num_threads()}, C GEMV builds: {native_gemv_available()}, "
          f"int8 decode kernel builds: {int8_decode_available()}")
    if not (native_gemv_available() and int8_decode_available()):
        raise SystemExit("no C compiler here: eager decode runs torch ops, there is no C kernel to time")
    torch.manual_seed(0)
    print("\n| scheme | shape | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for scheme in SCHEMES:
        totals = [0.0] * len(COLUMNS)
        for k, n in SHAPES:
            times = timings(scheme, k, n, args.calls)
            totals = [a + (b or 0.0) for a, b in zip(totals, times)]
            print(f"| {scheme} | {k} -> {n} | " + " | ".join("-" if t is None else f"{t:.1f}" for t in times) + " |")
        sums = [f"{t:.1f}" if t else "-" for t in totals]
        print(f"| {scheme} | sum | " + " | ".join(sums) + " |")


if __name__ == "__main__":
    main()
