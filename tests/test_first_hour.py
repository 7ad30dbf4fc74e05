"""What a new user meets in the first hour: defaults that work, no silent wrong results, and a
clear error (naming the problem and the valid choices) for every bad input."""

from __future__ import annotations

import json
import threading

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import fxquant
from fxquant import Calibrator, ConfigError, QuantConfig, SchemeOptions, load_ascend
from fxquant.errors import CalibrationDataError, CaptureError, FxquantError
from fxquant.quant_opr import QuantOpr

from digits import accuracy, train
from models import ResNetStyle


class Mlp(nn.Module):
    """Digits classifier on flattened 8x8 images: x [b, 1, 8, 8] -> logits [b, 10]."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 48), nn.Linear(48, 32), nn.Linear(32, 10)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(self.drop(torch.relu(self.fc2(h))))


class SharedLayer(nn.Module):
    """One Linear called twice, on inputs of very different ranges: x [b, 16] -> [b, 16]."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.shared, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.shared(x)                        # |x| ~ 1
        b = self.shared(40.0 * self.pre(x))       # inputs ~40x wider
        return self.head(a + b)


@pytest.fixture(scope="module")
def mlp(digits):
    torch.manual_seed(0)
    return train(Mlp(), digits[0], digits[1])


@pytest.fixture(scope="module")
def resnet(digits):
    torch.manual_seed(0)
    return train(ResNetStyle(), digits[0], digits[1], epochs=4)


def _calib(digits, n=256, batch=64):
    return [[digits[0][i:i + batch]] for i in range(0, n, batch)]


def test_default_config_exports_an_mlp_to_onnx(mlp, digits, tmp_path):
    """Item 5: per-tensor weight scales (mm_tensor=True, the default) on every Linear export."""
    cal = Calibrator(mlp, QuantConfig(), calib_data=_calib(digits))
    cal.run()
    assert sum(isinstance(m, QuantOpr) for m in cal.model.modules()) == 2  # the last layer stays float
    path = cal.export_quant_onnx("mlp", tmp_path, ["x"])
    x = digits[2][:128]
    with torch.no_grad():
        ref = cal.model(x).numpy()
    # onnxruntime's default optimizations fuse QDQ into QGemm, whose u8 x s8 kernel on an AVX2-only
    # CPU saturates 16-bit pair sums: there only the predictions agree. The QDQ graph as written
    # (optimizations off) computes the model's arithmetic on every CPU.
    fused = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert (fused.run(None, {"x": x.numpy()})[0].argmax(1) == ref.argmax(1)).mean() >= 0.99
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    as_written = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    out = as_written.run(None, {"x": x.numpy()})[0]
    assert np.abs(out - ref).max() <= (ref.max() - ref.min()) / 255


@pytest.mark.parametrize("make", [
    lambda: QuantConfig(act_method="top_0"),
    lambda: QuantConfig(act_method="minmx"),
    lambda: SchemeOptions(act_method="minmx"),
    lambda: SchemeOptions(act_method="sigma", act_observer_kwargs=(("k", -1.0),)),
    lambda: QuantConfig(act_method=0, sigma=-3),
])
def test_invalid_observer_settings_fail_at_configuration(make):
    """Item 6: wrong observer settings are errors when configured, naming the valid values."""
    with pytest.raises(ConfigError, match="valid|needs|must be"):
        make()


def test_a_model_with_no_quantized_layer_is_an_error(mlp, digits):
    with pytest.raises(ConfigError, match=r"no layer was quantized \(.*disable_names"):
        fxquant.quantize(mlp, _calib(digits, 64), "w8a8", disable_names=["fc1", "fc2"], progress=False)


def test_every_call_site_of_a_shared_module_is_observed():
    """Item 7: one observer over all calls of a module, so its range covers every call site."""
    torch.manual_seed(0)
    model = SharedLayer().eval()
    calib = [[torch.randn(32, 16)] for _ in range(4)]
    q = fxquant.quantize(model, calib, "w8a8", disable_last_layer=False, progress=False)
    x = torch.randn(256, 16)
    with torch.no_grad():
        ref, out = model(x), q(x)
        # the same layer with the input range of the wide call site only
        wide = 40.0 * model.pre(torch.cat([c[0] for c in calib]))
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 0.05, rel  # the last call only: 0.57
    scale = float(q.shared.input_quantizer.scale)
    assert scale >= float(wide.abs().max()) / 255 * 0.99


