"""int8_matmul: every implementation is exact, and the default one on this CPU too."""

from __future__ import annotations

import pytest
import torch
from layer_cache_checks import assert_copies_rebuild_the_cache

from fxquant.kernels import c_kernels, int8_matmul
from fxquant.kernels.int_matmul import EXACT_FP32_K, default_kernel


@pytest.mark.parametrize("kernel", [None, "onednn_split", "fp32_split", "fp64"])
@pytest.mark.parametrize("m, k, n", [(1, 576, 64), (64, 576, 1536), (33, 1536, 96), (17, 4100, 40)])
def test_int8_matmul_is_exact(kernel, m, k, n):
    gen = torch.Generator().manual_seed(m * k + n)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
    b = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=gen)
    a[0] = -128  # full-range rows: the sums a saturating kernel gets wrong
    b[:, 0] = -128
    ref = (a.double() @ b.double()).to(torch.int64)
    out = int8_matmul(a, b, kernel)
    assert out.dtype == torch.int32 and out.shape == (m, n)
    assert torch.equal(out.to(torch.int64), ref), f"kernel {kernel or default_kernel(a.device)}"


@pytest.mark.parametrize("kernel", ["onednn_split", "fp32_split", "fp64"])
@pytest.mark.parametrize("zero", [0, -66, 21, -128, 127])
@pytest.mark.parametrize("m, k, n", [(64, 576, 96), (9, 1536, 40), (5, 4100, 24)])
def test_codes_matmul_with_a_zero_point_is_exact(kernel, zero, m, k, n):
    """(xc - zero) @ wc^T at full range, for zero points that onednn_split splits around (clipped
    where a part could pass 2^24) and those it cannot (k > 2048)."""
    from fxquant.kernels.int_matmul import codes_matmul
    from fxquant.kernels.onednn_split import available

    if kernel == "onednn_split" and not available():
        pytest.skip("this torch has no oneDNN quantized linear")
    gen = torch.Generator().manual_seed(k + n - zero)
    xc = (torch.randint(-12, 13, (m, k), generator=gen) + zero).clamp(-128, 127).to(torch.int8)
    xc[0] = 127  # the full-range rows: the largest sums either way
    xc[1] = -128
    wc = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    wc[0] = 127
    wc[1] = -127
    ref = ((xc.double() - zero) @ wc.double().t()).to(torch.int64)
    out = codes_matmul(xc, wc, kernel, zero=zero)
    assert torch.equal(out.to(torch.int64), ref)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("zero", [0, -66, 30, -128])
@pytest.mark.parametrize("m, k, n", [(64, 576, 960), (9, 1536, 40), (5, 4100, 24), (3, 13, 5)])
def test_onednn_split_adds_large_codes_exactly_in_c_and_by_fbgemm(native, zero, m, k, n):
    """The large codes are added back by the C kernel (csrc/large_codes.c, sums in int32, so the
    split may centre on any zero point within int8) or by FBGEMM's embedding bag (float32 sums,
    centre clipped): both give (xc - zero) @ wc^T exactly, for sparse large codes as real
    activations have them and for full-range rows, k not a multiple of 8 included."""
    from fxquant.kernels import c_kernels
    from fxquant.kernels.onednn_split import (
        SplitPackedWeight,
        available,
        native_large_codes,
        split_codes_matmul,
    )

    if not available():
        pytest.skip("this torch has no oneDNN quantized linear")
    if native:
        assert native_large_codes() == (c_kernels.compiler() is not None)
    gen = torch.Generator().manual_seed(m + k + n - zero)
    xc = (torch.randn(m, k, generator=gen) * 20 + zero).round().clamp(-128, 127)
    xc[0] = 127
    xc[-1, ::3] = -128
    wc = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    ref = ((xc.double() - zero) @ wc.double().t()).to(torch.int64)
    out = split_codes_matmul(xc, SplitPackedWeight(wc, native=native), zero)
    assert torch.equal(out.to(torch.int64), ref)


def test_fp32_split_chunks_keep_sums_exact():
    """The worst case of one chunk: 1024 products of -128 * -128 = 2^24, still exact in fp32."""
    a = torch.full((2, 3 * EXACT_FP32_K), -128, dtype=torch.int8)
    b = torch.full((3 * EXACT_FP32_K, 2), -128, dtype=torch.int8)
    assert int(int8_matmul(a, b, "fp32_split")[0, 0]) == 3 * EXACT_FP32_K * 128 * 128


