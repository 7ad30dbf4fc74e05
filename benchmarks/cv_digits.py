"""CV Calibrator (seed 004) on CNNs trained on scikit-learn's digits: top-1 drop vs fp32 and
held-out logit error, for the default config, each keep_acc strategy, and amp_num.

    python benchmarks/cv_digits.py [--seeds 0 1 2] [--calib 256]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

VARIANTS = {
    "default": {},
    "round_opt": {"keep_acc": {"round_opt": True}},
    "easy_quant": {"keep_acc": {"easy_quant": [True, 50]}},
    "admm": {"keep_acc": {"admm": [True, 100]}},
    "all three": {"keep_acc": {"round_opt": True, "easy_quant": [True, 50], "admm": [True, 100]}},
    "w_method=gptq": {"w_method": "gptq"},
    "amp_num=1": {"amp_num": 1},
    "amp_num=2": {"amp_num": 2},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--calib", type=int, default=256, help="calibration images (batches of 64)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()

    import logging

    import torch

    from fxquant import Calibrator, QuantConfig

    from digits import accuracy, digits_split, train
    from models import MobileNetStyle, ResNetStyle

    logging.disable(logging.INFO)
    xtr, ytr, xte, yte = digits_split()
    calib = [[xtr[i:i + 64]] for i in range(0, args.calib, 64)]
    print(f"digits: {len(xtr)} train / {len(xte)} test images, calibration {args.calib} images, "
          f"seeds {args.seeds}; W8A8 (static per-tensor activations, per-channel weights)")
    print("| model | config | fp32 top-1 | W8A8 top-1 | drop (points) | logit rel. MSE | run s |")
    print("|---|---|---|---|---|---|---|")
    for cls in (ResNetStyle, MobileNetStyle):
        models = []
        for seed in args.seeds:
            torch.manual_seed(seed)
            models.append(train(cls(), xtr, ytr, seed=seed))
        fp = [accuracy(m, xte, yte) for m in models]
        for name in args.variants:
            acc, err, secs = [], [], 0.0
            for m in models:
                start = time.perf_counter()
                cal = Calibrator(m, QuantConfig(**VARIANTS[name]), calib_data=calib, progress=False)
                cal.run()
                secs += time.perf_counter() - start
                acc.append(accuracy(cal.model, xte, yte))
                with torch.no_grad():
                    ref, out = m(xte), cal.model(xte)
                err.append(float(((out - ref) ** 2).sum() / (ref**2).sum()))
            n = len(models)
            f, a = sum(fp) / n, sum(acc) / n
            print(f"| {cls.__name__} | {name} | {f:.2f} | {a:.2f} | {f - a:+.2f} | {sum(err) / n:.2e} | "
                  f"{secs / n:.1f} |")


if __name__ == "__main__":
    main()
