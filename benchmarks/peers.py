"""Peers side by side: SmolLM2-135M through torchao, llm-compressor and optimum-quanto next to
fxquant's rows, under the protocol of session_combos.py (calibration on the "calib" split, 16 x 512
tokens; perplexity on the disjoint "eval" split, 32 x 512 tokens; one process per row; calibration
wall time and whole-process peak RSS, VmHWM). Every peer quantizes every Linear but lm_head.

    python benchmarks/peers.py [--rows ...] [--python .venv-peers/bin/python] [--calib 16] [--eval 32]

The peers are optional and never a test dependency. They need other transformers pins than
fxquant's test environment (llm-compressor 0.14 wants transformers <= 5.17), so they live in their
own virtual environment, torch pinned to 2.13.0: `bash scripts/peers_env.sh` makes .venv-peers,
which --python defaults to when it exists. A row whose library does not import prints why.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _rows import add_protocol_arguments, eval_windows, print_table, run_rows
from _rss import peak_rss_mb

ROOT = Path(__file__).resolve().parent.parent
#: 4-bit weight rows first, then 8-bit ones
ROWS = ["fxquant w4a16/g64", "fxquant w4a16/g64+gptq", "fxquant w4a16/g64+awq+gptq", "torchao w4a16/g64",
        "quanto w4a16/g64", "llmcompressor gptq w4a16/g64", "llmcompressor awq w4a16/g64",
        "fxquant w8a8_dynamic", "torchao w8a8_dynamic", "llmcompressor w8a8_dynamic",
        "fxquant m6+w8a8_dynamic", "llmcompressor smoothquant+gptq w8a8_dynamic", "torchao w8a16", "quanto w8a16"]


def torchao_row(model, scheme: str, calib: list, tok) -> None:
    import torch
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        quantize_,
    )
    from torchao.quantization.granularity import PerGroup

    config = {"w8a8_dynamic": Int8DynamicActivationInt8WeightConfig(), "w8a16": Int8WeightOnlyConfig(),
              "w4a16/g64": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64))}[scheme]
    quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn != "lm_head")


def llmcompressor_row(model, recipe_name: str, calib: list, tok) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    w4g64 = {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}}}
    recipes = {
        "w8a8_dynamic": [QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])],
        "smoothquant+gptq w8a8_dynamic": [SmoothQuantModifier(smoothing_strength=0.8),
                                          GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])],
        "gptq w4a16/g64": [GPTQModifier(config_groups=w4g64, ignore=["lm_head"])],
        "awq w4a16/g64": [AWQModifier(config_groups=w4g64, ignore=["lm_head"])],
    }
    # oneshot re-reads the config from model.name_or_path and refuses "quantized" models: ours was
    # dequantized to fp32 from a GGUF file, so point it at a folder holding the config without that tag
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder = tempfile.mkdtemp(prefix="peers-config-")
    model.config.save_pretrained(folder)
    model.config._name_or_path = folder
    data = Dataset.from_dict({"input_ids": [w[0].tolist() for w in calib],
                              "attention_mask": [[1] * w.shape[1] for w in calib]})
    oneshot(model=model, processor=tok, dataset=data, recipe=recipes[recipe_name],
            num_calibration_samples=len(calib), max_seq_length=calib[0].shape[1])


def quanto_row(model, scheme: str, calib: list, tok) -> None:
    from optimum.quanto import freeze, qint4, qint8, quantize

    weights = {"w8a16": qint8, "w4a16/g64": qint4}[scheme]
    quantize(model, weights=weights, exclude=["lm_head"])
    freeze(model)


def fxquant_row(model, combo: str, calib: list):
    from session_combos import quantize_combo

    return quantize_combo(model, combo, [{"input_ids": w, "use_cache": False} for w in calib])


def run_one(row: str, n_calib: int, n_eval: int, eval_text: str = "docs") -> dict:
    import torch

    from fxquant.real_models import load_smollm2, perplexity, text_corpus, token_windows

    torch.manual_seed(0)
    model, tok = load_smollm2()
    evals = eval_windows(tok, eval_text, n_eval)
    calib = token_windows(tok, text_corpus("calib"), n_calib, 512)
    tool, _, what = row.partition(" ")
    start = time.perf_counter()
    if tool == "fxquant":
        model = fxquant_row(model, what, calib)
    elif tool != "fp32":
        {"torchao": torchao_row, "llmcompressor": llmcompressor_row, "quanto": quanto_row}[tool](model, what, calib, tok)
    calib_s = time.perf_counter() - start if tool != "fp32" else 0.0
    return {"row": row, "ppl": perplexity(model, evals), "calib_s": calib_s, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=ROWS)
    peers_python = ROOT / ".venv-peers" / "bin" / "python"
    ap.add_argument("--python", default=str(peers_python) if peers_python.exists() else sys.executable,
                    help="interpreter that has the peers installed (default: .venv-peers when present)")
    add_protocol_arguments(ap)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.calib, args.eval, args.eval_text)))
        return
    import torch

    print(f"SmolLM2-135M, calib {args.calib} x 512 tokens, eval {args.eval} x 512 tokens of {args.eval_text} (gpl3: at most 14 windows); CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads; interpreter {args.python}")
    print_table("tool and configuration", run_rows(args.python, __file__, ["fp32"] + args.rows, args))


if __name__ == "__main__":
    main()