def test_unknown_kernel_is_refused():
    a = torch.zeros(2, 2, dtype=torch.int8)
    with pytest.raises(ValueError, match="valid: int_mm, onednn_split, fp32_split, fp64"):
        int8_matmul(a, a, "onednn")


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8_dynamic"])
def test_frozen_layer_gives_the_same_values_on_every_kernel(scheme):
    """A frozen QLinear runs the kernel freeze() picked for this CPU; each other exact kernel gives
    the same output up to float rounding of the final scaling."""
    import fxquant
    from fxquant.kernel_choice import KERNEL_DESCRIPTIONS
    from fxquant.kernels.int_matmul import exact_kernels

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1536, 96), torch.nn.ReLU(), torch.nn.Linear(96, 8))
    calib = [[torch.randn(4, 1536) * 3] for _ in range(2)]
    q = fxquant.quantize(model, calib, scheme=scheme, progress=False)
    layer = q.get_submodule("0")
    assert layer.kernel == default_kernel(torch.device("cpu")) and layer.kernel in KERNEL_DESCRIPTIONS
    node = next(n for n in q.graph.nodes if n.target == "0")
    assert node.meta["fxquant_kernel"] == layer.kernel
    for rows in (7, 40):  # decode (the token linear C kernel, for dynamic inputs) and a GEMM
        x = torch.randn(rows, 1536) * 3
        outs = {}
        with torch.no_grad():
            for kernel in exact_kernels(torch.device("cpu")):
                layer.kernel = kernel
                outs[kernel] = layer(x)
        ref = outs["fp64"]
        for kernel, out in outs.items():
            assert (out - ref).abs().max() <= 1e-6 * ref.abs().max(), (kernel, rows)


def test_int_mm_is_refused_where_the_cpu_would_saturate_its_sums(monkeypatch):
    """Without int8 dot products (AVX2 only) oneDNN's int8 GEMM and convolution compute wrong sums:
    a layer forced onto them says so and names the exact kernels, instead of computing them."""
    from fxquant.kernels import int_matmul
    from fxquant.kernels.int_conv import ConvGeometry, PackedConvWeight
    from fxquant.kernels.int_matmul import KERNELS, cpu_has_int8_dot, exact_kernels

    cpu = torch.device("cpu")
    assert ("int_mm" in exact_kernels(cpu)) == cpu_has_int8_dot()
    assert default_kernel(cpu) in exact_kernels(cpu)
    assert exact_kernels(torch.device("cuda")) == KERNELS
    a = torch.full((4, 64), -128, dtype=torch.int8)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    int_matmul.cpu_has_int8_dot.cache_clear()
    try:
        assert exact_kernels(cpu) == ("onednn_split", "fp32_split", "fp64")
        with pytest.raises(ValueError, match="'int_mm' is not exact on this CPU.*exact here: onednn_split, fp32_split, fp64"):
            int8_matmul(a, a.t().contiguous(), "int_mm")
        with pytest.raises(ValueError, match="'onednn_qconv' is not exact.*exact here: onednn_split, fp32_split, fp64"):
            PackedConvWeight(torch.ones(4, 2, 3, 3, dtype=torch.int8), ConvGeometry((1, 1), (1, 1), (1, 1), 1, 2),
                             source=torch.ones(1))
        assert torch.equal(int8_matmul(a, a.t().contiguous(), "fp64"), torch.full((4, 4), 64 * 128 * 128,
                                                                                   dtype=torch.int32))
    finally:
        int_matmul.cpu_has_int8_dot.cache_clear()


@pytest.mark.parametrize("block", [8, 16])
@pytest.mark.parametrize("bits, group, asym", [(8, None, False), (8, None, True), (4, 32, True), (4, 64, False),
                                              (8, 32, True)])
