"""Where quantizing SmolLM2-135M spends its time: capture (torch.export) against calibration.

Prints, per round, the seconds of fxquant.capture, of fxquant.quantize on the model (capture
included) and of fxquant.quantize on the captured graph (capture done once, reused).

    python benchmarks/capture_time.py [--scheme w8a8] [--calib 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import time

import torch

import fxquant
from fxquant.real_models import load_smollm2, text_corpus, token_windows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scheme", default="w8a8")
    ap.add_argument("--calib", type=int, default=8, help="calibration windows of 128 tokens")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    model, tok = load_smollm2()
    data = [{"input_ids": w, "use_cache": False} for w in token_windows(tok, text_corpus("calib"), args.calib, 128)]
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads; SmolLM2-135M {args.scheme}, calib {args.calib} x 128")
    print("| round | capture s | quantize(model) s | quantize(captured graph) s |")
    print("|---|---|---|---|")
    for i in range(args.rounds):
        start = time.perf_counter()
        graph = fxquant.capture(model, (), data[0])
        captured = time.perf_counter() - start
        start = time.perf_counter()
        fxquant.quantize(model, data, scheme=args.scheme, progress=False)
        from_model = time.perf_counter() - start
        start = time.perf_counter()
        fxquant.quantize(graph, data, scheme=args.scheme, progress=False)
        from_graph = time.perf_counter() - start
        print(f"| {i + 1} | {captured:.2f} | {from_model:.2f} | {from_graph:.2f} |")


if __name__ == "__main__":
    main()
