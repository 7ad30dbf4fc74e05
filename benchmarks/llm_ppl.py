"""SmolLM2-135M perplexity on held-out text for fp32 and every scheme, with calibration time and RSS.

Protocol: calibration on the "calib" split of fxquant.real_models.text_corpus (16 windows x 512
tokens by default), perplexity on the disjoint "eval" split (32 windows x 512 tokens). Every
scheme runs in its own process so that peak RSS is its own.

    python benchmarks/llm_ppl.py [--schemes w8a16 w8a8_dynamic w8a8@0.85 ...] [--calib 16] [--eval 32]
                                 [--dtype bfloat16] [--reload]

A scheme written `name@alpha` first folds SmoothQuant scales with that alpha (SmoothQuant pass).
--dtype quantizes the model in that dtype (the "fp32" row is then the float model in it).
--reload also saves each quantized model in the Ascend format, reloads it into a fresh model
(fxquant.load_ascend) and reports that model's perplexity; static layers then round their inputs
as Ascend does (offset_in_rounding).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _ascend import ascend_reload
from _rss import peak_rss_mb

ALL = ["fp32", "w8a16", "w8a8_dynamic", "w8a8", "w4a16", "w8a8_dynamic@0.4", "w8a8@0.85"]


def run_one(scheme: str, n_calib: int, calib_len: int, n_eval: int, act_method: str,
            group_size: int, dtype: str = "float32", reload: bool = False) -> dict:
    import torch

    import fxquant
    from fxquant.real_models import load_smollm2, perplexity, text_corpus, token_windows

    torch.manual_seed(0)
    float_model, tok = load_smollm2(getattr(torch, dtype))
    model = float_model
    evals = token_windows(tok, text_corpus("eval"), n_eval, 512)
    calib_s, reload_ppl = 0.0, None
    if scheme != "fp32":
        calib = [{"input_ids": w, "use_cache": False}
                 for w in token_windows(tok, text_corpus("calib"), n_calib, calib_len)]
        name, _, alpha = scheme.partition("@")
        start = time.perf_counter()
        model = fxquant.quantize(model, calib, scheme=name, progress=False,
                                 smooth_alpha=float(alpha) if alpha else None,
                                 options=fxquant.SchemeOptions(act_method=act_method, group_size=group_size,
                                                               offset_in_rounding=reload))
        calib_s = time.perf_counter() - start
    ppl = perplexity(model, evals)
    rss = peak_rss_mb()
    if reload and scheme != "fp32":
        reload_ppl = perplexity(ascend_reload(float_model, model, scheme.partition("@")[0]), evals)
    return {"scheme": scheme, "ppl": ppl, "calib_s": calib_s, "peak_rss_mb": rss, "reload_ppl": reload_ppl}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", nargs="+", default=ALL)
    ap.add_argument("--calib", type=int, default=16, help="calibration windows")
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--eval", type=int, default=32, help="evaluation windows of 512 tokens")
    ap.add_argument("--act-method", default="minmax")
    ap.add_argument("--group-size", type=int, default=64, help="w4a16 group (SmolLM2's 576 is not a multiple of 128)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--reload", action="store_true", help="also the Ascend checkpoint reloaded")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.calib, args.calib_len, args.eval, args.act_method,
                                    args.group_size, args.dtype, args.reload)))
        return
    rows = []
    for scheme in (["fp32"] + [s for s in args.schemes if s != "fp32"]):
        cmd = [sys.executable, __file__, "--one", scheme, "--calib", str(args.calib), "--calib-len",
               str(args.calib_len), "--eval", str(args.eval), "--act-method", args.act_method,
               "--group-size", str(args.group_size), "--dtype", args.dtype] + (["--reload"] if args.reload else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  done {scheme}", file=sys.stderr)
    base = rows[0]["ppl"]
    print(f"SmolLM2-135M {args.dtype}, calib {args.calib} x {args.calib_len} tokens, eval {args.eval} x 512 tokens, "
          f"act_method={args.act_method}, w4a16 group {args.group_size}")
    print("| scheme | perplexity | vs float | Ascend reload | calibration s | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        delta = 100.0 * (r["ppl"] / base - 1.0)
        reloaded = "" if r.get("reload_ppl") is None else f"{r['reload_ppl']:.3f}"
        print(f"| {r['scheme']} | {r['ppl']:.3f} | {delta:+.2f}% | {reloaded} | {r['calib_s']:.1f} | "
              f"{r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
