"""disable_level on SmolLM2-135M with static w8a8: perplexity after rolling back the n most
sensitive layers (sensitivity = output noise-to-signal ratio measured during calibration).

    python benchmarks/disable_level.py [--levels 0 1 2 4] [--calib 16] [--eval 16]
"""

from __future__ import annotations

import argparse
import time

import fxquant
from fxquant.real_models import load_smollm2, perplexity, text_corpus, token_windows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--levels", type=int, nargs="+", default=[0, 1, 2, 4])
    ap.add_argument("--calib", type=int, default=16, help="calibration windows of 512 tokens")
    ap.add_argument("--eval", type=int, default=16, help="held-out windows of 512 tokens")
    ap.add_argument("--pr", type=float, default=1.0)
    args = ap.parse_args()
    model, tok = load_smollm2()
    calib = [[w] for w in token_windows(tok, text_corpus("calib"), args.calib, 512)]
    evals = token_windows(tok, text_corpus("eval"), args.eval, 512)
    base = perplexity(model, evals)
    rows = []
    for level in args.levels:
        cfg = fxquant.QuantConfig(w_bit=8, a_bit=8, mm_tensor=False, pr=args.pr)
        start = time.perf_counter()
        cal = fxquant.Calibrator(model, cfg, calib_data=calib, disable_level=f"L{level}")
        cal.run()
        seconds = time.perf_counter() - start
        rolled = [k for k, (s, why) in cal.model.meta["fxquant_decisions"].items() if "rollback" in why]
        rows.append((level, perplexity(cal.model, evals), seconds, rolled))
    print(f"SmolLM2-135M static w8a8 (per-channel weights, pr={args.pr}), calib {args.calib} x 512, "
          f"eval {args.eval} x 512; fp32 perplexity {base:.3f}")
    print("| disable_level | perplexity | vs fp32 | run s | rolled back |")
    print("|---|---|---|---|---|")
    for level, ppl, secs, rolled in rows:
        print(f"| L{level} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% | {secs:.1f} | {', '.join(rolled) or '-'} |")


if __name__ == "__main__":
    main()