def test_batch_dimension_stays_dynamic_after_batch_one_calibration(smollm2, smollm2_windows):
    """Item 8: the README's template (batch-1 samples) gives a model that takes any batch."""
    model, _ = smollm2
    calib, _ = smollm2_windows
    q = fxquant.quantize(model, [[w[:, :32]] for w in calib[:2]], "w8a8_dynamic", progress=False)
    x = torch.cat([calib[0][:, :32], calib[1][:, :32], calib[2][:, :32]])
    with torch.no_grad():
        batched = q(input_ids=x, use_cache=False).logits
        single = q(input_ids=x[1:2], use_cache=False).logits
    assert batched.shape[0] == 3
    assert torch.allclose(batched[1:2], single, atol=1e-3)


def test_samples_of_different_batch_sizes_calibrate(mlp, digits):
    calib = [[digits[0][:1]], [digits[0][1:9]], [digits[0][9:41]]]
    q = fxquant.quantize(mlp, calib, "w8a8", progress=False)
    assert q(digits[2][:5]).shape == (5, 10)


def test_train_mode_model_calibrates_in_eval_and_keeps_its_mode(digits):
    """Item 9: dropout is off during calibration and in the returned model; the user's model
    comes back in the mode it had."""
    torch.manual_seed(0)
    model = train(Mlp(), digits[0], digits[1], epochs=2).train()
    q = fxquant.quantize(model, _calib(digits, 128), "w8a8", progress=False)
    assert model.training and not q.training
    x = digits[2][:64]
    with torch.no_grad():
        assert torch.equal(q(x), q(x))


def test_quantizing_a_quantized_model_is_refused(mlp, digits):
    """Item 10: no silent recalibration in place."""
    q = fxquant.quantize(mlp, _calib(digits, 64), "w8a8", progress=False)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    with pytest.raises(ConfigError, match="already quantized"):
        fxquant.quantize(q, _calib(digits, 64), "w8a16", progress=False)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def test_quantizing_a_captured_graph_leaves_it_float(mlp, digits):
    gm = fxquant.capture(mlp, (digits[0][:4],))
    fxquant.quantize(gm, _calib(digits, 64), "w8a8", progress=False)
    assert not any(isinstance(m, QuantOpr) for m in gm.modules())


def test_sigma_alone_chooses_sigma_statistics():
    """Item 11: seed 004 passes sigma=25 without act_method; sigma=0 is min-max."""
    assert QuantConfig(sigma=25).options.act_method == "sigma"
    assert dict(QuantConfig(sigma=25).options.act_observer_kwargs) == {"k": 25.0}
    assert QuantConfig(sigma=0).options.act_method == "minmax"
    assert QuantConfig().options.act_method == "minmax"  # the LLM default (act_method 1)
    assert QuantConfig(act_method=2, sigma=25).options.act_method == "histogram"


def test_cnn_safetensors_hold_quantized_convolutions_and_reload(resnet, digits, tmp_path):
    """Item 12: convolutions are saved in the Ascend format (int8 weight, scales, int32 bias)."""
    cal = Calibrator(resnet, QuantConfig(), calib_data=_calib(digits, 128))
    cal.run()
    cal.export_quant_safetensor(tmp_path)
    desc = json.loads(next(tmp_path.glob("quant_model_description_*.json")).read_text())
    convs = [n for n, m in cal.model.named_modules() if type(m).__name__ == "QConv2d"]
    assert convs and all(desc[f"{n}.weight"] == "W8A8" for n in convs)
    assert all(desc[f"{n}.quant_bias"] == "W8A8" for n in convs)
    reloaded = load_ascend(ResNetStyle(), tmp_path)
    x = digits[2][:64]
    with torch.no_grad():
        assert torch.allclose(reloaded(x), cal.model(x), atol=1e-4, rtol=1e-4)
    assert accuracy(reloaded, digits[2], digits[3]) == accuracy(cal.model, digits[2], digits[3])


def test_save_refuses_name_clashes_and_removes_stale_schemes(mlp, digits, tmp_path):
    """Item 13: nothing is written when names collide; a second scheme replaces the first."""
    cal = Calibrator(mlp, QuantConfig(), calib_data=_calib(digits, 64))
    cal.run()
    with pytest.raises(ConfigError, match="must be distinct"):
        cal.save(str(tmp_path), safetensors_name="same.safetensors", json_name="same.safetensors")
    assert not list(tmp_path.iterdir())
    cal.save(str(tmp_path))
    cal16 = Calibrator(mlp, QuantConfig(a_bit=16), calib_data=_calib(digits, 64))
    cal16.run()
    cal16.save(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "quant_model_description_w8a16.json", "quant_model_weight_w8a16.safetensors"]
    x = digits[2][:16]
    with torch.no_grad():
        assert torch.allclose(load_ascend(Mlp(), tmp_path)(x), cal16.model(x), atol=1e-5)


