"""Issue 13: the `fxquant` command line on SmolLM2 (real subprocesses, real exit codes)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxquant
from fxquant.formats.safetensors_io import read_safetensors_folder
from fxquant.real_models import license_text, load_smollm2, perplexity, text_corpus, token_windows


def fxq(*args, timeout=900):
    # run from tests/, not the repository root: `python -m` puts its working directory on sys.path,
    # where the root's kernels/ folder would shadow the PyPI `kernels` package transformers imports
    return subprocess.run([sys.executable, "-m", "fxquant.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=Path(__file__).parent)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("texts")
    calib, evals = folder / "calib.txt", folder / "gpl3.txt"
    calib.write_text(text_corpus("calib"))
    evals.write_text(license_text("GPL-3"))
    return calib, evals


@pytest.fixture(scope="module")
def saved(texts, tmp_path_factory):
    """`fxquant quantize smollm2 --scheme w8a8_dynamic ... --report` once for the module."""
    calib, _ = texts
    out = tmp_path_factory.mktemp("ckpt") / "smollm2-w8a8d"
    run = fxq("--quiet", "quantize", "smollm2", "--scheme", "w8a8_dynamic", "--calib", calib, "--samples", 4,
              "--seq-len", 128, "--out", out, "--report", out / "report.html")
    assert run.returncode == 0, run.stderr
    return out, run


def test_quantize_writes_a_checkpoint_and_a_report(saved):
    out, run = saved
    assert re.search(r"quantized 210 layers \(w8a8_dynamic\) in [\d.]+ s", run.stdout), run.stdout
    names = {p.name for p in out.iterdir()}
    assert {"quant_model_weight_w8a8_dynamic.safetensors", "quant_model_description_w8a8_dynamic.json",
            "config.json", "fxquant_source.json", "tokenizer.json", "report.html"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    html = (out / "report.html").read_text()
    assert 'id="sqnr-plot"' in html and html.count('class="bar"') >= 210  # errors recorded for --report


def test_eval_of_the_checkpoint_matches_the_in_process_model(saved, texts, smollm2):
    out, _ = saved
    calib, evals = texts
    run = fxq("--quiet", "eval", out, "--ppl", evals, "--samples", 2, "--seq-len", 128)
    assert run.returncode == 0, run.stderr
    cli_ppl = float(re.search(r"perplexity ([\d.]+)", run.stdout).group(1))
    model, tok = smollm2
    windows = token_windows(tok, text_corpus("calib"), 4, 128)
    q = fxquant.quantize(model, [{"input_ids": w, "use_cache": False} for w in windows], "w8a8_dynamic",
                         options=fxquant.SchemeOptions(group_size=64, offset_in_rounding=True), progress=False)
    in_process = perplexity(q, token_windows(tok, license_text("GPL-3"), 2, 128))
    assert cli_ppl == pytest.approx(in_process, rel=1e-4)
    float_run = fxq("--quiet", "eval", "smollm2", "--ppl", evals, "--samples", 2, "--seq-len", 128)
    float_ppl = float(re.search(r"perplexity ([\d.]+)", float_run.stdout).group(1))
    assert float_ppl == pytest.approx(perplexity(model, token_windows(tok, license_text("GPL-3"), 2, 128)), rel=1e-4)
    assert float_ppl < cli_ppl < 1.3 * float_ppl  # naive per-token int8 on 128-token windows


def test_inspect_lists_each_saved_layer(saved):
    out, _ = saved
    run = fxq("inspect", out)
    assert run.returncode == 0, run.stderr
    assert "W8A8_DYNAMIC 210" in run.stdout.splitlines()[0]
    assert re.search(r"model\.layers\.29\.mlp\.down_proj\s+W8A8_DYNAMIC\s+int8\s+576x1536", run.stdout)


def test_session_yaml_drives_the_processors(texts, tmp_path):
    calib, _ = texts
    session = tmp_path / "session.yaml"
    session.write_text("processors:\n  m6:\n    cfg: {alpha: 0.5, beta: 0.5}\n"
                       "  w8a8_dynamic:\n    cfg: {}\n    disable_names: [model.layers.0.mlp.down_proj]\n")
    out = tmp_path / "sess"
    run = fxq("--quiet", "quantize", "smollm2", "--session", session, "--calib", calib, "--samples", 2,
              "--seq-len", 128, "--out", out)
    assert run.returncode == 0, run.stderr
    listed = fxq("inspect", out).stdout
    assert re.search(r"model\.layers\.0\.mlp\.down_proj\s+FLOAT", listed)
    assert "W8A8_DYNAMIC 209" in listed.splitlines()[0]


@pytest.mark.parametrize("case", ["missing model", "unknown scheme", "short calibration", "unwritable output",
                                  "bad session key", "bad mix_cfg", "not a checkpoint"])
def test_bad_input_is_one_line_and_exit_code_2(case, texts, tmp_path):
    calib, _ = texts
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    session = tmp_path / "s.yaml"
    session.write_text("processors: {w8a8: {cfg: {}, disable_names: []}}\nsteps: 3\n")
    base = ["quantize", "smollm2", "--calib", calib, "--out", tmp_path / "out"]
    args, expected = {
        "missing model": (["quantize", tmp_path / "nope", "--calib", calib, "--out", tmp_path / "o"],
                          "does not exist; give a Hugging Face folder"),
        "unknown scheme": ([*base, "--scheme", "w9a9"], "unknown quantization scheme 'w9a9'; valid:"),
        "short calibration": (["--quiet", "quantize", "smollm2", "--calib", short, "--out", tmp_path / "o"],
                              "too short for one window of 512"),
        "unwritable output": (["quantize", "smollm2", "--calib", calib, "--out", blocker / "sub"],
                              "cannot write to output folder"),
        "bad session key": ([*base[:-2], "--out", tmp_path / "o", "--session", session],
                            "unknown session key(s) ['steps']; valid: device, processor_cfg_map, processors"),
        "bad mix_cfg": ([*base, "--mix-cfg", "[1, 2]"], "--mix-cfg must be a JSON object"),
        "not a checkpoint": (["inspect", tmp_path], "is not an Ascend checkpoint folder"),
    }[case]
    run = fxq(*args)
    assert run.returncode == 2, (run.returncode, run.stderr)
    err = [line for line in run.stderr.splitlines() if line.startswith("fxquant")]
    assert len(err) == 1 and expected in err[0], run.stderr
    assert "Traceback" not in run.stderr


def test_model_may_be_a_gguf_file_or_a_hugging_face_folder(smollm2, texts, tmp_path):
    from fxquant.real_models import smollm2_gguf

    _, evals = texts
    model, tok = smollm2
    from safetensors.torch import save_model

    folder = tmp_path / "hf"  # a Hugging Face folder, written by hand (save_pretrained refuses GGUF-loaded models)
    model.config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"))
    tok.save_pretrained(folder)
    figures = []
    for spec in (smollm2_gguf(), folder):
        run = fxq("--quiet", "eval", spec, "--ppl", evals, "--samples", 1, "--seq-len", 64)
        assert run.returncode == 0, run.stderr
        figures.append(float(re.search(r"perplexity ([\d.]+)", run.stdout).group(1)))
    expected = perplexity(model, token_windows(tok, license_text("GPL-3"), 1, 64))
    assert figures == pytest.approx([expected, expected], rel=1e-4)


def test_bfloat16_checkpoint_evaluates_as_the_in_process_model(texts, smollm2, tmp_path):
    """--dtype bfloat16 quantizes the model in bf16; eval rebuilds the checkpoint in the dtype it was
    made in (fxquant_source.json) and gives the in-process bf16 model's perplexity."""
    calib, evals = texts
    out = tmp_path / "bf16"
    run = fxq("--quiet", "quantize", "smollm2", "--scheme", "w8a16", "--dtype", "bfloat16", "--calib", calib,
              "--samples", 1, "--seq-len", 64, "--out", out)
    assert run.returncode == 0, run.stderr
    weights = read_safetensors_folder(out)
    assert weights["model.layers.0.mlp.down_proj.weight_scale"].dtype == torch.bfloat16
    assert weights["model.norm.weight"].dtype == torch.bfloat16
    run = fxq("--quiet", "eval", out, "--ppl", evals, "--samples", 1, "--seq-len", 128)
    assert run.returncode == 0, run.stderr
    cli_ppl = float(re.search(r"perplexity ([\d.]+)", run.stdout).group(1))
    _, tok = smollm2
    model = load_smollm2(torch.bfloat16)[0]
    ids = token_windows(tok, text_corpus("calib"), 1, 64)[0]
    q = fxquant.quantize(model, [{"input_ids": ids, "use_cache": False}], "w8a16",  # weight-only: data-independent
                         options=fxquant.SchemeOptions(group_size=64, offset_in_rounding=True), progress=False)
    assert cli_ppl == pytest.approx(perplexity(q, token_windows(tok, license_text("GPL-3"), 1, 128)), rel=1e-4)
    bad = fxq("quantize", "smollm2", "--dtype", "bfloat16", "--format", "onnx", "--scheme", "w8a8", "--calib", calib,
              "--out", tmp_path / "onnx")
    assert bad.returncode != 0 and "--format onnx exports float32 models" in bad.stderr
