"""Quantization of real models measured on real data (perplexity, cosine, accuracy)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxquant
from fxquant.real_models import perplexity

from digits import accuracy, train
from models import MobileNetStyle, ResNetStyle

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fp32_ppl(smollm2, smollm2_windows):
    return perplexity(smollm2[0], smollm2_windows[1])


@pytest.mark.parametrize("scheme,max_increase", [
    ("w8a16", 0.01), ("w8a8_dynamic", 0.06), ("w4a16", 0.6), ("w8a8", 1.5),
])
def test_smollm2_schemes(smollm2, smollm2_graph, smollm2_windows, fp32_ppl, scheme, max_increase):
    model, _ = smollm2
    calib, evals = smollm2_windows
    q = fxquant.quantize(smollm2_graph, [{"input_ids": w, "use_cache": False} for w in calib], scheme=scheme,
                         options=fxquant.SchemeOptions(group_size=64), progress=False)
    with torch.no_grad():
        out = q(evals[0], use_cache=False)
    assert type(out) is type(model(input_ids=evals[0], use_cache=False))
    ppl = perplexity(q, evals)
    assert fp32_ppl < ppl <= fp32_ppl * (1 + max_increase)
    assert q.meta["fxquant_decisions"]["lm_head"][0] == "float"
    n_quant = sum(isinstance(m, fxquant.QuantOpr) for m in q.modules())
    assert n_quant == 210
    # the user's model is not modified
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)


def test_minilm_dynamic_cosine(minilm):
    from fxquant.real_models import encoder_batches, sentences, text_corpus

    sents = sentences(text_corpus("eval"), 60)
    assert len(sents) >= 50
    bert = minilm[0].model
    ref = minilm.encode(sents, convert_to_tensor=True)
    calib = encoder_batches(minilm, sents[:16])
    q = fxquant.quantize(bert, calib, scheme="w8a8_dynamic", progress=False)
    minilm[0].model = q
    try:
        out = minilm.encode(sents, convert_to_tensor=True)
    finally:
        minilm[0].model = bert
    cos = torch.nn.functional.cosine_similarity(ref, out)
    assert cos.mean() >= 0.99 and cos.min() >= 0.98


@pytest.mark.parametrize("cls", [ResNetStyle, MobileNetStyle])
def test_digits_cnn_w8a8_within_one_point(digits, cls):
    xtr, ytr, xte, yte = digits
    torch.manual_seed(0)
    model = train(cls(), xtr, ytr)
    fp32 = accuracy(model, xte, yte)
    assert fp32 > 90.0
    q = fxquant.quantize(model, [[xtr[i:i + 32]] for i in range(0, 256, 32)], scheme="w8a8", progress=False)
    assert abs(accuracy(q, xte, yte) - fp32) <= 1.0


def test_smollm2_calibration_memory_bound():
    """Static w8a8 calibration by the layerwise runner on 16 windows x 256 tokens holds no more live
    values than the graph's live set and peaks below 2 GB RSS (whole process: about 0.6 GB of
    anonymous memory, the mapped weights file, 0.1 to 0.54 GB of it resident depending on the page
    cache, and oneDNN's packed weights on AVX2): keeping every node's value would take many gigabytes
    (one [16, 256, 576] float32 value is 9.4 MB; the graph has 2170 nodes).
    `benchmarks/calib_memory.py` without --windows measures the 64-window figure."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "calib_memory.py"), "--layerwise",
                          "--windows", "16", "--threads", str(torch.get_num_threads())],
                         capture_output=True, text=True, check=True, timeout=1200)
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["peak_live_values"] <= stats["live_set_bound"] < stats["graph_nodes"] / 10
    assert stats["peak_rss_mb"] < 2000, stats
