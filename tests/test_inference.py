"""Frozen quantized models for inference: small, installed back into the user's model (generate()
with a KV cache), and compiled with backend="fxquant" to the same values."""

from __future__ import annotations

import copy
import re

import pytest
import torch

import fxquant
from fxquant.errors import ConfigError
from fxquant.kernels import default_kernel
from fxquant.resources import storage_bytes

from models import truncated_smollm2


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["w8a8_dynamic", "w8a16", "w4a16"])
def test_frozen_smollm2_holds_codes_not_float_weights(smollm2, smollm2_graph, smollm2_windows, scheme):
    model, _ = smollm2
    x = smollm2_windows[1][0]  # held-out text, 256 tokens
    q = fxquant.quantize(smollm2_graph, scheme=scheme, example_inputs=[x], progress=False,
                         options=fxquant.SchemeOptions(group_size=64))  # 128 does not divide 576
    ratio = storage_bytes(q) / storage_bytes(model)
    # every Linear but the tied lm_head holds 1 byte (4-bit: half a byte) per weight
    assert ratio <= {"w8a8_dynamic": 0.45, "w8a16": 0.45, "w4a16": 0.35}[scheme], ratio
    assert storage_bytes(model) > 500e6  # the float model keeps its weights
    with torch.no_grad():
        ref = model(input_ids=x, use_cache=False).logits
        out = q(input_ids=x, use_cache=False).logits
    agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    assert agree > {"w8a8_dynamic": 0.8, "w8a16": 0.9, "w4a16": 0.6}[scheme], agree


@pytest.mark.slow
def test_installed_layers_keep_generate_and_compile_to_the_same_tokens(smollm2):
    model, tok = smollm2
    small = truncated_smollm2(model)
    prompt = tok("The GNU General Public License is a free, copyleft license for", return_tensors="pt")
    graph = fxquant.quantize(small, scheme="w8a8_dynamic", example_inputs=[prompt.input_ids], progress=False)
    installed = fxquant.quantize(small, scheme="w8a8_dynamic", example_inputs=[prompt.input_ids],
                                 progress=False, inplace=True)
    assert installed is small and isinstance(small.model.layers[0].mlp.down_proj, fxquant.QLinear)
    with torch.no_grad():  # the installed layers compute what the graph computes
        assert torch.equal(small(**prompt, use_cache=False).logits, graph(input_ids=prompt.input_ids).logits)
        eager = small.generate(**prompt, max_new_tokens=12, do_sample=False)
        backend = fxquant.compile_backend()
        small.forward = torch.compile(small.forward, backend=backend, dynamic=True)
        compiled = small.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(eager, compiled), (tok.decode(eager[0]), tok.decode(compiled[0]))
    assert backend.graphs  # Dynamo handed graphs to fxquant's passes
    kernel = default_kernel(torch.device("cpu"))
    if kernel in ("int_mm", "onednn_split"):  # integer GEMMs in the compiled graphs
        assert sum(g.meta["fxquant_kernels"].get(kernel, 0) for g in backend.graphs) >= 14


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["w8a16", "w4a16"])
def test_compiled_weight_only_decode_has_no_graph_breaks(smollm2, scheme):
    """Decode compiles to a few whole-model graphs, whatever the depth: a graph break
    inside a quantized layer would split each decoder layer and, specialised on layer_idx, run
    past Dynamo's recompile limit into eager."""
    from torch._dynamo.utils import counters

    model, tok = smollm2
    small = truncated_smollm2(model, layers=3)
    prompt = tok("The GNU General Public License is a free, copyleft license for", return_tensors="pt")
    fxquant.quantize(small, scheme=scheme, example_inputs=[prompt.input_ids], progress=False, inplace=True,
                     options=fxquant.SchemeOptions(group_size=64))
    with torch.no_grad():
        eager = small.generate(**prompt, max_new_tokens=8, do_sample=False)
        torch._dynamo.reset()
        counters.clear()
        backend = fxquant.compile_backend(inner="eager")  # Dynamo's capture is under test, not inductor
        small.forward = torch.compile(small.forward, backend=backend, dynamic=True)
        compiled = small.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert not counters["graph_break"], dict(counters["graph_break"])
    # prompt, first new token, later tokens (Dynamo guards the cache's state): not one per layer
    assert counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])
    assert torch.equal(eager, compiled), (tok.decode(eager[0]), tok.decode(compiled[0]))
    torch._dynamo.reset()


