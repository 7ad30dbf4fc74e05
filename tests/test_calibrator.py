"""fxquant.Calibrator / QuantConfig (seed 000) on SmolLM2."""

import pytest
import torch

import fxquant
from fxquant import Calibrator, QuantConfig
from fxquant.errors import CalibrationDataError, ConfigError

from seed_000 import SEED_MIX_CFG


@pytest.fixture(scope="module")
def calib(smollm2_windows):
    return [[w[:, :48]] for w in smollm2_windows[0][:2]]


def test_seed_000_worked_example_on_smollm2(smollm2, calib):
    model, _ = smollm2
    cfg = QuantConfig(w_bit=8, a_bit=8, disable_names=["model.layers.5.mlp.down_proj"], mm_tensor=False)
    cal = Calibrator(model, cfg, calib_data=calib, disable_level="L1", mix_cfg=SEED_MIX_CFG)
    cal.run()
    decisions = cal.model.meta["fxquant_decisions"]
    rolled = [k for k, (_, why) in decisions.items() if "automatic rollback" in why]
    assert len(rolled) == 1
    assert rolled[0] == max(cal.sensitivity, key=cal.sensitivity.get)
    expected = {
        "model.layers.0.mlp.down_proj": "w8a16",
        "model.layers.1.mlp.down_proj": "w8a16",
        "model.layers.2.mlp.down_proj": "w8a8_dynamic",
        "model.layers.3.mlp.down_proj": "w8a16",
        "model.layers.4.mlp.down_proj": "w8a8",
        "model.layers.5.mlp.down_proj": "float",
        **{f"model.layers.{i}.self_attn.q_proj": "float" for i in range(30)},
        "lm_head": "float",
    }
    for name, scheme in expected.items():
        if name not in rolled:
            assert decisions[name][0] == scheme, (name, decisions[name])
    assert decisions["model.layers.5.mlp.down_proj"][1] == "disable_names"
    # the quantized modules follow the decisions
    assert isinstance(cal.model.get_submodule("model.layers.3.mlp.down_proj"), fxquant.QLinear)
    assert cal.model.get_submodule("model.layers.3.mlp.down_proj").scheme == "w8a16"
    assert type(cal.model.get_submodule("model.layers.0.self_attn.q_proj")) is torch.nn.Linear
    assert type(cal.model.get_submodule(rolled[0])) is torch.nn.Linear


def test_data_free_weight_only_and_dynamic(smollm2, smollm2_graph, smollm2_windows):
    model, _ = smollm2
    ids = smollm2_windows[1][0][:, :64]
    ref = model(input_ids=ids, use_cache=False).logits
    # the model object (an example input synthesized for its capture) and an already captured graph
    for source, cfg in ((model, QuantConfig(a_bit=16, mm_tensor=False)),
                        (smollm2_graph, QuantConfig(is_dynamic=True, mm_tensor=False))):
        cal = Calibrator(source, cfg)
        cal.run()
        with torch.no_grad():
            out = cal.model(ids).logits
        assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
    with pytest.raises(CalibrationDataError, match="scheme 'w8a8' quantizes activations statically.*pass calib_data"):
        Calibrator(model, QuantConfig())  # refused before capture


def test_all_tensors_supply_a_layers_calibration_inputs(smollm2_graph, calib):
    model = smollm2_graph
    name = "model.layers.2.mlp.down_proj"
    supplied = torch.randn(1, 48, 1536) * 3.0
    cal = Calibrator(model, QuantConfig(mm_tensor=False, pr=0.0), calib_data=calib, all_tensors={name: supplied})
    cal.run()
    q = cal.model.get_submodule(name).input_quantizer
    lo, hi = float(supplied.min()), float(supplied.max())
    assert float(q.scale) == pytest.approx((hi - lo) / 255, rel=1e-5)
    with pytest.raises(ConfigError, match="all_tensors names 'model.layers.2.mlp.down_prj'.*did you mean"):
        Calibrator(model, QuantConfig(), calib_data=calib,
                   all_tensors={"model.layers.2.mlp.down_prj": supplied}).run()


@pytest.mark.parametrize("level,match", [
    ("L-1", "disable_level must be 'L<n>'"),
    ("Lx", "disable_level must be 'L<n>'"),
    (3, "disable_level must be 'L<n>'"),
])
def test_malformed_disable_level(smollm2, level, match):
    with pytest.raises(ConfigError, match=match):
        Calibrator(smollm2[0], QuantConfig(a_bit=16), disable_level=level)


def test_disable_level_larger_than_layer_count(smollm2_graph):
    cal = Calibrator(smollm2_graph, QuantConfig(a_bit=16), disable_level="L500")
    with pytest.raises(ConfigError, match="roll back 500 layers but the model has 210 quantized layers"):
        cal.run()


def test_config_errors(smollm2):
    with pytest.raises(ConfigError, match="w_bit=3 is not supported; valid: 4, 8"):
        QuantConfig(w_bit=3)
    with pytest.raises(ConfigError, match="is not a supported combination; valid:"):
        QuantConfig(w_bit=4, a_bit=8)
    with pytest.raises(ConfigError, match="act_method=7 is not supported"):
        QuantConfig(act_method=7)
    with pytest.raises(ConfigError, match="pr must be in"):
        QuantConfig(pr=1.5)
    with pytest.raises(ConfigError, match="unknown w_method 'hqq'; valid: minmax, gptq"):
        QuantConfig(w_method="hqq")
    assert QuantConfig(w_bit=4, a_bit=16, w_method="gptq").w_method == "gptq"  # per-group GPTQ
    with pytest.raises(ConfigError, match=r"mix_cfg\['\*down\*'\]: unknown quantization scheme 'int4'; valid:"):
        Calibrator(smollm2[0], QuantConfig(), mix_cfg={"*down*": "int4"})
    try:
        import torch_npu  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="needs torch_npu"):
            Calibrator(smollm2[0], QuantConfig(dev_type="npu"))
