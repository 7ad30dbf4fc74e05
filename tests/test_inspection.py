"""Issue 13: inspect, compare, the HTML report (checked in headless Chromium) and graph views."""

import math
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest
import torch

import fxquant
from fxquant.inspection.graph_drawing import collapsed_graph, depth_for
from fxquant.real_models import text_corpus, token_windows

from digits import train
from models import ResNetStyle


@pytest.fixture(scope="module")
def smol_windows(smollm2):
    _, tok = smollm2
    return token_windows(tok, text_corpus("calib"), 4, 128)


@pytest.fixture(scope="module")
def smol_smoothed(smollm2, smol_windows):
    """SmolLM2, static w8a8 after SmoothQuant (alpha 0.5), with layer measurements recorded."""
    model, _ = smollm2
    return fxquant.quantize(model, [[w] for w in smol_windows], "w8a8", smooth_alpha=0.5,
                            measure_layers=True, progress=False)


def _reference_rel_error(model, q, name, windows):
    """||qlayer(x / s) - r layer(x)|| / ||r layer(x)|| over the windows, with x the float model's own
    input of `name` (hooked), s the smoothing scale of its input and r the one folded into its
    output rows (the graph's own domain): computed here, not by fxquant."""
    layer = model.get_submodule(name)
    qlayer = q.get_submodule(name)
    node = next(n for n in q.graph.nodes if n.op == "call_module" and n.target == name)
    s = node.meta["fxquant"].get("smooth_scale")
    rows = node.meta["fxquant"].get("smooth_output_scale")
    err = ref = 0.0
    seen = []
    h = layer.register_forward_hook(lambda m, a, out: seen.append((a[0], out)))
    try:
        with torch.no_grad():
            for w in windows:
                model(w)
            for x, out in seen:
                y = qlayer(x / s if s is not None else x)
                out = out * rows if rows is not None else out
                err += float(((y.double() - out.double()) ** 2).sum())
                ref += float((out.double() ** 2).sum())
    finally:
        h.remove()
    return math.sqrt(err / ref)


def test_inspect_gives_every_decision_with_its_numbers(smollm2, smol_smoothed, smol_windows):
    model, _ = smollm2
    q = smol_smoothed
    table = fxquant.inspect(q)
    rows = {r.name: r for r in table}
    quantized = [r for r in table if r.quantized]
    assert len(quantized) == 210
    assert rows["lm_head"].scheme == "float" and "last layer" in rows["lm_head"].reason
    assert rows["model.layers.0.self_attn.add"].reason == "small_op_scheme"
    for r in quantized:
        node = next(n for n in q.graph.nodes if n.op == "call_module" and n.target == r.name)
        assert r.reason == "default" and r.kernel == node.meta["fxquant_kernel"]
        assert r.activation.startswith("int8 per-tensor") and r.weight == "int8 per-channel sym"
        assert 0 < r.weight_scale_min <= r.weight_scale_max
        assert math.isfinite(r.sqnr_db) and r.sqnr_db > 5
        assert r.sqnr_db == pytest.approx(-20 * math.log10(r.rel_error), rel=1e-9)
        lo, hi = r.act_range  # minmax: the grid covers what calibration saw, within one step
        assert lo <= -r.input_absmax + r.act_scale or hi >= r.input_absmax - r.act_scale
        assert r.smoothing in ("norm", "linear", "attention")
    # smoothing moved outliers: the input outlier ratio drops on most layers
    lower = [r.outlier_ratio < r.outlier_ratio_before_smoothing for r in quantized]
    assert sum(lower) > 0.8 * len(lower)
    # the recorded error equals one computed from the float model's own inputs
    for name in ("model.layers.3.mlp.down_proj", "model.layers.7.self_attn.v_proj", "model.layers.0.mlp.up_proj"):
        assert rows[name].rel_error == pytest.approx(_reference_rel_error(model, q, name, smol_windows), rel=1e-3)
    text = str(table)
    assert "SQNR dB" in text and "model.layers.29.mlp.down_proj" in text and "210 quantized" in text
    assert table.to_dicts()[0]["name"] == table[0].name and len(table.to_dicts()) == len(table)
    assert [r.sqnr_db for r in table.worst(3)] == sorted(r.sqnr_db for r in quantized)[:3]


def test_compare_finds_where_error_enters_on_static_smollm2(smollm2, smol_windows):
    """Plain static w8a8: the down_proj inputs (SwiGLU products) are where error enters."""
    model, tok = smollm2
    q = fxquant.quantize(model, [[w] for w in smol_windows], "w8a8", measure_layers=True, progress=False)
    evals = token_windows(tok, text_corpus("eval"), 2, 128)
    result = fxquant.compare(model, q, [[w] for w in evals])
    assert len(result) == 211 and result.samples == 2  # 210 quantized layers and the float lm_head
    enters = [r.name for r in result.where_error_enters(5)]
    assert all(name.endswith("mlp.down_proj") for name in enters), enters
    # independent check of the model-level figure
    with torch.no_grad():
        ref = torch.cat([model(w).logits for w in evals]).double()
        out = torch.cat([q(w).logits for w in evals]).double()
    assert result.output.output_rel_error == pytest.approx(float((out - ref).norm() / ref.norm()), rel=1e-6)
    # the local error of a layer on the calibration data is what calibration recorded
    on_calib = fxquant.compare(model, q, [[w] for w in smol_windows])
    table = fxquant.inspect(q)
    for name in enters[:2]:
        assert on_calib[name].local_rel_error == pytest.approx(table[name].rel_error, rel=1e-4)
    assert result["lm_head"].local_rel_error is None and result["lm_head"].input_rel_error > 0
    assert "error enters most at: model.layers." in str(result)


