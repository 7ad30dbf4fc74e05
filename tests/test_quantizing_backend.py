"""torch.compile(float_model, backend=fxquant.quantizing_backend(...)): each Dynamo graph (graph
breaks included) quantized with fxquant.quantize's passes, to the numbers fxquant.quantize gives."""

from __future__ import annotations

import pytest
import torch

import fxquant
from fxquant.errors import CalibrationDataError, ConfigError
from fxquant.ir import scheme_decisions
from fxquant.kernels import default_kernel
from fxquant.passes import ReplaySmoothing
from fxquant.passes.replay_smoothing import smoothing_of
from fxquant.quant_opr import QuantOpr
from fxquant.real_models import perplexity

from models import TinyLlama


class BrokenGraph(torch.nn.Module):
    """Three Linears with a graph break after the first: Dynamo hands over two graphs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(32, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        h = self.b(h) + h
        return self.c(torch.relu(h))


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8_dynamic", "w8a16"])
def test_graph_breaks_quantize_as_fxquant_quantize_does(scheme):
    torch.manual_seed(0)
    model = BrokenGraph().eval()
    calib = [[torch.randn(4, 32)] for _ in range(6)]
    ref = fxquant.quantize(model, calib, scheme=scheme, progress=False)
    torch._dynamo.reset()
    backend = fxquant.quantizing_backend(scheme, calib_data=calib)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for rows in (4, 4, 7):  # 7 rows: Dynamo recompiles; the new graphs reuse the calibrated layers
            x = torch.randn(rows, 32)
            expected, out = ref(x), compiled(x)
            assert (out - expected).abs().max() <= 1e-5 * expected.abs().max(), (scheme, rows)
            assert not torch.allclose(out, model(x), atol=1e-4)  # quantized, not float
    first = backend.graphs[:2]
    assert [g.lifted.layer_names for g in first] == [("a",), ("b", "c")]
    assert backend.model_layers == ["a", "b", "c"]
    decisions = {name: s for g in first for name, (s, _) in scheme_decisions(g.quantized).items()}
    assert decisions == {"a": scheme, "b": scheme, "c": "float", "add": "float"}  # last layer float, as in quantize
    late = backend.graphs[2:]
    assert late and all(g.quantized.get_submodule("a") is backend.layers["a"] for g in late if "a" in g.lifted.layer_names)
    kernel = default_kernel(torch.device("cpu"))
    if scheme != "w8a16" and kernel in ("int_mm", "onednn_split"):
        assert [g.inner.graphs[0].meta["fxquant_kernels"] for g in first] == [{kernel: 1}, {kernel: 1}]


@pytest.mark.slow
def test_smollm2_compiled_with_the_quantizing_backend_matches_quantize(smollm2, smollm2_graph, smollm2_windows):
    scheme = "w8a8_dynamic"  # static w8a8 through graph breaks and recompiles: the BrokenGraph test
    model, _ = smollm2
    calib_windows, eval_windows = smollm2_windows
    calib = [{"input_ids": w, "use_cache": False} for w in calib_windows[:2]]
    # layers named as in the model (transformers' forward runs in a wrapper(*args): Dynamo's paths
    # start at L['args'][0])
    names = {"mix_cfg": {"model.layers.3.mlp.down_proj": "w8a16"}, "disable_names": ["model.layers.0.mlp.gate_proj"]}
    ref = fxquant.quantize(smollm2_graph, calib, scheme=scheme, progress=False, **names)  # the graph of `model`
    torch._dynamo.reset()
    backend = fxquant.quantizing_backend(scheme, calib_data=calib, inner="eager", **names)  # inductor: the benchmark
    compiled = torch.compile(model, backend=backend)
    ppl_ref, ppl = perplexity(ref, eval_windows[:1]), perplexity(compiled, eval_windows[:1])
    assert abs(ppl - ppl_ref) <= 1e-6 * ppl_ref, (ppl, ppl_ref)  # the same passes on the same data
    assert abs(ppl - perplexity(model, eval_windows[:1])) > 0.01 * ppl_ref  # it did quantize
    quantized = {name for name, m in ref.named_modules() if isinstance(m, QuantOpr)}
    assert set(backend.layers) == quantized and len(quantized) == 30 * 7 - 1  # lm_head (the last layer) stays float
    layers = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}  # small ops: per graph
    decisions = {k: v for g in backend.graphs for k, v in scheme_decisions(g.quantized).items() if k in layers}
    assert decisions == {k: v for k, v in scheme_decisions(ref).items() if k in layers} and len(decisions) == 211
    assert decisions["model.layers.3.mlp.down_proj"][0] == "w8a16"
    torch._dynamo.reset()


def test_quantizing_backend_refuses_bad_input():
    with pytest.raises(CalibrationDataError, match="needs calib_data"):
        fxquant.quantizing_backend("w8a8_dynamic")
    with pytest.raises(ConfigError, match="w9a9"):
        fxquant.quantizing_backend("w9a9", calib_data=[[torch.randn(2, 4)]])
    with pytest.raises(ConfigError, match="mix_cfg"):
        fxquant.quantizing_backend("w8a8", calib_data=[[torch.randn(2, 4)]], mix_cfg=["a"])
    torch._dynamo.reset()
    layer = torch.nn.Linear(4, 4)
    fn = torch.compile(lambda x: layer(x) * 2,
                       backend=fxquant.quantizing_backend("w8a8", calib_data=[[torch.randn(2, 4)]]))
    with pytest.raises(Exception, match="compile an nn.Module"):
        fn(torch.randn(2, 4))


def test_a_new_graph_after_smoothed_calibration_replays_the_smoothing():
    """A shape Dynamo recompiles for after calibration reuses the smoothed layers, and its norms,
    gated products and value projections fold the same scales: the numbers of fxquant.quantize."""
    torch.manual_seed(0)
    model = TinyLlama().eval()
    with torch.no_grad():
        for b in model.blocks:  # outlier channels, as in real LLMs
            b.n1.weight[7] = b.n2.weight[11] = 40.0
    calib = [[torch.randint(0, 64, (2, 16))] for _ in range(2)]
    ref = fxquant.quantize(model, calib, scheme="w8a8", smooth_alpha=0.5, disable_last_layer=False, progress=False)
    torch._dynamo.reset()
    backend = fxquant.quantizing_backend("w8a8", calib_data=calib, smooth_alpha=0.5, disable_last_layer=False,
                                         inner="eager")  # the numbers, not inductor's code, are tested here
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        for shape in ((2, 16), (3, 24)):  # (3, 24): a new graph after calibration
            x = torch.randint(0, 64, shape)
            expected, out = ref(x), compiled(x)
            assert (out - expected).abs().max() <= 1e-4 * expected.abs().max(), shape
    first, late = backend.graphs
    assert late.quantized.get_submodule("blocks.0.down") is backend.layers["blocks.0.down"]
    kinds = {kind for kind, _ in smoothing_of(late.quantized).values()}
    assert smoothing_of(late.quantized).keys() == smoothing_of(first.quantized).keys() and kinds == {"norm", "linear", "attention"}
    torch._dynamo.reset()


def test_smoothing_is_not_replayed_where_the_graph_has_no_fold():
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(8, 8)))
    with pytest.raises(ConfigError, match=r"layers \['1'\] were smoothed, but in this graph their input has no fold"):
        ReplaySmoothing({"1": ("norm", torch.ones(8))})(gm)
