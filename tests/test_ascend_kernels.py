import pytest
import torch

from fxquant.kernels import ascend_ops, decode_scale, encode_scale_int64, reference_ops


def test_reference_is_used_without_torch_npu():
    ops = ascend_ops()
    try:
        import torch_npu  # noqa: F401
    except ImportError:
        assert ops.backend == "reference"
    assert reference_ops().backend == "reference"


def test_int64_scale_round_trip():
    s = torch.tensor([0.5, 1e-3, 3.25e-5], dtype=torch.float32)
    packed = encode_scale_int64(s)
    assert packed.dtype == torch.int64
    assert torch.equal(decode_scale(packed), s)


def test_npu_quantize_rounds_offset_together():
    ops = reference_ops()
    x = torch.tensor([[0.25, 0.75, -1.0, 100.0]])
    q = ops.npu_quantize(x, torch.tensor([0.5]), torch.tensor([3.0]), torch.qint8, -1, True)
    # x/s + zp = 3.5, 4.5, 1, 203 -> half-to-even 4, 4, 1, clamp 127
    assert q.tolist() == [[4, 4, 1, 127]] and q.dtype == torch.int8
    qm = ops.npu_quantize(x, torch.tensor([2.0]), None, torch.qint8, -1, False)
    assert qm.tolist() == [[0, 2, -2, 127]]


def test_npu_quant_matmul_matches_integer_math():
    torch.manual_seed(0)
    ops = reference_ops()
    x1 = torch.randint(-128, 128, (3, 5, 64), dtype=torch.int8)
    x2 = torch.randint(-128, 128, (64, 7), dtype=torch.int8)
    bias = torch.randint(-1000, 1000, (7,), dtype=torch.int32)
    scale = torch.rand(7) * 1e-3
    exact = (x1.double() @ x2.double() + bias.double()) * scale.double()
    for s in (scale, encode_scale_int64(scale)):
        y = ops.npu_quant_matmul(x1, x2, s, bias=bias, output_dtype=torch.float32)
        assert y.shape == (3, 5, 7)
        assert torch.allclose(y.double(), exact, rtol=1e-6)
    tok = torch.rand(15) + 0.5
    y = ops.npu_quant_matmul(x1.reshape(15, 64), x2, scale, pertoken_scale=tok, output_dtype=torch.float32)
    assert torch.allclose(y.double(), (x1.reshape(15, 64).double() @ x2.double()) * scale.double() * tok.double()[:, None],
                          rtol=1e-6)


def test_npu_dynamic_quant_per_token():
    x = torch.randn(4, 6, 32)
    q, s = reference_ops().npu_dynamic_quant(x)
    assert q.dtype == torch.int8 and s.shape == (4, 6)
    assert torch.allclose(s, x.abs().amax(-1) / 127)
    assert (q.float() * s[..., None] - x).abs().max() <= s.max() / 2 + 1e-6


@pytest.mark.parametrize("group", [0, 16])
def test_npu_weight_quant_batchmatmul(group):
    torch.manual_seed(0)
    k, n = 64, 8
    w = torch.randint(-8, 8, (k, n), dtype=torch.int8)
    rows = k // group if group else 1
    scale = torch.rand(rows, n) * 0.1
    offset = torch.randint(-3, 3, (rows, n)).float()
    x = torch.randn(2, 3, k)
    y = reference_ops().npu_weight_quant_batchmatmul(x, w, scale if group else scale.reshape(-1),
                                                     offset if group else offset.reshape(-1),
                                                     antiquant_group_size=group)
    full_s = scale.repeat_interleave(group, 0) if group else scale
    full_o = offset.repeat_interleave(group, 0) if group else offset
    assert torch.allclose(y, x @ ((w.float() + full_o) * full_s), atol=1e-5)


@pytest.mark.parametrize("quant_type, groups, biased", [("W8A16", 1, True), ("W4A16", 4, False), ("W4A16", 1, True)])
def test_weight_only_runtime_gemv_follows_the_saved_offsets(quant_type, groups, biased):
    """Asymmetric saved weights ((Wq + offset) * scale, per channel or per group): the reloaded
    layer's C GEMV gives the reference op's values, rows 1 to 8, and the op's beyond."""
    from fxquant.formats.ascend_modules import AscendWeightOnlyLinear

    torch.manual_seed(0)
    n, k, (lo, hi) = 32, 128, ((-128, 128) if quant_type == "W8A16" else (-8, 8))
    tensors = {"weight": torch.randint(lo, hi, (n, k), dtype=torch.int8),
               "weight_scale": torch.rand(n, groups) / 50 + 1e-3,
               "weight_offset": torch.randint(-5, 6, (n, groups)).float(),
               "bias": torch.randn(n) if biased else None}
    layer = AscendWeightOnlyLinear(tensors, reference_ops(), quant_type)
    assert layer.codes_blocked and torch.equal(layer.weight_codes(), tensors["weight"])
    for rows in (1, 5, 8, 9):
        x = torch.randn(rows, k)
        with torch.no_grad():
            fast = layer(x)
            layer.row_kernels = False
            ref = layer(x)
            layer.row_kernels = True
        assert (layer.row_kernel(x) is not None) == (rows <= 8)
        assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
