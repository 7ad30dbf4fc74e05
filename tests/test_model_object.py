"""A quantized model as a Python object: torch.save / torch.load and copy.deepcopy give the same graph,
meta and outputs; `.to(dtype)` casts an installed model and is refused on an exported graph."""

import copy
import io

import pytest
import torch

import fxquant
from fxquant.capture import _export_capture
from fxquant.captured_module import CapturedGraphModule
from fxquant.errors import ConfigError
from fxquant.guards import CapturedInputError
from fxquant.quant_linear import QLinear

from models import ResNetStyle, truncated_smollm2


def _reloaded(module: torch.nn.Module) -> torch.nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _node_meta(gm: torch.fx.GraphModule, key: str) -> dict:
    return {n.name: n.meta[key] for n in gm.graph.nodes if key in n.meta}


def test_quantized_llm_pickles_with_its_graph(smollm2_graph, smollm2_windows):
    """An exported SmolLM2 graph with static, dynamic and 4-bit layers reloads bit for bit."""
    calib, held_out = smollm2_windows
    q = fxquant.quantize(smollm2_graph, [[w[:, :64]] for w in calib[:2]], scheme="w8a8",
                         mix_cfg={"*down_proj": "w4a16", "*o_proj": "w8a8_dynamic"},
                         options=fxquant.SchemeOptions(group_size=64), progress=False)
    ids = held_out[0][:, :96]
    expected = q(input_ids=ids)
    for loaded in (_reloaded(q), copy.deepcopy(q)):
        assert isinstance(loaded, CapturedGraphModule)
        out = loaded(input_ids=ids)
        assert type(out) is type(expected)  # CausalLMOutputWithPast, rebuilt by the signature codegen
        assert torch.equal(out.logits, expected.logits)
        assert loaded.code == q.code
        assert loaded.meta["fxquant_decisions"] == q.meta["fxquant_decisions"]
        kernels = _node_meta(q, "fxquant_kernel")
        assert len(kernels) == 210 and _node_meta(loaded, "fxquant_kernel") == kernels
        assert loaded.config is q.config or loaded.config.to_dict() == q.config.to_dict()
    # the captured graph's input guards come back too
    with pytest.raises(CapturedInputError, match="use_cache"):
        _reloaded(q)(input_ids=ids, use_cache=True)


def test_quantized_cnn_pickles_with_its_graph(digits):
    xtr = digits[0]
    torch.manual_seed(0)
    model = ResNetStyle().eval()
    q = fxquant.quantize(model, [[xtr[i:i + 32]] for i in range(0, 128, 32)], scheme="w8a8", progress=False)
    assert q.meta["fxquant_capture"] == "symbolic"
    loaded = _reloaded(q)
    assert torch.equal(loaded(xtr[:64]), q(xtr[:64]))
    assert _node_meta(loaded, "fxquant_kernel") == _node_meta(q, "fxquant_kernel")


class _Heads(torch.nn.Module):
    """Splits the last dimension into heads of 8: torch.export assumes it divides by 8."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.proj(x.view(x.shape[0], -1, 8)) + bias[:, None, :4]


def test_shape_conditions_of_export_are_checked_and_pickled():
    model = _Heads().eval()
    gm = _export_capture(model, (torch.randn(3, 24), torch.randn(3, 5)), {})
    for graph in (gm, _reloaded(gm)):
        x, bias = torch.randn(2, 16), torch.randn(2, 5)
        assert torch.equal(graph(x, bias), model(x, bias))  # other sizes that meet the conditions
        with pytest.raises(CapturedInputError, match=r"% \(8\*x.size\(\)\[0\]\)\) == 0.*\(2, 12\)"):
            graph(torch.randn(2, 12), torch.randn(2, 5))
        with pytest.raises(CapturedInputError, match=r"bias.size\(\)\[0\] == x.size\(\)\[0\]|x.size\(\)\[0\] == "
                                                     r"bias.size\(\)\[0\]"):
            graph(torch.randn(2, 16), torch.randn(3, 5))
    # a loaded graph compiles before any eager call: the conditions were compiled when it was loaded
    compiled = torch.compile(_reloaded(gm), backend="eager", fullgraph=True)
    x, bias = torch.randn(4, 32), torch.randn(4, 5)
    assert torch.equal(compiled(x, bias), model(x, bias))


def test_installed_model_casts_to_bfloat16_and_an_exported_graph_refuses(smollm2, smollm2_windows, smollm2_graph,
                                                                          tmp_path):
    """Every scheme's layers compute in the dtype the model is cast to, prefill and decode rows. The
    installed model pickles, and refuses Hugging Face's save_pretrained, whose from_pretrained would
    load its quantized layers at random."""
    calib, held_out = smollm2_windows
    model = truncated_smollm2(smollm2[0], layers=4)
    fxquant.quantize(model, [[w[:, :64]] for w in calib[:2]], scheme="w8a8", progress=False, inplace=True,
                     mix_cfg={"*.1.*": "w8a16", "*.2.*": "w4a16", "*.3.*": "w8a8_dynamic"},
                     options=fxquant.SchemeOptions(group_size=64))
    assert {m.scheme for m in model.modules() if isinstance(m, QLinear)} == {"w8a8", "w8a16", "w4a16",
                                                                            "w8a8_dynamic"}
    ids = held_out[0][:, :64]
    expected = model(input_ids=ids).logits
    for m in (model, _reloaded(model)):
        assert torch.equal(m(input_ids=ids).logits, expected)
        with pytest.raises(ConfigError, match="save_pretrained would write.*torch.save"):
            m.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())
    cast = copy.deepcopy(model).to(torch.bfloat16)
    for rows in (64, 1):  # the prefill kernels and the decode rows
        logits = cast(input_ids=ids[:, :rows]).logits
        assert logits.dtype == torch.bfloat16
        agree = (logits.float().argmax(-1) == expected[:, :rows].argmax(-1)).float().mean()
        cosine = torch.nn.functional.cosine_similarity(logits.float(), expected[:, :rows], dim=-1).min()
        assert agree >= 0.9 and cosine > 0.99, (rows, float(agree), float(cosine))
    with pytest.raises(ConfigError, match="captured by torch.export in torch.float32.*--dtype"):
        smollm2_graph.to(torch.bfloat16)
    assert next(smollm2_graph.parameters()).dtype == torch.float32  # refused before anything changed
