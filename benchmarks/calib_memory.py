"""Peak RSS of calibrating SmolLM2-135M with static w8a8 on 64 windows of 256 tokens.

Runs in a fresh process: loads the model, calibrates, prints one JSON line with the peak RSS of
the whole process (model included), the storage's peak number of live values and the graph's
live-set bound.

    python benchmarks/calib_memory.py [--windows 64] [--length 256] [--scheme w8a8] [--asym] [--layerwise] [--threads 2]

--layerwise forces the layerwise runner (seed 003) where fxquant.quantize would stream (see
docs/calibration_runner.md): the storage figures exist only for the runner.
"""

from __future__ import annotations

import argparse
import json
import time

from _rss import peak_rss_mb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--scheme", default="w8a8")
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--layerwise", action="store_true", help="the layerwise runner even where quantize streams")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    args = ap.parse_args()

    import torch

    import fxquant
    from fxquant.real_models import load_smollm2, text_corpus, token_windows
    from fxquant.storage import graph_live_set_size

    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    calib = [{"input_ids": w, "use_cache": False}
             for w in token_windows(tok, text_corpus("calib"), args.windows, args.length)]
    rss_loaded = peak_rss_mb()
    start = time.perf_counter()
    if args.layerwise:
        from fxquant.api import quantization_passes
        from fxquant.passes import Calibrate, PassManager, ResolveSchemes

        passes = quantization_passes(ResolveSchemes(default=args.scheme), fxquant.SchemeOptions(), calib,
                                     asym=args.asym, progress=False)
        passes = [Calibrate(calib, asym=args.asym, progress=False, streaming=False) if isinstance(p, Calibrate)
                  else p for p in passes]
        q = PassManager(passes)(fxquant.capture(model, (), calib[0]))
    else:
        q = fxquant.quantize(model, calib, scheme=args.scheme, asym=args.asym, progress=False)
    seconds = time.perf_counter() - start
    rss = peak_rss_mb()
    print(json.dumps({
        "scheme": args.scheme, "layerwise": args.layerwise, "windows": args.windows, "length": args.length, "asym": args.asym,
        "calib_s": round(seconds, 1), "rss_after_load_mb": round(rss_loaded), "peak_rss_mb": round(rss),
        "peak_live_values": q.meta.get("fxquant_peak_live"),
        "live_set_bound": q.meta.get("fxquant_live_set"),
        "graph_live_set": graph_live_set_size(q.graph), "graph_nodes": len(q.graph.nodes),
    }))


if __name__ == "__main__":
    main()
