"""Where quantization error enters: fxquant.inspect and fxquant.compare on real models.

SmolLM2-135M, static w8a8 (per-tensor activations, no smoothing), calibrated on 8 x 512 tokens
of the calibration text; compare on 2 x 512 held-out tokens. Then the digits ResNet-style CNN
(w8a8, BatchNorm folded), compared on 256 held-out images. Prints the worst layers by recorded
SQNR, where the local error is largest and where error grows, and (with --report) writes the
HTML report of the SmolLM2 model.

    python benchmarks/numeric_debugger.py [--report smollm2_w8a8.html]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

import fxquant
from fxquant.inspection import Comparison, LayerTable
from fxquant.real_models import load_smollm2, text_corpus, token_windows

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def show(title: str, result: Comparison, table: LayerTable | None = None) -> None:
    print(f"\n## {title}\n")
    if table is not None:
        print("worst layers by SQNR recorded at calibration:")
        for r in table.worst(5):
            print(f"  {r.name:40s} {r.sqnr_db:6.2f} dB  input outlier ratio {r.outlier_ratio:7.1f}")
    print("where error enters (local error: the layer alone, on the float model's own input):")
    for r in result.where_error_enters(5):
        print(f"  {r.name:40s} local {r.local_rel_error:.4f}  output {r.output_rel_error:.4f}")
    print("where error grows (output error / input error):")
    for r in result.where_error_grows(5):
        print(f"  {r.name:40s} x{r.growth:.2f}  (in {r.input_rel_error:.4f} -> out {r.output_rel_error:.4f})")
    if result.output is not None:
        print(f"model output: relative error {result.output.output_rel_error:.4f}, "
              f"SQNR {result.output.output_sqnr_db:.2f} dB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", help="write the SmolLM2 report here")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}")

    model, tok = load_smollm2()
    calib = [[w] for w in token_windows(tok, text_corpus("calib"), 8, 512)]
    evals = [[w] for w in token_windows(tok, text_corpus("eval"), 2, 512)]
    start = time.perf_counter()
    q = fxquant.quantize(model, calib, "w8a8", measure_layers=True, progress=False)
    print(f"SmolLM2 w8a8 quantized with measure_layers in {time.perf_counter() - start:.1f} s")
    table = fxquant.inspect(q)
    start = time.perf_counter()
    result = fxquant.compare(model, q, evals)
    print(f"compare over {result.samples} x 512 tokens: {time.perf_counter() - start:.1f} s")
    show("SmolLM2-135M, static w8a8", result, table)
    if args.report:
        path = fxquant.report(q, None, args.report, title="SmolLM2-135M static w8a8")
        print(f"report: {path} ({path.stat().st_size / 1024:.0f} KiB)")

    from digits import digits_split, train
    from models import ResNetStyle

    x_train, y_train, x_test, _ = digits_split()
    torch.manual_seed(0)
    cnn = train(ResNetStyle(), x_train, y_train, epochs=4)
    qcnn = fxquant.quantize(cnn, [[x_train[i:i + 64]] for i in range(0, 512, 64)], "w8a8",
                            measure_layers=True, progress=False)
    show("digits ResNet-style CNN, w8a8", fxquant.compare(cnn, qcnn, [[x_test[:256]]]), fxquant.inspect(qcnn))


if __name__ == "__main__":
    main()
