"""HadamardRotation (QuaRot): orthogonal, float-preserving, exportable, and refused where it would
change what the model computes."""

import copy
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import fxquant
from fxquant.capture import capture
from fxquant.formats.onnx_export import to_onnx_model, write_onnx
from fxquant.formats.safetensors_io import read_safetensors_folder
from fxquant.hadamard import HadamardTransform, KroneckerRotation, hadamard_matrix, random_rotation
from fxquant.passes import HadamardRotation, lower_to_qdq

from models import RMSNorm, TinyLlama, truncated_smollm2


@pytest.mark.parametrize("n", [12, 20, 28, 36, 48, 64, 72, 576, 1536])
def test_hadamard_matrices_of_transformer_widths(n):
    h = hadamard_matrix(n)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    q = random_rotation(n, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    t = HadamardTransform(n, seed=3)
    x = torch.randn(3, 5, n)
    assert torch.allclose(t(x).double(), x.double() @ t.matrix(), atol=1e-5)


def test_orders_without_a_hadamard_matrix_rotate_with_a_random_orthogonal_one():
    assert hadamard_matrix(9) is None
    q = random_rotation(9)
    assert torch.allclose(q @ q.T, torch.eye(9, dtype=torch.float64), atol=1e-12)
    with pytest.raises(ValueError, match="no Hadamard matrix of order 9"):
        HadamardTransform(9)
    with pytest.raises(ValueError, match="factor M .* not a square orthogonal matrix"):
        KroneckerRotation(torch.randn(3, 3), torch.eye(2))


def _tiny(outlier=True, **kw):
    torch.manual_seed(0)
    model = TinyLlama(**kw).eval()
    if outlier:
        with torch.no_grad():
            for b in model.blocks:  # outlier channels in the normed inputs of q/k/v and gate/up, as in real LLMs
                b.n1.weight[7] = b.n2.weight[11] = 40.0
    data = [[torch.randint(0, 64, (2, 16))] for _ in range(4)]
    return model, data


def test_rotation_keeps_the_float_model_and_folds_every_transform():
    model, data = _tiny()
    twin = copy.deepcopy(model)
    gm = capture(model, tuple(data[0]), {})
    gm = HadamardRotation(data, online=["*down"])(gm)
    with torch.no_grad():
        ref, out = model(data[1][0]), gm(data[1][0])
    assert float((out - ref).norm() / ref.norm()) <= 1e-5
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    folded = {n.target: n.meta["fxquant"]["rotation"] for n in gm.graph.nodes if "rotation" in n.meta.get("fxquant", {})}
    assert folded["blocks.0.q"] == ["stream_in"] and folded["head"] == ["stream_in"]
    assert folded["blocks.0.o"] == ["stream_out", "head_outputs"]
    assert folded["blocks.1.v"] == ["stream_in", "head_values"]
    assert folded["blocks.1.down"] == ["stream_out", "online_input"]
    assert gm.meta["fxquant_rotation"]["online"] == ["blocks.0.down", "blocks.1.down"]
    assert torch.equal(gm.get_submodule("blocks.0.n1").weight, torch.ones(48))  # folded into q / k / v
    assert gm.get_submodule("embed").weight.data_ptr() != gm.get_submodule("head").weight.data_ptr()  # untied


def test_rotation_lowers_static_w8a8_error_and_exports_to_onnxruntime(tmp_path):
    model, data = _tiny()
    x = data[1][0]
    with torch.no_grad():
        ref = model(x)
    errors = {}
    for rotate in (False, True):
        q = fxquant.quantize(model, data, "w8a8", rotation=HadamardRotation(data, online=["*down"]) if rotate else False,
                             progress=False)
        with torch.no_grad():
            errors[rotate] = float((q(x) - ref).norm() / ref.norm())
    assert errors[True] < 0.6 * errors[False], errors
    proto = to_onnx_model(lower_to_qdq(q), (x,), {}, ["ids"])
    path = write_onnx(proto, tmp_path / "rotated.onnx")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # QDQ as written, no fused kernels
    got = ort.InferenceSession(str(path), opts).run(None, {"ids": x.numpy()})[0]
    with torch.no_grad():
        want = q(x).numpy()
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


def test_rotation_refuses_graphs_it_would_change_and_says_why():
    model, data = _tiny(norm=lambda d: nn.LayerNorm(d))
    with pytest.raises(fxquant.ConfigError, match="LayerNorm, whose mean subtraction does not commute"):
        fxquant.quantize(model, data, "w8a8", rotation=True, progress=False)

    class NoEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.n, self.lin = RMSNorm(8), nn.Linear(8, 8)

        def forward(self, x):
            return x + self.lin(self.n(x))

    with pytest.raises(fxquant.ConfigError, match="needs the embedding lookup"):
        fxquant.quantize(NoEmbedding(), [[torch.randn(2, 8)]], "w8a8", rotation=True, progress=False)
    model, data = _tiny()
    with pytest.raises(fxquant.ConfigError, match="match no Linear layer"):
        fxquant.quantize(model, data, "w8a8", rotation=HadamardRotation(data, online=["*nothing"]), progress=False)


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8_dynamic"])
def test_online_rotation_installs_into_the_model_and_reloads_from_the_ascend_checkpoint(tmp_path, scheme):
    model, data = _tiny()
    fresh = copy.deepcopy(model)
    kept = fxquant.quantize(copy.deepcopy(model), data, scheme, rotation=HadamardRotation(data, online=["*down"]),
                            progress=False)
    fxquant.save_ascend(kept, model, tmp_path / "ckpt", default_scheme=scheme)
    desc = json.loads((tmp_path / "ckpt" / f"quant_model_description_{scheme}.json").read_text())
    assert desc["metadata"]["quarot"]["kronecker_rotation"]["layers"] == ["blocks.0.down.", "blocks.1.down."]
    assert desc["metadata"]["quarot"]["heads_rotation"]["layers"] == []
    saved = read_safetensors_folder(tmp_path / "ckpt")
    m, n = saved["blocks.0.down.kronecker_rotation_m"], saved["blocks.0.down.kronecker_rotation_n"]
    assert m.dtype == n.dtype == torch.float32 and m.shape[0] * n.shape[0] == 96
    assert "blocks.0.down.kronecker_rotation_m" not in desc  # msModelSlim lists them in metadata only
    x = data[2][0]
    t = kept.get_submodule("blocks.0.down_hadamard")
    h = torch.randn(2, 3, 96)
    want = (m.T @ h.reshape(2, 3, m.shape[0], n.shape[0]) @ n).reshape(2, 3, 96)  # msModelSlim's M^T X N
    assert torch.allclose(t(h), want, atol=1e-5)
    loaded = fxquant.load_ascend(fresh, tmp_path / "ckpt")
    assert type(loaded.blocks[0].down).__name__ == "RotatedInput"
    out = fxquant.quantize(model, data, scheme, rotation=HadamardRotation(data, online=["*down"]),
                           progress=False, inplace=True)
    assert type(out.blocks[0].down).__name__ == "RotatedInput"
    with torch.no_grad():
        ref = kept(x)
        assert torch.allclose(out(x), ref, atol=1e-5, rtol=1e-5)
        assert torch.allclose(loaded(x), ref, atol=1e-4, rtol=1e-4)


def test_ascend_loader_refuses_a_rotation_it_cannot_run(tmp_path):
    model, data = _tiny()
    kept = fxquant.quantize(copy.deepcopy(model), data, "w8a8", rotation=HadamardRotation(data, online=["*down"]),
                            progress=False)
    fxquant.save_ascend(kept, model, tmp_path, default_scheme="w8a8", save_type=["ascendV1"])
    path = tmp_path / "quant_model_description.json"
    desc = json.loads(path.read_text())
    desc["metadata"]["quarot"]["heads_rotation"]["layers"] = ["blocks.0.o."]
    path.write_text(json.dumps(desc))
    with pytest.raises(fxquant.FxquantError, match="heads_rotation"):
        fxquant.load_ascend(copy.deepcopy(model), tmp_path)
    desc["metadata"]["quarot"]["heads_rotation"]["layers"] = []
    desc["metadata"]["quarot"]["kronecker_rotation"]["layers"].append("blocks.0.up.")
    path.write_text(json.dumps(desc))
    with pytest.raises(fxquant.FxquantError, match="blocks.0.up.kronecker_rotation_m is not saved"):
        fxquant.load_ascend(copy.deepcopy(model), tmp_path)


def test_smollm2_rotation_keeps_fp32_logits_and_spreads_outliers(smollm2, smollm2_windows):
    model, _ = smollm2
    calib, evals = smollm2_windows
    gm = capture(model, (calib[0],), {})
    stats = {}

    def outlier_ratio(name):
        def hook(mod, args):
            x = args[0].detach()
            stats[name] = float(x.abs().max() / x.std())
        return hook

    names = [f"model.layers.{i}.self_attn.q_proj" for i in (0, 10, 20)]
    for when in ("before", "after"):
        handles = [gm.get_submodule(n).register_forward_pre_hook(outlier_ratio(f"{when} {n}")) for n in names]
        with torch.no_grad():
            out = gm(evals[0])
        for h in handles:
            h.remove()
        if when == "before":
            ref = out.logits
            gm = HadamardRotation([[calib[0]]])(gm)
    assert float((out.logits - ref).norm() / ref.norm()) <= 1e-4
    for n in names:  # q/k/v inputs: outlier channels spread over all 576
        assert stats[f"after {n}"] < 0.5 * stats[f"before {n}"], stats
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the user's model is untouched


def test_rotated_static_checkpoint_reloads_and_reproduces_logits(smollm2_windows, tmp_path):
    """A quarot + w8a8 session saved in the Ascend format: the rotated embedding (untied from the
    head), ones-norms and the down projections' online rotations (kronecker_rotation_m / _n) reload
    into a fresh SmolLM2 and reproduce the quantized logits."""
    from fxquant import session as s
    from fxquant.real_models import load_smollm2

    calib, evals = smollm2_windows
    model, _ = load_smollm2()
    config = s.SessionConfig(processor_cfg_map={
        "quarot": s.QuaRotProcessorConfig(online=["*down_proj"]),
        "w8a8": s.W8A8ProcessorConfig(cfg=s.W8A8QuantConfig(), disable_names=[]),
        "save": s.SaveProcessorConfig(output_path=str(tmp_path)),
    }, calib_data=[[w] for w in calib[:2]])
    q = s.run(model, config, progress=False, inplace=True)
    assert q.model.embed_tokens.weight is not q.lm_head.weight
    fresh, _ = load_smollm2()
    loaded = fxquant.load_ascend(fresh, tmp_path)
    assert loaded.model.embed_tokens.weight.data_ptr() != loaded.lm_head.weight.data_ptr()
    assert type(loaded.model.layers[7].mlp.down_proj).__name__ == "RotatedInput"
    with torch.no_grad():
        want = q(input_ids=evals[0], use_cache=False).logits
        got = loaded(input_ids=evals[0], use_cache=False).logits
    assert (want.argmax(-1) == got.argmax(-1)).float().mean() >= 0.999
    assert (want - got).abs().max() <= 1e-3


def test_quarot_processor_validates_with_the_session():
    from fxquant import session as s

    cfg = s.session_from_dict({"processors": {"quarot": {"online": ["*down_proj"]}, "w8a8_dynamic": {"cfg": {}, "disable_names": []}}})
    assert cfg.processor_cfg_map["quarot"].online == ["*down_proj"]
    with pytest.raises(fxquant.ConfigError, match="quarot.*seeds"):
        s.session_from_dict({"processors": {"quarot": {"seeds": 1}, "w8a8": {"cfg": {}, "disable_names": []}}})


@pytest.mark.parametrize("kw", [dict(scheme="w8a8", smooth_alpha=0.5), dict(scheme="w8a8_dynamic", rotation=True)],
                         ids=["smoothing", "rotation"])
def test_bfloat16_model_smooths_and_rotates_in_its_dtype(smollm2, smollm2_windows, kw):
    """Folds into a bfloat16 model keep its dtype (a float32 scale divided into a bf16 norm weight
    made float32 weights that the next Linear refused), and the float-output check of rotation
    allows bf16's rounding of the rotated weights (about 1e-2 relative on SmolLM2's 30 layers)."""
    small = truncated_smollm2(smollm2[0], 4, torch.bfloat16)
    calib, evals = smollm2_windows
    q = fxquant.quantize(small, [[w[:, :64]] for w in calib[:2]], progress=False, **kw)
    assert {t.dtype for t in q.parameters() if t.is_floating_point()} == {torch.bfloat16}
    ids = evals[0]
    with torch.no_grad():
        ref, out = small(input_ids=ids, use_cache=False).logits, q(ids).logits
    assert out.dtype == torch.bfloat16
    assert float((out.argmax(-1) == ref.argmax(-1)).float().mean()) > 0.7  # a wrong fold: near 0
