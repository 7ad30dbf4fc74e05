"""linger front end on digits models: PTQ at 8 and 4 bits, QAT with MOM and TQT, constrain.

Models trained here on scikit-learn's digits (8x8 images): two CNNs, and 2-layer LSTM / GRU
classifiers reading the image row by row; top-1 on the held-out 30%. Protocol:
calibrate on 256 training images in one round (linger's); QAT: Adam lr 1e-4, batch 64, on the
training set; constrain: the float model fine-tuned with clamp_info's clamps for the same epochs
before init, against the same fine-tuning without clamps.

    python benchmarks/linger_qat.py [--epochs 3]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from fxquant import linger

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def fine_tune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 1e-4) -> float:
    """Adam over (x, y) for `epochs` (tests/digits.train); returns the seconds it took."""
    from digits import train

    start = time.perf_counter()
    train(model, x, y, epochs=epochs, lr=lr)
    return time.perf_counter() - start


def calibrated(model: nn.Module, cfg: linger.LingerConfig, x: torch.Tensor) -> nn.Module:
    q = linger.init(model, config=cfg).eval()
    with linger.calibration():
        q(x)
    return q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3, help="QAT and constrain epochs")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}")
    from digits import accuracy, digits_split, train
    from models import MobileNetStyle, ResNetStyle

    xtr, ytr, xte, yte = digits_split()
    calib = xtr[:256]
    print("\n| model | fp32 | PTQ w8a8 | PTQ w4a8 | QAT-MOM w4a8 | QAT-TQT w4a8 | QAT epochs | MOM s | TQT s |")
    print("|---|---|---|---|---|---|---|---|---|")
    from test_linger import RowRNN

    models = (("ResNetStyle", ResNetStyle, 4), ("MobileNetStyle", MobileNetStyle, 12),
              ("RowLSTM (2 x 32)", lambda: RowRNN(nn.LSTM), 15), ("RowGRU (2 x 32)", lambda: RowRNN(nn.GRU), 15))
    for label, make, epochs in models:
        torch.manual_seed(0)
        model = train(make(), xtr, ytr, epochs=epochs)
        fp32 = accuracy(model, xte, yte)
        ptq8 = accuracy(calibrated(model, linger.LingerConfig(), calib), xte, yte)
        row = [label, fp32, ptq8]
        seconds = []
        for method in ("MOM", "TQT"):
            cfg = linger.LingerConfig(quant_info=linger.QuantInfo(weight_bits=4, qat_method=method))
            q = calibrated(model, cfg, calib)
            if method == "MOM":
                row.append(accuracy(q, xte, yte))
            seconds.append(fine_tune(q, xtr, ytr, args.epochs))
            row.append(accuracy(q, xte, yte))
        print("| " + " | ".join([row[0]] + [f"{v:.2f}" for v in row[1:]])
              + f" | {args.epochs} | {seconds[0]:.1f} | {seconds[1]:.1f} |")

    print("\nconstrain (MobileNetStyle, w4a8 PTQ after fine-tuning the float model):")
    print("| float fine-tuning | fp32 after | PTQ w4a8 | drop |")
    print("|---|---|---|---|")
    torch.manual_seed(0)
    base = train(MobileNetStyle(), xtr, ytr, epochs=12)
    cfg4 = linger.LingerConfig(quant_info=linger.QuantInfo(weight_bits=4))
    for label, model in (("plain", copy.deepcopy(base)), ("constrained (clamp_info)", linger.constrain(base))):
        fine_tune(model, xtr, ytr, args.epochs, lr=1e-3)
        fp32 = accuracy(model, xte, yte)
        ptq = accuracy(calibrated(model, cfg4, calib), xte, yte)
        print(f"| {label} | {fp32:.2f} | {ptq:.2f} | {fp32 - ptq:+.2f} |")


if __name__ == "__main__":
    main()
