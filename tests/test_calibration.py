import pytest
import torch
from torch import nn

import fxquant
from fxquant import CalibrationRunner
from fxquant.errors import CalibrationDataError
from fxquant.keep_acc import GPTQWeights
from fxquant.passes import (
    Calibrate,
    InsertQuantOprs,
    PassManager,
    ResolveSchemes,
    fold_batchnorm,
    functional_to_modules,
)
from fxquant.storage import ActivationStorage, graph_live_set_size

from models import FunctionalOps, ResNetStyle


def _prepared(model, x, scheme="w8a8", **resolve_kw):
    gm = fxquant.capture(model.eval(), (x,))
    return PassManager([fold_batchnorm, functional_to_modules,
                        ResolveSchemes(default=scheme, **resolve_kw), InsertQuantOprs()])(gm)


class CountingStorage(ActivationStorage):
    """Records the number of live stored values after every set / finish."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.history = []

    def set(self, node, values):
        super().set(node, values)
        self.history.append(len(self))

    def finish_node(self, node):
        super().finish_node(node)
        self.history.append(len(self))


def test_storage_never_exceeds_graph_live_set_and_ends_empty(monkeypatch):
    torch.manual_seed(0)
    gm = _prepared(ResNetStyle(blocks=2), torch.randn(4, 1, 8, 8))
    created = []

    def factory(*a, **kw):
        created.append(CountingStorage(*a, **kw))
        return created[-1]

    monkeypatch.setattr("fxquant.calibration.ActivationStorage", factory)
    runner = CalibrationRunner(gm, [[torch.randn(4, 1, 8, 8)] for _ in range(5)])
    runner.prepare_calibration()
    runner.layerwise_calibration("cpu", progress=False)
    (store,) = created
    live_set = graph_live_set_size(gm.graph)
    n_nodes = len(gm.graph.nodes)
    assert max(store.history) <= live_set < n_nodes / 3
    assert store.history[-1] == 0 and len(store) == 0


def test_smollm2_storage_release(smollm2, smollm2_windows):
    model, _ = smollm2
    calib, _ = smollm2_windows
    data = [{"input_ids": w, "use_cache": False} for w in calib[:2]]
    q = PassManager([functional_to_modules, ResolveSchemes(default="w8a8"), InsertQuantOprs(),
                     Calibrate(data, streaming=False, progress=False)])(fxquant.capture(model, (), data[0]))
    gm_nodes = len(q.graph.nodes)
    runner_peak = q.meta.get("fxquant_peak_live")
    assert runner_peak is not None and runner_peak <= q.meta["fxquant_live_set"] < gm_nodes / 10
    assert q.meta["fxquant_live_set"] <= graph_live_set_size(q.graph)


def _input_scales(gm):
    return {name: float(m.input_quantizer.scale) for name, m in gm.named_modules()
            if isinstance(m, fxquant.QuantOpr) and isinstance(m.input_quantizer, fxquant.StaticQuantizer)}


def test_asym_feeds_quantized_outputs_to_later_observers():
    torch.manual_seed(0)
    model = FunctionalOps().eval()
    data = [[torch.randn(2, 6, 16)] for _ in range(4)]
    scales = {}
    for asym in (False, True):
        gm = _prepared(model, data[0][0], disable_last_layer=False, small_op_scheme="w8a8")
        runner = CalibrationRunner(gm, data)
        runner.layerwise_calibration("cpu", asym=asym, w_quant=True, a_quant=True, progress=False)
        scales[asym] = _input_scales(gm)
        # quantized storage is released like the float one
        assert len(runner.qstorage or []) == 0
    first = "q"  # reads the graph input: identical either way
    assert scales[False][first] == scales[True][first]
    changed = [k for k in scales[False] if scales[False][k] != scales[True][k]]
    assert "out" in changed and len(changed) >= 3


def test_asym_shares_values_until_the_first_quantized_node(monkeypatch):
    model = nn.Sequential(nn.ReLU(), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    gm = _prepared(model, torch.randn(2, 8), disable_last_layer=False)
    stores = []

    def factory(*a, **kw):
        stores.append(CountingStorage(*a, **kw))
        return stores[-1]

    monkeypatch.setattr("fxquant.calibration.ActivationStorage", factory)
    runner = CalibrationRunner(gm, [[torch.randn(2, 8)] for _ in range(3)])
    shared, distinct = [], []
    original = CountingStorage.set

    def spy(self, node, values):
        original(self, node, values)
        if self is stores[-1] and len(stores) == 2:
            (shared if values is stores[0].get(node) else distinct).append(node.name)

    monkeypatch.setattr(CountingStorage, "set", spy)
    runner.layerwise_calibration("cpu", asym=True, w_quant=True, a_quant=True, offload=False, progress=False)
    assert shared == ["input_1", "_0", "_1"]  # no copy before the first QuantOpr
    assert distinct == ["_2", "_3", "_4"]
    assert max(stores[1].history) <= graph_live_set_size(gm.graph)


def test_nan_in_activations_names_the_node():
    class LogThenLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.proj(torch.log(x)))

    with pytest.raises(CalibrationDataError, match=r"input of 'proj' \(from node 'log'\).*batch 1.*NaN"):
        fxquant.quantize(LogThenLinear(), [[torch.rand(2, 4) + 0.1], [-torch.rand(2, 4) - 0.1]], progress=False)


def test_nan_in_calibration_data_names_the_input():
    x = torch.randn(2, 4)
    x[0, 0] = float("inf")
    with pytest.raises(CalibrationDataError, match=r"input 'input'.*calib_data\[1\].*1 Inf"):
        fxquant.quantize(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), [[torch.randn(2, 4)], [x]],
                         progress=False)


@pytest.mark.parametrize("bad,match", [
    ([], "calib_data is empty"),
    ({"x": torch.randn(2, 4)}, "must be a list of samples, got dict"),
    ([[torch.randn(2, 4)], "text"], r"calib_data\[1\] is a str"),
    ([[]], r"calib_data\[0\] is an empty list"),
    ([[torch.randn(2, 4), torch.randn(2, 4)]], r"calib_data\[0\] does not fit the model's inputs"),
])
def test_malformed_calib_data(bad, match):
    with pytest.raises((CalibrationDataError, fxquant.FxquantError), match=match):
        fxquant.quantize(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), bad, progress=False)


class _Untraceable(nn.Module):
    """Capture fails on it (data-dependent control flow): errors raised before capture show."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if float(x.sum()) > 0 else -self.fc(x)


