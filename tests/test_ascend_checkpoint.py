"""Ascend-ready save / load_ascend round trips on SmolLM2 and the exact on-disk format."""

import copy
import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import fxquant
from fxquant import Calibrator, QuantConfig
from fxquant.formats.ascend_modules import _AscendLinear, build_ascend_linear
from fxquant.formats.safetensors_io import read_safetensors_folder
from fxquant.kernels import decode_scale, reference_ops
from fxquant.kernels.int8_decode import int8_decode_available
from fxquant.kernels.weight_only import native_gemv_available
from fxquant.passes import LowerToAscend, PassManager
from fxquant.real_models import load_smollm2

from models import truncated_smollm2

CASES = {
    "w8a8": (dict(), None),
    "w8a8_dynamic": (dict(is_dynamic=True), None),
    "w8a16": (dict(a_bit=16), None),
    "mix": (dict(is_dynamic=True), {"*down_proj": "w8a16", "*q_proj": "w8a8", "*up_proj": "w4a16",
                                    "model.layers.1.*": "float"}),
}


@pytest.fixture(scope="module")
def calibrated(smollm2_graph, smollm2_windows):
    calib = [[w[:, :64]] for w in smollm2_windows[0][:2]]
    out = {}
    for key, (kw, mix) in CASES.items():
        cal = Calibrator(smollm2_graph, QuantConfig(mm_tensor=False, group_size=64, **kw), calib_data=calib, mix_cfg=mix)
        cal.run()
        out[key] = cal
    return out


@pytest.mark.parametrize("key", list(CASES))
def test_saved_checkpoint_reloads_and_reproduces_logits(calibrated, smollm2_windows, tmp_path, key):
    cal = calibrated[key]
    cal.save(str(tmp_path))
    model, _ = load_smollm2()
    loaded = fxquant.load_ascend(model, tmp_path)
    ids = smollm2_windows[1][0]
    with torch.no_grad():
        ref = cal.model(ids).logits
        out = loaded(input_ids=ids, use_cache=False).logits
    agree = (ref.argmax(-1) == out.argmax(-1)).float().mean().item()
    print(f"{key}: max abs diff {(ref - out).abs().max().item():.3g}, top-1 agreement {agree:.4f}")
    assert agree >= 0.999
    assert (ref - out).abs().max() <= 1e-4
    with pytest.raises(fxquant.ConfigError, match="save_pretrained would write.*checkpoint it was loaded from"):
        loaded.save_pretrained(tmp_path / "hf")  # from_pretrained would load its layers at random
    assert not (tmp_path / "hf").exists()


