import pytest
import torch
from torch import nn

import fxquant
from fxquant.errors import ConfigError
from fxquant.passes import ResolveSchemes

from seed_000 import SEED_MIX_CFG


class Layer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.down_proj = nn.Linear(d, d)

    def forward(self, x):
        return self.mlp.down_proj(self.self_attn.q_proj(x))


class TinyLlamaNames(nn.Module):
    """Layer names as in SmolLM2: model.layers.N.{self_attn.q_proj, mlp.down_proj}, lm_head."""

    def __init__(self, n=8, d=8):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(Layer(d) for _ in range(n))
        self.lm_head = nn.Linear(d, d)

    def forward(self, x):
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(x)


def _resolve(**kw):
    gm = fxquant.capture(TinyLlamaNames(), (torch.randn(2, 8),))
    p = ResolveSchemes(**kw)
    p(gm)
    return p.decisions


def test_seed_000_priority_example():
    d = _resolve(default="w8a8", mix_cfg=SEED_MIX_CFG, disable_names=["model.layers.5.mlp.down_proj"])
    scheme = {k: v[0] for k, v in d.items()}
    assert scheme["model.layers.0.mlp.down_proj"] == "w8a16"
    assert scheme["model.layers.1.mlp.down_proj"] == "w8a16"
    assert scheme["model.layers.2.mlp.down_proj"] == "w8a8_dynamic"
    assert scheme["model.layers.3.mlp.down_proj"] == "w8a16"
    assert scheme["model.layers.4.mlp.down_proj"] == "w8a8"
    assert scheme["model.layers.5.mlp.down_proj"] == "float"
    assert all(scheme[f"model.layers.{i}.self_attn.q_proj"] == "float" for i in range(8))
    assert scheme["lm_head"] == "float"
    assert d["model.layers.0.mlp.down_proj"][1] == "mix_cfg exact name"
    assert d["model.layers.3.mlp.down_proj"][1] == "mix_cfg pattern 'model.layers.[!456789].mlp.down_proj'"
    assert d["model.layers.5.mlp.down_proj"][1] == "disable_names"
    assert "disable_last_linear" in d["lm_head"][1]


def test_rollback_beats_mix_cfg_and_reason_in_node_meta():
    gm = fxquant.capture(TinyLlamaNames(), (torch.randn(2, 8),))
    ResolveSchemes(mix_cfg={"model.layers.2.mlp.down_proj": "w8a16"},
                   rollback_names=["model.layers.2.mlp.down_proj"])(gm)
    node = next(n for n in gm.graph.nodes if n.target == "model.layers.2.mlp.down_proj")
    assert node.meta["fxquant"] == {"scheme": "float", "reason": "automatic rollback (disable_level)"}


def test_disabled_types_and_submodules():
    d = _resolve(disabled_types=(nn.Linear,))
    assert {v[0] for v in d.values()} == {"float"}
    d = _resolve(disabled_submodules=["model.layers.1*"])
    assert d["model.layers.1.mlp.down_proj"][0] == "float"
    assert d["model.layers.2.mlp.down_proj"][0] == "w8a8"


def test_unknown_scheme_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown quantization scheme 'w3a8'; valid: float, w8a8"):
        ResolveSchemes(default="w3a8")
    with pytest.raises(ConfigError, match=r"mix_cfg\['\*down\*'\].*valid:"):
        ResolveSchemes(mix_cfg={"*down*": "int4"})
    with pytest.raises(ConfigError, match="unknown quantization scheme"):
        fxquant.quantize(TinyLlamaNames(), [[torch.randn(2, 8)]], scheme="int8")


def test_disable_names_must_name_a_layer():
    with pytest.raises(ConfigError, match="names no quantizable layer.*did you mean model.layers.1.mlp.down_proj"):
        _resolve(disable_names=["model.layers.1.mlp.down_prj"])