@pytest.mark.slow
def test_frozen_layer_guard_filter_drops_only_guards_inside_frozen_layers(smollm2):
    """skip_frozen_layer_guards: same tokens, the guards inside frozen layers gone except tensor,
    `enabled` and bias guards, and a frozen layer replaced after compiling still recompiles."""
    model, tok = smollm2
    small = truncated_smollm2(model)
    prompt = tok("The GNU General Public License is a free, copyleft license for", return_tensors="pt")
    fxquant.quantize(small, scheme="w4a16", example_inputs=[prompt.input_ids], progress=False, inplace=True,
                     options=fxquant.SchemeOptions(group_size=64))
    decisions = []

    def recording_filter(entries):
        keep = fxquant.skip_frozen_layer_guards(entries)
        decisions.extend(zip(entries, keep))
        return keep

    backend = fxquant.compile_backend(inner="eager")  # Dynamo's guards are under test, not inductor
    with torch.no_grad():
        eager = small.generate(**prompt, max_new_tokens=8, do_sample=False)
        torch._dynamo.reset()
        forward = small.forward
        small.forward = torch.compile(forward, backend=backend, dynamic=True,
                                      options={"guard_filter_fn": recording_filter})
        compiled = small.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(eager, compiled), (tok.decode(eager[0]), tok.decode(compiled[0]))

    inside = re.compile(r"_modules\['(q|k|v|o|gate|up|down)_proj'\][.)]")  # a path below a frozen layer
    dropped = [e for e, keep in decisions if not keep]
    assert all(inside.search(e.name) for e in dropped), [e.name for e in dropped if not inside.search(e.name)][:3]
    assert not [e for e in dropped if e.guard_type == "TENSOR_MATCH" or e.name.endswith((".enabled", ".bias"))]
    below = [e for e, _ in decisions if inside.search(e.name)]
    assert len(dropped) > 0.6 * len(below), (len(dropped), len(below))
    assert any(e.name.endswith(".codes_blocked") for e in dropped)
    assert any(e.name.startswith("type(") for e in dropped)  # the class's methods, reached through type()

    # the guard on the layer object itself stays: a float down_proj in its place recompiles
    ids = prompt.input_ids
    with torch.no_grad():
        before = small(input_ids=ids, use_cache=False).logits
        small.model.layers[0].mlp.down_proj = copy.deepcopy(model.model.layers[0].mlp.down_proj)
        after = small(input_ids=ids, use_cache=False).logits
        expected = forward(input_ids=ids, use_cache=False).logits
    assert not torch.allclose(before, expected, atol=1e-4)
    assert torch.allclose(after, expected, atol=1e-4), (after - expected).abs().max()
    torch._dynamo.reset()


def test_backend_is_found_by_name_and_matches_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64),
                                torch.nn.Linear(64, 4))
    calib = [[torch.randn(8, 64)] for _ in range(4)]
    for scheme in ("w8a8", "w8a8_dynamic", "w8a16", "w4a16"):
        q = fxquant.quantize(model, calib, scheme=scheme, progress=False,
                             options=fxquant.SchemeOptions(group_size=64))
        torch._dynamo.reset()
        compiled = torch.compile(q, backend="fxquant")
        for rows in (1, 16):
            x = torch.randn(rows, 64)
            with torch.no_grad():
                ref, out = q(x), compiled(x)
            assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), (scheme, rows)


