"""4-bit weights (w4a16, per-group): GPTQ rounding and AWQ scale search on SmolLM2's real weights."""

import pytest
import torch

import fxquant
from fxquant.formats.ascend_checkpoint import load_ascend, read_description, save_ascend
from fxquant.ir import fxq_meta
from fxquant.keep_acc import GPTQWeights
from fxquant.keep_acc.layer_problem import LayerProblem
from fxquant.kernels.weight_only import gemv_block
from fxquant.passes import AWQScale
from fxquant.real_models import perplexity
from fxquant.schemes import SchemeOptions

LAYERS = {"model.layers.[0-3].*": "w4a16"}  # 28 Linear layers: enough to move perplexity, quick to solve
OPTIONS = SchemeOptions(group_size=64)


@pytest.fixture(scope="module")
def w4_models(smollm2_graph, smollm2_windows):
    calib = [[w] for w in smollm2_windows[0]]

    def quantize(**kw):
        return fxquant.quantize(smollm2_graph, calib, "float", mix_cfg=LAYERS, options=OPTIONS, progress=False, **kw)

    return {"rtn": quantize(), "gptq": quantize(weight_optimizers=[GPTQWeights()]),
            "awq": quantize(suppression=AWQScale(calib))}


def test_per_group_gptq_codes_keep_the_group_grid_and_lower_the_error(w4_models, smollm2_windows):
    rtn, gptq = w4_models["rtn"], w4_models["gptq"]
    fixed = [n for n, m in gptq.named_modules() if getattr(m, "codes_fixed", False)]
    assert len(fixed) >= 20  # kept where it lowered the layer's output error (28 layers)
    name = "model.layers.2.mlp.down_proj"
    q, r = gptq.get_submodule(name), rtn.get_submodule(name)
    # packed two per byte, in the GEMV layout: 8 rows' 4-byte words side by side
    assert q.codes_blocked and q.weight_codes.dtype == torch.uint8 and q.weight_codes.shape == (576 // gemv_block(), 192, 4 * gemv_block())
    codes = q.weight_int8()
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7
    assert torch.equal(q.weight_quantizer.scale, r.weight_quantizer.scale)  # static groups: same qparams
    assert not torch.equal(codes, r.weight_int8())
    problem = LayerProblem(q, torch.empty(0, 1536), torch.empty(0, 576))
    assert torch.allclose(problem.dequantized_weight(codes.float()), q.weight.detach(), atol=1e-6)


def test_per_group_gptq_and_awq_lower_perplexity(w4_models, smollm2, smollm2_windows):
    evals = smollm2_windows[1]
    base = perplexity(smollm2[0], evals)
    cost = {k: perplexity(m, evals) / base - 1 for k, m in w4_models.items()}
    assert cost["rtn"] > 0.005  # 4-bit weights in 4 layers cost something measurable
    assert cost["gptq"] < cost["rtn"]
    assert cost["awq"] < cost["rtn"]
    smoothed = [n.target for n in w4_models["awq"].graph.nodes if fxq_meta(n).get("smooth")]
    assert len(smoothed) >= 20  # q/k/v, gate/up (norm folds), down_proj (product fold) of 4 layers


def test_per_group_gptq_codes_reload_bit_exact_from_the_ascend_checkpoint(w4_models, smollm2, smollm2_windows,
                                                                            tmp_path):
    model, _ = smollm2
    gptq = w4_models["gptq"]
    save_ascend(gptq, model, tmp_path, "w4a16")
    kinds = read_description(tmp_path)
    assert kinds["model.layers.2.mlp.down_proj.weight"] == "W4A16"
    reloaded = load_ascend(type(model)(model.config), tmp_path)
    for name, m in gptq.named_modules():
        if getattr(m, "codes_fixed", False):
            assert torch.equal(reloaded.get_submodule(name).weight_codes(), m.weight_int8()), name  # int4 in int8
    x = smollm2_windows[1][0][:, :64]
    with torch.no_grad():
        assert torch.equal(reloaded(x, use_cache=False).logits, gptq(x).logits)