def test_reloaded_layers_run_fxquants_cpu_kernels(calibrated, smollm2, tmp_path):
    """Without torch_npu, reloaded linears keep their codes in the layouts of fxquant's CPU kernels:
    the C kernels on float32 inputs of a few rows, the CPU's integer GEMM (its packed operands kept)
    on more. W8A8 and W8A8_DYNAMIC give the reference ops' floats bit for bit at every row count,
    W8A16 / W4A16 the same sums in another order; greedy decoding gives the ops' tokens."""
    calibrated["mix"].save(str(tmp_path))
    loaded = fxquant.load_ascend(load_smollm2()[0], tmp_path)
    layers = {name: m for name, m in loaded.named_modules() if isinstance(m, _AscendLinear)}
    assert {m.quant_type for m in layers.values()} == {"W8A8", "W8A8_DYNAMIC", "W8A16", "W4A16"}
    assert int8_decode_available() and native_gemv_available()  # the C compiler inductor needs builds them
    up = layers["model.layers.3.mlp.up_proj"]  # W4A16: two codes per byte
    assert up.codes_blocked and up.weight_blocked.numel() == 1536 * 576 // 2
    tensors = read_safetensors_folder(tmp_path)
    as_given = dataclasses.replace(reference_ops(), backend="the reference ops as given")  # no CPU kernels
    torch.manual_seed(0)
    for name, m in layers.items():
        plain = build_ascend_linear(m.quant_type, {k[len(name) + 1:]: t for k, t in tensors.items()
                                           if k.rsplit(".", 1)[0] == name}, as_given)
        assert not plain.kernel_layout and torch.equal(plain.weight_codes(), m.weight_codes())
        for rows in (1, 3, 8, 9, 40):
            x = torch.randn(rows, m.in_features) * 3
            x[0, :5] = 40.0  # an outlier, as real activations have
            assert (m.row_kernel(x) is not None) == (rows <= 8), (name, rows)
            with torch.no_grad():
                fast, ref = m(x), plain(x)
            if m.quant_type.startswith("W8A8"):
                assert torch.equal(fast, ref), (name, rows)
            else:  # float32 sums of k terms in another order: error relative to the largest output
                assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max())), (name, rows)
        assert m.row_kernel(torch.randn(1, m.in_features, requires_grad=True)) is None
    copied = copy.deepcopy(up)  # binds its own kernel to its own codes
    x = torch.randn(2, up.in_features)
    with torch.no_grad():
        assert torch.equal(copied(x), up(x))
    ids = smollm2[1]("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        fast = loaded.generate(ids, max_new_tokens=8, do_sample=False)
        for m in layers.values():
            m.row_kernels = False
        ref = loaded.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(fast, ref)


def test_description_lists_every_tensor_with_type_dtype_and_shape(calibrated, smollm2, tmp_path):
    cal = calibrated["mix"]
    cal.save(str(tmp_path), save_type=["safe_tensor", "ascendV1"])
    files = sorted(os.listdir(tmp_path))
    assert files == ["config.json", "quant_model_description.json", "quant_model_description_w8a8_dynamic.json",
                     "quant_model_weight_w8a8_dynamic.safetensors"]
    desc = json.loads((tmp_path / "quant_model_description.json").read_text())
    assert desc == json.loads((tmp_path / "quant_model_description_w8a8_dynamic.json").read_text())
    tensors = load_file(str(tmp_path / "quant_model_weight_w8a8_dynamic.safetensors"))
    assert desc.pop("model_quant_type") == "W8A8_DYNAMIC"
    assert set(desc) == set(tensors)
    original = smollm2[0].state_dict()
    quantized_layers = {k[:-7] for k, t in desc.items() if k.endswith(".weight") and t != "FLOAT"}
    # complete checkpoint: every original tensor name is present
    for name in original:
        assert name in tensors or name.rsplit(".", 1)[0] in quantized_layers
    n, k = 576, 576
    q = "model.layers.3.self_attn.q_proj"  # W8A8 static
    assert desc[f"{q}.weight"] == "W8A8"
    assert tensors[f"{q}.weight"].dtype == torch.int8 and tensors[f"{q}.weight"].shape == (n, k)
    assert tensors[f"{q}.input_scale"].shape == (1,) and tensors[f"{q}.input_scale"].dtype == torch.float32
    assert tensors[f"{q}.input_offset"].shape == (1,)
    assert float(tensors[f"{q}.input_offset"]) == round(float(tensors[f"{q}.input_offset"]))
    assert tensors[f"{q}.quant_bias"].dtype == torch.int32 and tensors[f"{q}.quant_bias"].shape == (n,)
    assert tensors[f"{q}.deq_scale"].dtype == torch.int64 and tensors[f"{q}.deq_scale"].shape == (n,)
    assert tensors[f"{q}.weight_scale"].shape == (n, 1) and tensors[f"{q}.weight_offset"].shape == (n, 1)
    deq = decode_scale(tensors[f"{q}.deq_scale"])
    assert torch.allclose(deq, tensors[f"{q}.input_scale"].float() * tensors[f"{q}.weight_scale"].reshape(-1))
    expected_bias = -tensors[f"{q}.weight"].to(torch.int64).sum(1) * int(tensors[f"{q}.input_offset"])
    assert torch.equal(tensors[f"{q}.quant_bias"].to(torch.int64), expected_bias)
    d = "model.layers.3.mlp.down_proj"  # W8A16
    assert desc[f"{d}.weight"] == "W8A16" and tensors[f"{d}.weight_scale"].shape == (576, 1)
    u = "model.layers.3.mlp.up_proj"  # W4A16, group 64
    assert desc[f"{u}.weight"] == "W4A16"
    assert tensors[f"{u}.weight"].min() >= -8 and tensors[f"{u}.weight"].max() <= 7
    assert tensors[f"{u}.weight_scale"].shape == (1536, 576 // 64)
    g = "model.layers.3.mlp.gate_proj"  # W8A8_DYNAMIC
    assert desc[f"{g}.weight"] == "W8A8_DYNAMIC"
    assert tensors[f"{g}.weight_scale"].dtype == torch.float32 and tensors[f"{g}.weight_scale"].shape == (1536, 1)
    assert not tensors[f"{g}.weight_offset"].any()
    # first matching pattern in dict order wins: "*down_proj" precedes "model.layers.1.*"
    assert desc["model.layers.1.mlp.down_proj.weight"] == "W8A16"
    assert desc["model.layers.1.self_attn.k_proj.weight"] == "FLOAT"
    assert desc["lm_head.weight"] == "FLOAT" and desc["model.norm.weight"] == "FLOAT"
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 30


def test_sharded_save_has_consistent_index_and_reloads(calibrated, smollm2_windows, tmp_path):
    cal = calibrated["w8a8_dynamic"]
    cal.save(str(tmp_path), part_file_size=0.05)
    index = json.loads((tmp_path / "quant_model_weight_w8a8_dynamic.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    assert shards[0] == f"quant_model_weight_w8a8_dynamic-00001-of-{len(shards):05d}.safetensors"
    total = 0
    for shard in shards:
        part = load_file(str(tmp_path / shard))
        assert {k for k, v in index["weight_map"].items() if v == shard} == set(part)
        total += sum(t.numel() * t.element_size() for t in part.values())
        assert os.path.getsize(tmp_path / shard) <= 0.05 * (1 << 30) * 1.1 or len(part) == 1
    assert index["metadata"]["total_size"] == total
    loaded = fxquant.load_ascend(load_smollm2()[0], tmp_path)
    ids = smollm2_windows[1][0][:, :64]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, use_cache=False).logits, cal.model(ids).logits)


def test_failed_save_leaves_no_partial_files_and_keeps_existing_folder(calibrated, tmp_path, monkeypatch):
    cal = calibrated["w8a16"]
    cal.save(str(tmp_path))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    calls = {"n": 0}
    real = fxquant.formats.safetensors_io.save_file

    def failing(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # second shard: write half a file, then die
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError("disk full (injected)")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(fxquant.formats.safetensors_io, "save_file", failing)
    with pytest.raises(OSError, match="injected"):
        calibrated["w8a8_dynamic"].save(str(tmp_path), part_file_size=0.05)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # nothing new under any name, old checkpoint intact


def test_lowering_pass_runs_the_ascend_ops(calibrated, smollm2_windows):
    cal = calibrated["w8a8"]
    lowered = PassManager([LowerToAscend()])(copy.deepcopy(cal.model))
    kinds = {type(m).__name__ for m in lowered.modules()}
    assert "AscendW8A8Linear" in kinds and "QLinear" not in kinds
    ids = smollm2_windows[1][0][:, :64]
    with torch.no_grad():
        assert torch.equal(lowered(ids).logits, cal.model(ids).logits)


def test_bad_save_type(calibrated, tmp_path):
    with pytest.raises(fxquant.ConfigError, match="unknown save_type.*valid: safe_tensor, ascendV1"):
        calibrated["w8a16"].save(str(tmp_path), save_type=["numpy"])


@pytest.mark.parametrize("ascend_rounding", [False, True])
def test_saving_onnx_rounded_static_layers_warns_that_the_reload_differs(smollm2, smollm2_graph, smollm2_windows, tmp_path,
                                                                         caplog, ascend_rounding):
    model, _ = smollm2
    calib = [[w[:, :64]] for w in smollm2_windows[0][:2]]
    q = fxquant.quantize(smollm2_graph, calib, "float", mix_cfg={"model.layers.0.mlp.*": "w8a8"}, progress=False,
                         options=fxquant.SchemeOptions(offset_in_rounding=ascend_rounding))
    assert float(q.get_submodule("model.layers.0.mlp.down_proj").input_quantizer.zero_point) != 0
    with caplog.at_level("WARNING", logger="fxquant.formats.ascend_checkpoint"):
        fxquant.save_ascend(q, model, tmp_path, default_scheme="w8a8")
    warned = [r.getMessage() for r in caplog.records if "round their inputs as ONNX does" in r.getMessage()]
    if ascend_rounding:
        assert not warned
    else:
        assert len(warned) == 1 and "3 layers (e.g. model.layers.0.mlp.gate_proj" in warned[0]
        assert "offset_in_rounding=True" in warned[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint_reloads_bit_for_bit(smollm2, smollm2_windows, tmp_path, dtype):
    """A bfloat16 / float16 model keeps its static input scales and weight-only scales in its own
    dtype on disk: the frozen layers compute with those rounded scales, and the weight-only reference
    dequantizes into the input's dtype, so the reload gives the in-process logits bit for bit."""
    small = truncated_smollm2(smollm2[0], 4, dtype)
    calib = [[w[:, :64]] for w in smollm2_windows[0][:2]]
    mix = {"*down_proj": "w8a16", "*up_proj": "w4a16", "*k_proj": "w8a8_dynamic"}
    cal = Calibrator(small, QuantConfig(mm_tensor=False, group_size=64), calib_data=calib, mix_cfg=mix)
    cal.run()
    layer = cal.model.get_submodule("model.layers.2.self_attn.q_proj")
    assert layer.scheme == "w8a8" and float(layer.input_quantizer.scale.to(dtype)) == float(layer.input_quantizer.scale)
    cal.save(str(tmp_path))
    loaded = fxquant.load_ascend(type(small)(small.config).to(dtype), tmp_path)
    ids = smollm2_windows[1][0][:, :48]
    with torch.no_grad():
        ref = cal.model(ids).logits
        out = loaded(input_ids=ids, use_cache=False).logits
    assert ref.dtype == dtype and torch.isfinite(ref).all()
    assert torch.equal(ref, out)