def test_codes_gemv_is_the_linear_of_the_dequantized_weight(bits, group, asym, block):
    """The fused weight-only decode form over stored codes read as int32 words: int8 per channel,
    int4 / int8 per group, with and without offsets, in blocks of 8 (AVX2) or 16 (AVX-512) rows."""
    from fxquant.kernels.weight_only import (
        codes_gemv,
        from_gemv_layout,
        gemv_layout_ok,
        gemv_offsets,
        native_codes_gemv,
        pack_codes,
        to_gemv_layout,
        unpack_codes,
    )

    gen = torch.Generator().manual_seed(bits + (group or 0))
    n, k = 96, 256
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    codes = torch.randint(lo, hi, (n, k), generator=gen).float()
    stored = pack_codes(codes, bits)
    assert gemv_layout_ok((n, k), bits, group, block)
    assert torch.equal(unpack_codes(stored, bits, (n, k)).float(), codes)
    blocked = to_gemv_layout(stored, block)
    assert torch.equal(from_gemv_layout(blocked), stored)
    assert torch.equal(from_gemv_layout(to_gemv_layout(stored[:block], block)), stored[:block])  # one block
    assert torch.equal(blocked[1, 2, 4 * 3:4 * 4], stored[block + 3, 4 * 2:4 * 3])  # word 2 of block 1's lane 3
    groups = 1 if group is None else k // group
    scale = torch.rand(n, groups, generator=gen) / 100
    zero = torch.randint(-3, 4, (n, groups), generator=gen).float() if asym else torch.zeros(n, groups)
    weight = ((codes.reshape(n, groups, -1) - zero[..., None]) * scale[..., None]).reshape(n, k)
    bias, x = torch.randn(n, generator=gen), torch.randn(2, 4, k, generator=gen)
    expected = torch.nn.functional.linear(x, weight, bias)
    if group is None:
        out = codes_gemv(x, blocked, bits, scale[:, 0], zero[:, 0] if asym else None, None, bias)
    else:
        out = codes_gemv(x, blocked, bits, scale, zero if asym else None, group, bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # the same sums by the C kernel (eager decode), for 1 to 8 rows
    offsets = gemv_offsets(bits, zero if asym else None, n, groups)
    for rows in (1, 5, 8):
        native = native_codes_gemv(x.reshape(-1, k)[:rows], blocked, bits, scale, offsets, bias)
        if c_kernels.compiler() is None:
            assert native is None
        else:
            torch.testing.assert_close(native, expected.reshape(-1, n)[:rows], rtol=1e-5, atol=1e-5)


def test_compiled_w8a16_decode_takes_the_fused_gemv_and_matches_eager(monkeypatch):
    import fxquant
    from fxquant.quant_linear import QLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    layer = fxquant.quantize(torch.nn.Sequential(lin), [[torch.randn(8, 64)]], scheme="w8a16",
                             disable_last_layer=False, progress=False).get_submodule("0")
    calls = []
    fused = QLinear._fused_gemv
    x = torch.randn(1, 64)
    monkeypatch.setattr(QLinear, "_fused_gemv", lambda self, x: calls.append(fused(self, x)) or calls[-1])
    assert layer.gemv_in_c == (c_kernels.compiler() is not None)  # eager: the C kernel where it builds
    torch._dynamo.reset()
    with torch.no_grad():
        eager, compiled = layer(x), torch.compile(layer, backend="eager")(x)
    assert calls == [False, True]  # eager: not the compiled form; compiled: the fused GEMV
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not __import__("fxquant.kernels.onednn_split", fromlist=["x"]).available(),
                    reason="this torch build has no oneDNN quantized linear")
def test_onednn_split_layer_cache_follows_its_codes_through_copies_and_compile():
    """The "onednn_split" operands are a per-layer cache of the int8 codes: built at freeze,
    rebuilt when the codes change and by deepcopy and unpickling (never copied), used by
    torch.compile."""
    import fxquant

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    q = fxquant.quantize(model, [[torch.randn(16, 256) * 4]], scheme="w8a8_dynamic", progress=False)
    layer = q.get_submodule("0")
    layer.kernel = "onednn_split"
    x = torch.randn(9, 256) * 4
    x[:, :4] *= 30  # per-token outliers: codes beyond the 7-bit part
    with torch.no_grad():
        out = layer(x)
        cached = layer.__dict__["_packed"]
        assert layer(x) is not None and layer.__dict__["_packed"] is cached
        layer.kernel = "fp64"
        torch.testing.assert_close(out, layer(x), rtol=1e-6, atol=1e-6)
        layer.kernel = "onednn_split"
        layer.weight_codes.mul_(-1)  # new codes: the cache must not serve the old ones
        flipped = layer(x)
        assert layer.__dict__["_packed"] is not cached
        layer.kernel = "fp64"
        torch.testing.assert_close(flipped, layer(x), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(flipped, out)
        layer.kernel = "onednn_split"
        assert_copies_rebuild_the_cache(layer, x, flipped)