class _TanhGeluBlock(torch.nn.Module):
    """LayerNorm, tanh-approximate GELU, softmax: kept ops with a keyword-only argument and several outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.up, self.down = torch.nn.LayerNorm(32), torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.gelu(self.up(self.norm(x)), approximate="tanh")
        return self.down(h).softmax(-1)


def test_compiled_with_gradients_keeps_eagers_floats_and_gradients():
    """With gradients on, Dynamo hands over the quantizers' rounding inside autograd functions: the
    backend still keeps the float ops before them as ATen's kernels (the same outputs as eager, bit
    for bit), and those kept ops differentiate as the ATen ops do."""
    torch.manual_seed(0)
    model = _TanhGeluBlock()
    calib = [[torch.randn(16, 32)] for _ in range(4)]
    q = fxquant.quantize(model, calib, scheme="w8a8", disable_last_layer=False, keep_float_weight=True,
                         progress=False)
    x = torch.randn(64, 32)

    def outputs_and_gradients(m: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
        q.zero_grad()
        out = m(x)
        (out * torch.linspace(-1, 1, 32)).sum().backward()
        return out.detach(), [p.grad.clone() for p in q.parameters() if p.grad is not None]

    eager, eager_grads = outputs_and_gradients(q)
    torch._dynamo.reset()
    backend = fxquant.compile_backend()
    compiled, compiled_grads = outputs_and_gradients(torch.compile(q, backend=backend))
    assert backend.graphs[0].meta["fxquant_eager_rounding"]["fxquant.eager_gelu.default"] == 1
    assert torch.equal(compiled, eager)
    assert len(compiled_grads) == len(eager_grads) == 6  # norm, up and down: weights and biases
    for c, e in zip(compiled_grads, eager_grads):
        assert torch.allclose(c, e, rtol=1e-4, atol=1e-6 * e.abs().max())
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_static_model_computes_eagers_floats_bit_for_bit(smollm2, smollm2_windows):
    """Static w8a8 rounds activations at run time: one ulp of difference in a norm flips codes. With
    the float ops before quantizers kept as ATen's kernels and no FMA contraction, the compiled
    model's logits equal eager's exactly (every Linear quantized, lm_head too: no float GEMM left
    whose summation order inductor chooses); without keep_eager_rounding they do not."""
    model, _ = smollm2
    small = truncated_smollm2(model, 3)
    calib = [[w[:, :64]] for w in smollm2_windows[0][:2]]
    q = fxquant.quantize(small, calib, scheme="w8a8", progress=False, smooth_alpha=0.5, disable_last_layer=False,
                         options=fxquant.SchemeOptions(offset_in_rounding=True))
    x = torch.cat(smollm2_windows[1][:2])  # [2, 256]
    with torch.no_grad():
        ref = q(input_ids=x, use_cache=False).logits
        logits = {}
        for name, passes in (("exact", None), ("without", [fxquant.compiler.record_kernels])):
            torch._dynamo.reset()
            backend = fxquant.compile_backend(passes=passes)
            logits[name] = torch.compile(q, backend=backend, dynamic=False)(input_ids=x, use_cache=False).logits
            if name == "exact":
                wrapped = backend.graphs[0].meta["fxquant_eager_rounding"]
                assert wrapped["fxquant.eager_mean_dim.default"] == 7  # 2 norms per layer and the final one
                assert wrapped["fxquant.eager_silu.default"] == 3
    assert torch.equal(logits["exact"], ref)
    assert not torch.equal(logits["without"], ref)
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_static_minilm_computes_eagers_floats_bit_for_bit(minilm):
    """The ATen-level norms of an encoder (aten.layer_norm, GELU) are kept too: static w8a8 MiniLM
    compiled gives eager's hidden states exactly (without the pass they differ by ~0.2)."""
    from fxquant.real_models import encoder_batches, sentences, text_corpus

    sents = sentences(text_corpus("eval"), 24)
    q = fxquant.quantize(minilm[0].model, encoder_batches(minilm, sents[:16]), scheme="w8a8", progress=False,
                         disable_last_layer=False)
    x = encoder_batches(minilm, sents[16:])[0]
    torch._dynamo.reset()
    backend = fxquant.compile_backend()
    with torch.no_grad():
        out = torch.compile(q, backend=backend, dynamic=False)(**x).last_hidden_state
        ref = q(**x).last_hidden_state
    wrapped = backend.graphs[0].meta["fxquant_eager_rounding"]
    assert wrapped["fxquant.eager_layer_norm.default"] == 13 and wrapped["fxquant.eager_gelu.default"] == 6
    assert torch.equal(out, ref)
    torch._dynamo.reset()


def test_weight_only_graphs_keep_fused_float_ops():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    q = fxquant.quantize(model, [[torch.randn(4, 64)]], scheme="w8a16", progress=False, disable_last_layer=False)
    torch._dynamo.reset()
    backend = fxquant.compile_backend()
    with torch.no_grad():
        torch.compile(q, backend=backend)(torch.randn(2, 64))
    assert "fxquant_eager_rounding" not in backend.graphs[0].meta  # nothing rounds activations: GELU stays fused
    torch._dynamo.reset()