def test_compare_on_a_cnn_with_folded_batchnorm(digits):
    torch.manual_seed(0)
    model = train(ResNetStyle(), digits[0], digits[1], epochs=2)
    calib = [[digits[0][i:i + 64]] for i in range(0, 256, 64)]
    q = fxquant.quantize(model, calib, "w8a8", progress=False)
    assert q.meta["fxquant_folded_bn"]
    result = fxquant.compare(model, q, [[digits[2][:64]]])
    convs = [r for r in result if r.op == "Conv2d"]
    assert convs and all(r.output_rel_error < 0.2 for r in convs)  # against the BatchNorm outputs
    assert all(r.local_rel_error < 0.1 for r in convs if r.scheme != "float")
    assert result.output.output_rel_error < 0.1


def test_graph_drawing_collapses_by_scope(smol_smoothed):
    q = smol_smoothed
    depth = depth_for(q, max_boxes=120)
    g = collapsed_graph(q, depth)
    assert g.number_of_nodes() <= 120 and "model.layers.7" in g
    assert g.nodes["model.layers.7"]["scheme"] == "w8a8" and g.nodes["model.layers.7"]["schemes"]["w8a8"] == 7
    svg = fxquant.draw_graph(q, collapse_depth=depth)
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    boxes = root.findall(f"{ns}g")
    assert len(boxes) == g.number_of_nodes()
    assert sum(b.get("data-scheme") == "w8a8" for b in boxes) == 30  # one box per decoder layer
    full = collapsed_graph(q, None)
    assert full.number_of_nodes() == sum(1 for n in q.graph.nodes if n.op != "get_attr")


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "headless Chromium is needed: scripts/test.sh installs Debian's chromium package"
    return exe


def _browser(exe, tmp_path, *args):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_opens_in_chromium_with_its_plots(smol_smoothed, smol_windows, tmp_path):
    from PIL import Image

    path = fxquant.report(smol_smoothed, None, tmp_path / "report.html")
    html = path.read_text()
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")  # self-contained
    assert not list(tmp_path.glob(".*.tmp"))
    exe = _chromium()
    dom = _browser(exe, tmp_path, "--dump-dom", path.as_uri()).stdout
    body = dom[dom.index("<body"):dom.index(">", dom.index("<body"))]
    assert 'data-ready="1"' in body, body  # the page's script ran to its end
    assert "data-errors" not in body, body
    assert 'data-bars="210"' in body and 'data-rows="331"' in body
    shot = tmp_path / "shot.png"
    _browser(exe, tmp_path, "--window-size=1200,1000", f"--screenshot={shot}", path.as_uri())
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 1000)
    # the SQNR plot's bars (w8a8 blue, #1f77b4) are drawn in the first screen
    blue = sum(1 for px in img.getdata() if abs(px[0] - 0x1f) < 8 and abs(px[1] - 0x77) < 8 and abs(px[2] - 0xb4) < 8)
    assert blue > 5000, blue


def test_report_measures_what_calibration_did_not_record(digits, tmp_path):
    torch.manual_seed(0)
    model = train(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                      torch.nn.Linear(32, 10)), digits[0], digits[1], epochs=3)
    calib = [[digits[0][i:i + 64]] for i in range(0, 256, 64)]
    kept = fxquant.quantize(model, calib, "w8a8", disable_last_layer=False, keep_float_weight=True, progress=False)
    fxquant.report(kept, calib, tmp_path / "kept.html")
    table = fxquant.inspect(kept)
    assert all(r.sqnr_db is None for r in table)  # report() fills its own copy of the rows
    html = (tmp_path / "kept.html").read_text()
    assert "errors of 2 layers (float weights held)" in html
    released = fxquant.quantize(model, calib, "w8a8", disable_last_layer=False, progress=False)
    fxquant.report(released, calib, tmp_path / "released.html")
    html = (tmp_path / "released.html").read_text()
    assert "layer errors were not recorded: quantize with measure_layers=True" in html
    assert "input statistics of 2 layers" in html


def test_an_installed_model_is_refused_with_the_workflow_that_keeps_the_graph(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    reference = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    reference.load_state_dict(model.state_dict())
    calib = [[torch.randn(4, 16)] for _ in range(3)]
    gm = fxquant.quantize(model, calib, "w8a8", disable_last_layer=False, consume_model=True, progress=False)
    assert fxquant.report(gm, None, tmp_path / "gm.html").exists()  # the graph is there to report on
    assert fxquant.compare(reference, gm, calib).rows
    installed = fxquant.apply(model, gm)
    with torch.no_grad():
        assert torch.equal(installed(calib[0][0]), gm(calib[0][0]))
    for refused in (lambda: fxquant.report(installed, None, tmp_path / "m.html"),
                    lambda: fxquant.compare(reference, installed, calib)):
        with pytest.raises(fxquant.ConfigError, match=r"consume_model=True.*fxquant\.apply\(model, gm\)"):
            refused()