def test_static_scheme_without_data_is_an_error_but_weight_only_is_not():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(CalibrationDataError, match="pass calib_data"):
        fxquant.quantize(model, None)
    # the default scheme alone decides it: refused before capture (which would fail on this model)
    with pytest.raises(CalibrationDataError, match="scheme 'w8a8' quantizes activations statically"):
        fxquant.quantize(_Untraceable(), None, scheme="w8a8", example_inputs=[torch.randn(2, 4)])
    # a mix_cfg may leave only weight-only layers: decided on the graph
    with pytest.raises(CalibrationDataError, match="1 layers quantize activations statically"):
        fxquant.quantize(model, None, scheme="w8a16", mix_cfg={"1": "w8a8"}, disable_last_layer=False,
                         example_inputs=[torch.randn(2, 4)])
    q = fxquant.quantize(model, None, scheme="w8a16", example_inputs=[torch.randn(2, 4)])
    x = torch.randn(3, 4)
    assert (q(x) - model(x)).abs().max() < 0.05


@pytest.mark.parametrize("kwargs, match", [
    ({"weight_optimizers": [GPTQWeights()]}, r"weight_optimizers \(GPTQ, AdaRound, ...\) work on the layers'"),
    ({"measure_layers": True}, "measure_layers work on the layers' calibration inputs: pass calib_data"),
])
def test_data_free_calibration_refuses_what_needs_calibration_inputs(kwargs, match):
    """Weight rounding and layer measurements without data would silently do nothing: refused, by
    quantize before capture and by the Calibrate pass itself."""
    with pytest.raises(CalibrationDataError, match=match):
        fxquant.quantize(_Untraceable(), None, scheme="w8a16", example_inputs=[torch.randn(2, 4)], **kwargs)
    with pytest.raises(CalibrationDataError, match=match):
        Calibrate(None, **kwargs)


def test_offload_gives_identical_qparams():
    torch.manual_seed(0)
    model = ResNetStyle().eval()
    data = [[torch.randn(2, 1, 8, 8)] for _ in range(3)]
    results = []
    for offload in (True, False):
        gm = _prepared(model, data[0][0])
        CalibrationRunner(gm, data).layerwise_calibration("cpu", offload=offload, progress=False)
        results.append(_input_scales(gm))
    assert results[0] == results[1]


def test_streaming_calibration_gives_the_layerwise_qparams():
    """Whole float forwards with hooked observers (the default where it is equivalent) and the
    layerwise runner's stored activations give bit-equal qparams, for min-max and histogram."""
    torch.manual_seed(0)
    model = ResNetStyle(blocks=2).eval()
    data = [[torch.randn(2, 1, 8, 8)] for _ in range(4)]
    for act_method in ("minmax", "histogram"):
        results = []
        for streaming in (True, False):
            gm = fxquant.capture(model, (data[0][0],))
            gm = PassManager([fold_batchnorm, functional_to_modules, ResolveSchemes(default="w8a8"),
                              InsertQuantOprs(fxquant.SchemeOptions(act_method=act_method)),
                              Calibrate(data, streaming=streaming, progress=False)])(gm)
            results.append({k: v.clone() for k, v in gm.state_dict().items() if k.endswith(("scale", "zero_point"))})
        assert results[0].keys() == results[1].keys() and len(results[0]) > 10
        assert all(torch.equal(results[0][k], results[1][k]) for k in results[0]), act_method
    with pytest.raises(fxquant.ConfigError, match="streaming calibration needs asym=False"):
        Calibrate(data, asym=True, streaming=True)(_prepared(model, data[0][0]))