class _TorchLevelFloatOps(torch.nn.Module):
    """Every torch-level form keep_eager_rounding maps, before an activation rounding."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.layer_norm(x, (16,), self.norm.weight, eps=1e-6)
        h = h + torch.nn.functional.rms_norm(x, (16,), eps=1e-6)
        h = torch.nn.functional.gelu(h, approximate="tanh") + torch.nn.functional.gelu(h)
        h = torch.nn.functional.softmax(h, -1, dtype=torch.float64).float() + h.log_softmax(dim=-1)
        return torch.round(h * 50 + x.mean(-1, keepdim=True))


def test_eager_rounding_keeps_torch_level_norms_activations_and_typed_softmax():
    model = _TorchLevelFloatOps()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(4, 8, 16)
    ref = gm(x)
    fxquant.compiler.keep_eager_rounding(gm)
    assert gm.meta["fxquant_eager_rounding"] == {
        "fxquant.eager_layer_norm.default": 1, "fxquant.eager_rms_norm.default": 1, "fxquant.eager_gelu.default": 2,
        "fxquant.eager_softmax_int.default": 1, "fxquant.eager_log_softmax_int.default": 1,
        "fxquant.eager_mean_dim.default": 1}
    assert torch.equal(gm(x), ref)
    gelu = [n for n in gm.graph.nodes if str(n.target) == "fxquant.eager_gelu.default"]
    assert [n.kwargs["approximate"] for n in gelu] == ["tanh", "none"]


def test_backend_inductor_options_reach_inductor_and_unknown_ones_are_refused(monkeypatch):
    from torch._inductor import compile_fx as inductor

    seen = []
    real = inductor.compile_fx

    def recording(gm, example_inputs, **kwargs):
        seen.append(kwargs.get("config_patches"))
        return real(gm, example_inputs, **kwargs)

    monkeypatch.setattr(inductor, "compile_fx", recording)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    q = fxquant.quantize(model, [[torch.randn(4, 64)]], scheme="w8a16", progress=False, disable_last_layer=False)
    x = torch.randn(2, 64)
    for options in (None, {"cpp.enable_floating_point_contract_flag": "off"}):
        torch._dynamo.reset()
        seen.clear()
        with torch.no_grad():
            out = torch.compile(q, backend=fxquant.compile_backend(inductor_options=options))(x)
            ref = q(x)
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
        assert seen[0] == (options or {"cpp.enable_floating_point_contract_flag": "fast"})  # first: ours
    with pytest.raises(ValueError, match="unknown inductor options.*cpp.no_such_flag"):
        fxquant.compile_backend(inductor_options={"cpp.no_such_flag": True})
    torch._dynamo.reset()


def test_apply_refuses_graph_rewrites_the_model_has_no_place_for():
    class AddModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.a(x) + self.b(x)

    model = AddModel()
    q = fxquant.quantize(model, [[torch.randn(4, 16)]], scheme="w8a8", small_op_scheme="w8a8",
                         disable_last_layer=False, progress=False)
    with pytest.raises(ConfigError, match="QAdd"):
        fxquant.apply(model, q)
    assert isinstance(model.a, torch.nn.Linear)  # nothing installed: all or nothing


@pytest.mark.parametrize("scheme, rows", [("w4a16", 48), ("w8a16", 48), ("w4a16", 40)])
def test_gemv_codes_take_the_loading_cpus_block_size(monkeypatch, scheme, rows):
    """A layer frozen where the GEMV layout has blocks of 8 rows (AVX2), copied or loaded where it
    has 16 (AVX-512), is re-blocked (or kept in row order where 16 does not divide the rows) and
    computes the same; its state_dict loads into a layer frozen with the other block size."""
    import fxquant.weighted_quant_opr as weighted_quant_opr

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, rows)).eval()
    calib = [[torch.randn(3, 64)]]
    options = fxquant.SchemeOptions(group_size=32)

    def frozen(block: int) -> torch.nn.Module:
        monkeypatch.setattr(weighted_quant_opr, "gemv_block", lambda: block)
        return fxquant.quantize(model, calib, scheme, options=options, disable_last_layer=False, progress=False)

    def layer(m: torch.nn.Module):
        return next(x for x in m.modules() if isinstance(x, fxquant.QLinear))

    on_avx2, on_avx512 = frozen(8), frozen(16)
    assert layer(on_avx2).weight_codes.shape[-1] == 32  # 4 bytes x 8 rows
    x = torch.randn(12, 64)  # more rows than the GEMV takes: one float GEMM whatever the layout
    with torch.no_grad():
        expected = on_avx2(x)
    moved = copy.deepcopy(on_avx2)  # under the 16-row block (monkeypatched above)
    fits = rows % 16 == 0
    assert layer(moved).codes_blocked == fits
    assert layer(moved).weight_codes.shape[-1] == 64 if fits else layer(moved).weight_codes.dim() == 2
    assert torch.equal(layer(moved).weight_int8(), layer(on_avx2).weight_int8())
    with torch.no_grad():
        assert torch.equal(moved(x), expected)
        few = x[:3]  # decode-sized: the GEMV over either layout (F.linear where 16 does not divide the rows)
        torch.testing.assert_close(moved(few), on_avx2(few), rtol=1e-5, atol=1e-6)
    layer(on_avx512).load_state_dict(layer(on_avx2).state_dict())
    assert layer(on_avx512).weight_codes.shape == layer(moved).weight_codes.shape
    assert torch.equal(layer(on_avx512).weight_int8(), layer(on_avx2).weight_int8())