def test_failed_load_leaves_the_model_as_it_was(mlp, digits, tmp_path):
    """Item 14: all or nothing, and no second load into a loaded model."""
    cal = Calibrator(mlp, QuantConfig(), calib_data=_calib(digits, 64))
    cal.run()
    cal.save(str(tmp_path))
    desc_path = tmp_path / "quant_model_description_w8a8.json"
    desc = json.loads(desc_path.read_text())
    desc["fc3.weight"] = desc["fc3.bias"] = "W8A16"  # described as quantized, but saved float
    desc_path.write_text(json.dumps(desc))
    target = Mlp()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    modules = dict(target.named_modules())
    with pytest.raises(FxquantError, match="W8A16 layer fc3 has no fc3.weight_scale"):
        load_ascend(target, tmp_path)
    assert dict(target.named_modules()) == modules
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    desc["fc3.weight"] = desc["fc3.bias"] = "FLOAT"
    desc_path.write_text(json.dumps(desc))
    loaded = load_ascend(target, tmp_path)
    with pytest.raises(FxquantError, match="already holds Ascend layers"):
        load_ascend(loaded, tmp_path)


@pytest.mark.parametrize("corrupt, match", [
    ("truncate", r"quant_model_weight_w8a8.safetensors: not a readable safetensors file"),
    ("bad_json", r"quant_model_description_w8a8.json: not valid JSON"),
    ("json_list", r"quant_model_description_w8a8.json: expected a JSON object"),
    ("wrong_type", r"fc1\.\w+ is described as W8A8 but fc1.weight as W8A8_DYNAMIC"),
    ("no_quant_bias", r"described but not saved \['fc1.quant_bias'\]|has no fc1.quant_bias"),
    ("bad_type_name", r"tensor 'fc1.weight' has type 'INT8'; valid: FLOAT"),
])
def test_corrupt_checkpoints_name_the_file_and_the_tensor(mlp, digits, tmp_path, corrupt, match):
    """Item 15."""
    from safetensors.torch import load_file, save_file

    cal = Calibrator(mlp, QuantConfig(), calib_data=_calib(digits, 64))
    cal.run()
    cal.save(str(tmp_path))
    weights = tmp_path / "quant_model_weight_w8a8.safetensors"
    desc_path = tmp_path / "quant_model_description_w8a8.json"
    desc = json.loads(desc_path.read_text())
    if corrupt == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif corrupt == "bad_json":
        desc_path.write_text("{'fc1.weight': W8A8")
    elif corrupt == "json_list":
        desc_path.write_text(json.dumps(list(desc)))
    elif corrupt == "wrong_type":
        desc["fc1.weight"] = "W8A8_DYNAMIC"
        desc_path.write_text(json.dumps(desc))
    elif corrupt == "no_quant_bias":
        tensors = load_file(str(weights))
        del tensors["fc1.quant_bias"]
        del desc["fc1.quant_bias"]
        save_file(tensors, str(weights))
        desc_path.write_text(json.dumps(desc))
    else:
        desc["fc1.weight"] = "INT8"
        desc_path.write_text(json.dumps(desc))
    with pytest.raises(FxquantError, match=match):
        load_ascend(Mlp(), tmp_path)


class VarArgs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.fc(sum(xs))


@pytest.mark.parametrize("call, error, match", [
    (lambda m, c: fxquant.quantize(m, c, disable_names="fc1"), ConfigError, r"got the string 'fc1' \(write \['fc1'\]\)"),
    (lambda m, c: fxquant.quantize(m, c, mix_cfg=["fc1"]), ConfigError, "mix_cfg must be a dict"),
    (lambda m, c: Calibrator(m, QuantConfig(), c, mix_cfg=["fc1"]), ConfigError, "mix_cfg must be a dict"),
    (lambda m, c: QuantConfig(w_bit="8"), ConfigError, "w_bit must be an int, got str '8'"),
    (lambda m, c: QuantConfig(disable_names="fc1"), ConfigError, r"got the string 'fc1' \(write \['fc1'\]\)"),
    (lambda m, c: fxquant.quantize(m, [[torch.zeros(0, 1, 8, 8)]]), CalibrationDataError,
     r"calib_data\[0\] input 'x' is empty"),
    (lambda m, c: fxquant.quantize(m, [c[0], [torch.zeros(4, 1, 8)]]), CalibrationDataError,
     r"calib_data\[1\] input 'x' is torch.float32 \(4, 1, 8\) but calib_data\[0\] gives"),
    (lambda m, c: fxquant.quantize(m, [c[0], [c[0][0].long()]]), CalibrationDataError,
     r"calib_data\[1\] input 'x' is torch.int64"),
    (lambda m, c: fxquant.quantize(m, [[c[0][0].double()]]), CalibrationDataError,
     r"calib_data\[0\] input 'x' is torch.float64 but the model's parameters are torch.float32"),
    (lambda m, c: fxquant.quantize(m, [c[0], [torch.zeros(4, 1, 9, 9)]], progress=False), CalibrationDataError,
     r"calib_data\[1\] fails at node"),
])
def test_bad_input_gets_a_clear_error(mlp, digits, call, error, match):
    """Item 16."""
    with pytest.raises(error, match=match):
        call(mlp, _calib(digits, 64, 16))


