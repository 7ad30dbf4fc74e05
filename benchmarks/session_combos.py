"""SmolLM2-135M perplexity for every session processor combination (seed 002), with calibration
time and peak RSS. Same protocol as llm_ppl.py: calibration on the "calib" split (16 x 512 tokens),
perplexity on the disjoint "eval" split (32 x 512 tokens), one process per combination.

    python benchmarks/session_combos.py [--combos w8a8 m4+w8a8 ...] [--calib 16] [--eval 32]

A combination is processor names joined by "+": one of w8a8 / w8a8_dynamic, optionally one of
m3 / m4 / m6 (searched alpha, beta) / m6=<alpha>,<beta>, quarot / quarot=<online layer patterns> (Hadamard rotation, before smoothing; e.g. quarot=*down_proj), fa3 (with w8a8_dynamic), and gptq (the quant
config's w_method="gptq"; otherwise weights are rounded to nearest), and mix=<layer pattern>:<scheme>
(session.run's mix_cfg, e.g. mix=*down_proj:w8a8_dynamic), and float=<layer name>,<layer name>... (the
quant processor's disable_names: those layers stay float), and act=<observer> (the quant config's
act_method: minmax, histogram, mixed), and save (the save processor writes the Ascend checkpoint, inside
the timed calibration; after the peak RSS is read, the checkpoint is reloaded into a fresh SmolLM2 with
fxquant.load_ascend and its perplexity is the "Ascend reload" column). 4-bit weights: w4a16/g<group>
optionally +awq (activation-aware scale search on the scheme's own grid) and +gptq (per-group GPTQ),
through fxquant.quantize. Rows quantize in place (`inplace=True`: the model becomes the quantized
one, as torchao and llm-compressor do it), which is what the peak RSS column measures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time

from _rows import add_protocol_arguments, eval_windows, print_table, run_rows
from _rss import peak_rss_mb

ALL = ["w8a8", "m3+w8a8", "m4+w8a8", "m6=0.85,0.15+w8a8", "m6+w8a8",
       "w8a8_dynamic", "m3+w8a8_dynamic", "m4+w8a8_dynamic", "m6=0.4,0.6+w8a8_dynamic", "m6+w8a8_dynamic",
       "m4+w8a8_dynamic+fa3", "w8a8+gptq", "m6=0.85,0.15+w8a8+gptq", "m6+w8a8+gptq", "m6+w8a8_dynamic+gptq",
       "w4a16/g64", "w4a16/g64+gptq", "w4a16/g64+awq", "w4a16/g64+awq+gptq"]


def session_for(combo: str, calib: list, save_dir: str | None = None):
    from fxquant import session as s

    procs = {}
    parts = combo.split("+")
    w_method = "gptq" if "gptq" in parts else "minmax"
    act = next((p.partition("=")[2] for p in parts if p.startswith("act=")), "minmax")
    disable = [n for p in parts if p.startswith("float=") for n in p.partition("=")[2].split(",")]
    for part in parts:
        name, _, value = part.partition("=")
        if name in ("gptq", "mix", "float", "act"):
            continue
        if name == "save":
            procs[name] = s.SaveProcessorConfig(output_path=save_dir, save_type=["ascendV1"])
            continue
        if name == "w8a8":
            procs[name] = s.W8A8ProcessorConfig(cfg=s.W8A8QuantConfig(act_method=act, w_method=w_method), disable_names=disable)
        elif name == "w8a8_dynamic":
            procs[name] = s.W8A8DynamicProcessorConfig(cfg=s.W8A8DynamicQuantConfig(act_method=act, w_method=w_method),
                                                       disable_names=disable)
        elif name == "fa3":
            procs[name] = s.FA3ProcessorConfig()
        elif name == "quarot":
            procs[name] = s.QuaRotProcessorConfig(online=value.split(",") if value else [])
        elif name == "m3":
            procs[name] = s.M3ProcessorConfig()
        elif name == "m4":
            procs[name] = s.M4ProcessorConfig()
        elif name == "m6":
            alpha, beta = (float(v) for v in value.split(",")) if value else (None, None)
            procs[name] = s.M6ProcessorConfig(cfg=s.M6Config(alpha=alpha, beta=beta))
        else:
            raise SystemExit(f"unknown processor {name!r} in {combo!r}")
    return s.SessionConfig(processor_cfg_map=procs, calib_data=calib)


def quantize_w4a16(model, combo: str, calib: list):
    """w4a16 has no session processor (seed 002 has W8A8 ones): fxquant.quantize with the group
    size after "/g", AWQ scale search ("awq") and per-group GPTQ rounding ("gptq")."""
    import fxquant
    from fxquant.keep_acc import GPTQWeights
    from fxquant.passes import AWQScale
    from fxquant.schemes import SchemeOptions

    parts = combo.split("+")
    group = int(parts[0].partition("/g")[2] or 128)
    unknown = set(parts[1:]) - {"awq", "gptq"}
    if unknown:
        raise SystemExit(f"unknown w4a16 option(s) {sorted(unknown)} in {combo!r}; valid: awq, gptq")
    return fxquant.quantize(model, calib, "w4a16", options=SchemeOptions(group_size=group), progress=False,
                            suppression=AWQScale(calib) if "awq" in parts else None,
                            weight_optimizers=[GPTQWeights()] if "gptq" in parts else [], inplace=True)


def quantize_combo(model, combo: str, calib: list, save_dir: str | None = None):
    """`model` quantized as `combo` says, in place as the peers quantize (the model is handed over:
    smoothing folds into its weights, no float copy), except with fa3, whose attention inputs need
    the GraphModule."""
    from fxquant import session

    if combo.startswith("w4a16"):
        if save_dir is not None:
            raise SystemExit(f"save is a session processor; {combo!r} runs through fxquant.quantize")
        return quantize_w4a16(model, combo, calib)
    parts = combo.split("+")
    mix = dict(p.partition("=")[2].rsplit(":", 1) for p in parts if p.startswith("mix="))
    return session.run(model, session_for(combo, calib, save_dir), progress=False, inplace="fa3" not in parts,
                       mix_cfg=mix or None)


def run_one(combo: str, n_calib: int, n_eval: int, eval_text: str = "docs") -> dict:
    import torch

    from fxquant.real_models import load_smollm2, perplexity, text_corpus, token_windows

    torch.manual_seed(0)
    model, tok = load_smollm2()
    evals = eval_windows(tok, eval_text, n_eval)
    calib_s = 0.0
    save_dir = tempfile.mkdtemp(prefix="fxquant_combo_") if "save" in combo.split("+") else None
    if combo != "fp32":
        calib = [{"input_ids": w, "use_cache": False} for w in token_windows(tok, text_corpus("calib"), n_calib, 512)]
        start = time.perf_counter()
        model = quantize_combo(model, combo, calib, save_dir)
        calib_s = time.perf_counter() - start
    result = {"row": combo, "ppl": perplexity(model, evals), "calib_s": calib_s, "peak_rss_mb": peak_rss_mb()}
    if save_dir is not None:
        from fxquant import load_ascend

        del model
        fresh, _ = load_smollm2()
        result["reloaded_ppl"] = perplexity(load_ascend(fresh, save_dir), evals)
        shutil.rmtree(save_dir)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--combos", nargs="+", default=ALL)
    add_protocol_arguments(ap)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.calib, args.eval, args.eval_text)))
        return
    rows = run_rows(sys.executable, __file__, ["fp32"] + args.combos, args)
    print(f"SmolLM2-135M sessions, calib {args.calib} x 512 tokens, eval {args.eval} x 512 tokens of {args.eval_text} (gpl3: at most 14 windows)")
    print_table("processors", rows)


if __name__ == "__main__":
    main()
