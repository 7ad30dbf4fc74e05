"""onnxruntime latency of the QDQ ONNX that Calibrator.export_quant_onnx writes vs the fp32 ONNX
of the same model, measured in the same run: MiniLM (real weights, 8 x 128 tokens) and a
ResNet-18-sized CNN (random weights, 224 x 224 images).

    python benchmarks/onnx_speed.py [--runs 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _latency_ms(path: Path, feeds: dict, runs: int, threads: int) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for _ in range(3):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _fp32_onnx(model, args, kwargs, names, path: Path) -> Path:
    from fxquant.formats.onnx_export import to_onnx_model, write_onnx

    return write_onnx(to_onnx_model(model, args, kwargs, names), path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import logging

    import torch

    from fxquant import Calibrator, QuantConfig
    from fxquant.real_models import (
        encoder_batches,
        encoder_inputs,
        load_minilm,
        sentences,
        text_corpus,
    )

    from models import resnet18_sized

    logging.disable(logging.WARNING)
    rows = []
    out = Path(tempfile.mkdtemp(prefix="fxquant_speed_"))

    st = load_minilm()
    bert = st[0].model
    sents = sentences(text_corpus("calib"), 64)
    calib = encoder_batches(st, sents)
    feeds_t = encoder_inputs(st, sentences(text_corpus("eval"), 8, min_words=30, max_words=60))
    cal = Calibrator(bert, QuantConfig(mm_tensor=False, a_signed=False, disable_names=[]), calib_data=calib)
    cal.run()
    fp = _fp32_onnx(bert, (), feeds_t, list(feeds_t), out / "minilm_fp32.onnx")
    q = cal.export_quant_onnx("minilm", out)
    feeds = {k: v.numpy() for k, v in feeds_t.items()}
    rows.append((f"MiniLM-L6 (8 x {feeds_t['input_ids'].shape[1]} tokens)",
                 _latency_ms(fp, feeds, args.runs, args.threads), _latency_ms(q, feeds, args.runs, args.threads)))

    torch.manual_seed(0)
    cnn = resnet18_sized().eval()
    images = [[torch.randn(2, 3, 224, 224)] for _ in range(2)]
    cal = Calibrator(cnn, QuantConfig(a_signed=False, disable_names=[], quant_small_ops=True), calib_data=images)
    cal.run()
    x = torch.randn(4, 3, 224, 224)
    fp = _fp32_onnx(cnn, (x,), {}, ["input.1"], out / "resnet18_fp32.onnx")
    q = cal.export_quant_onnx("resnet18", out, ["input.1"])
    feeds = {"input.1": x.numpy()}
    rows.append(("ResNet-18-sized CNN (4 x 3 x 224 x 224)", _latency_ms(fp, feeds, args.runs, args.threads),
                 _latency_ms(q, feeds, args.runs, args.threads)))

    print(f"onnxruntime CPU, {args.threads} threads, median of {args.runs} runs")
    print("| model | fp32 ONNX ms | QDQ int8 ONNX ms | speed-up (fp32 / int8) |")
    print("|---|---|---|---|")
    for name, f, i in rows:
        print(f"| {name} | {f:.1f} | {i:.1f} | {f / i:.2f}x |")


if __name__ == "__main__":
    main()