def test_bad_save_types_are_refused_early(mlp, digits, tmp_path):
    from fxquant.session import SaveProcessorConfig

    cal = Calibrator(mlp, QuantConfig(), calib_data=_calib(digits, 64))
    cal.run()
    with pytest.raises(ConfigError, match=r"got the string 'ascendV1' \(write \['ascendV1'\]\)"):
        cal.save(str(tmp_path), save_type="ascendV1")
    with pytest.raises(ValueError, match="unknown save_type.*valid: safe_tensor, ascendV1"):
        SaveProcessorConfig(output_path=str(tmp_path), save_type=["ascendv2"])


def test_varargs_forward_suggests_a_wrapper():
    with pytest.raises(CaptureError, match=r"forward\(\*xs\).*wrap the model in a module whose forward names"):
        fxquant.quantize(VarArgs(), [[torch.randn(2, 4), torch.randn(2, 4)]], "w8a16", disable_last_layer=False)


def test_timestep_error_names_an_exported_function():
    from fxquant.timestep import TimestepQuantizer

    q = TimestepQuantizer(fxquant.make_scheme("w8a8_timestep").activation)
    with pytest.raises(RuntimeError, match="fxquant.set_timestep") as info:
        q.current()
    assert callable(eval(info.value.args[0].split("call ")[1].split("(")[0], {"fxquant": fxquant}))


def test_two_calibrators_in_two_threads(mlp, digits):
    """Item 17: concurrent use is safe (capture is serialised; calibration state is per model)."""
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            cal = Calibrator(mlp, QuantConfig(), calib_data=_calib(digits, 128), progress=False)
            cal.run()
            with torch.no_grad():
                results[i] = cal.model(digits[2][:32])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert torch.equal(results[0], results[1])


class _PausesWhileTraced(nn.Module):
    """A block that holds its trace open until told to go on (to overlap a trace with a forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.tracing, self.go_on = threading.Event(), threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):
            self.tracing.set()
            assert self.go_on.wait(30)
        return self.fc(x).relu()


def test_a_model_runs_in_one_thread_while_another_traces(mlp, digits):
    """fx patches nn.Module.__call__ process-wide while tracing: other threads must not see proxies."""
    traced = _PausesWhileTraced()
    q = fxquant.quantize(mlp, _calib(digits, 64), "w8a8", progress=False)
    x = digits[2][:16]
    with torch.no_grad():
        expected = q(x)
    worker = threading.Thread(target=fxquant.capture, args=(traced, (torch.randn(2, 8),)))
    worker.start()
    try:
        assert traced.tracing.wait(30)
        with torch.no_grad():
            during = q(x)  # a float model too: plain modules go through the patched __call__
            float_during = mlp(x)
    finally:
        traced.go_on.set()
        worker.join()
    assert torch.equal(during, expected)
    assert torch.equal(float_during, mlp(x))


def test_to_networkx_mirrors_the_graph(mlp, digits):
    """Item 18: networkx is a used dependency: the IR as a DiGraph with each node's decision."""
    import networkx as nx

    q = fxquant.quantize(mlp, _calib(digits, 64), "w8a8", progress=False)
    g = fxquant.to_networkx(q)
    nodes = list(q.graph.nodes)
    assert nx.is_directed_acyclic_graph(g) and g.number_of_nodes() == len(nodes)
    assert g.nodes["fc1"]["scheme"] == "w8a8" and g.nodes["fc3"]["scheme"] == "float"
    assert g.nodes["fc1"]["module"] == "QLinear"
    assert nx.has_path(g, "fc1", "fc3")
    order = {n: i for i, n in enumerate(nx.topological_sort(g))}
    assert all(order[s.name] < order[n.name] for n in nodes for s in n.all_input_nodes)


def test_a_tokenizer_without_its_merges_is_refused(smollm2):
    """A GGUF tokenizer converted without its BPE merges (transformers 5.17 on Gemma 3) encodes one
    token per character: loading refuses it instead of measuring perplexity through it."""
    from fxquant.errors import ModelLoadError
    from fxquant.real_models import check_tokenizer

    _, tok = smollm2
    check_tokenizer(tok, "SmolLM2")  # a real tokenizer passes

    class PerCharacter:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

        def decode(self, ids):
            return "".join(map(chr, ids))

    with pytest.raises(ModelLoadError, match=r"broken under transformers .*72 characters\) -> 72 tokens"):
        check_tokenizer(PerCharacter(), "a char-level tokenizer")
