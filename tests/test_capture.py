import collections

import pytest
import torch

import fxquant
from fxquant.errors import CaptureError
from fxquant.guards import CapturedInputError
from fxquant.passes import PassManager, fold_batchnorm, functional_to_modules
from fxquant.real_models import encoder_inputs
from fxquant.small_ops import BMM, Add, MatMul

from models import FunctionalOps, MobileNetStyle, ResNetStyle


def _module_types(gm):
    return collections.Counter(type(gm.get_submodule(n.target)).__name__
                               for n in gm.graph.nodes if n.op == "call_module")


@pytest.mark.parametrize("cls", [ResNetStyle, MobileNetStyle])
def test_cnn_capture_fold_and_small_ops(cls):
    torch.manual_seed(0)
    model = cls().eval()
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 1, 8, 8)
    gm = fxquant.capture(model, (x,))
    assert gm.meta["fxquant_capture"] == "symbolic"
    assert torch.allclose(gm(x), model(x), atol=1e-5)
    gm = PassManager([fold_batchnorm, functional_to_modules])(gm)
    types = _module_types(gm)
    assert "BatchNorm2d" not in types and types["Add"] >= 2
    assert torch.allclose(gm(x), model(x), atol=1e-5)
    assert all(m.__class__ is not torch.nn.BatchNorm2d for m in gm.modules())
    # the user's model is untouched by folding
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_functional_ops_in_every_spelling_become_modules():
    model = FunctionalOps().eval()
    x = torch.randn(2, 5, 16)
    gm = functional_to_modules(fxquant.capture(model, (x,)))
    gm.recompile()
    types = _module_types(gm)
    assert types["Add"] == 3 and types["MatMul"] == 2 and types["BMM"] == 1
    assert torch.allclose(gm(x), model(x), atol=1e-6)
    # the scalar division and softmax stay functions
    assert any(n.op == "call_function" for n in gm.graph.nodes)


def test_functional_ops_through_export_path():
    """aten.add / aten.bmm / aten.matmul in an exported graph are normalised the same way."""
    model = FunctionalOps().eval()
    x = torch.randn(2, 5, 16)
    from fxquant.capture import _export_capture

    gm = functional_to_modules(_export_capture(model, (x,), {}))
    gm.recompile()
    types = _module_types(gm)
    assert types["Linear"] == 4
    assert sum(isinstance(m, (Add, MatMul, BMM)) for m in gm.modules()) >= 5
    assert torch.allclose(gm(x), model(x), atol=1e-6)
    x2 = torch.randn(3, 9, 16)  # dynamic batch and sequence
    assert torch.allclose(gm(x2), model(x2), atol=1e-6)


def test_smollm2_capture_two_lengths(smollm2):
    model, _ = smollm2
    ids = torch.randint(0, 5000, (2, 16))
    gm = fxquant.capture(model, (), {"input_ids": ids, "use_cache": False})
    assert gm.meta["fxquant_capture"] == "export"
    names = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert "model.layers.0.mlp.down_proj" in names and "lm_head" in names
    assert sum(isinstance(gm.get_submodule(t), torch.nn.Linear) for t in names) == 30 * 7 + 1
    for length in (16, 37):
        ids = torch.randint(0, 5000, (2, length))
        with torch.no_grad():
            ours, ref = gm(ids, use_cache=False), model(input_ids=ids, use_cache=False)
        assert type(ours) is type(ref)
        assert (ours.logits - ref.logits).abs().max() <= 1e-5
    with torch.no_grad():  # captured with use_cache=False: the graph's default, it keeps no cache
        assert torch.equal(gm(ids).logits, ours.logits)
    with pytest.raises(CapturedInputError, match="use_cache"):
        gm(ids, use_cache=True)
    with pytest.raises(CapturedInputError, match="attention_mask"):
        gm(ids, attention_mask=torch.ones_like(ids), use_cache=False)


def test_minilm_capture(minilm):
    bert = minilm[0].model
    feats = encoder_inputs(minilm, ["a short one", "a somewhat longer sentence here"])
    gm = fxquant.capture(bert, (), feats)
    other = encoder_inputs(minilm, ["three words here", "x", "and one more sentence of text"])
    with torch.no_grad():
        ours, ref = gm(**other), bert(**other)
    assert type(ours) is type(ref)
    assert (ours.last_hidden_state - ref.last_hidden_state).abs().max() <= 1e-5


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        n = int(x.sum().item() > 0) + 1  # python control flow on data
        return self.lin(x).repeat(n, 1)[: int(x.abs().sum().item())]


def test_untraceable_model_reports_both_front_ends():
    with pytest.raises(CaptureError) as err:
        fxquant.capture(DataDependent(), (torch.randn(2, 4),))
    msg = str(err.value)
    assert "symbolic_capture" in msg and "export_capture" in msg
    assert "DataDependent" in msg
