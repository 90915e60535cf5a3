import numpy as np
import pytest
import torch

from cvxq_export.quantizers import (COMPANDED, UNIFORM, bias_correction, dequantize_companded, dequantize_uniform,
                                    laplace_table_np, quantize, quantize_companded, quantize_uniform, quantize_zero,
                                    rtn_groupwise)


@pytest.fixture
def units():
    torch.manual_seed(0)
    return torch.distributions.Laplace(0.01, 0.02).sample((2000, 64))


def test_uniform_error_bound_without_clipping(units):
    for bits in range(1, 9):
        q = quantize_uniform(units, bits, clip_grid=(1.0,))
        step = q.scale.float()[:, None]
        # fp16 rounding of offset/scale can push the end levels by a hair; allow 1 % of a step
        assert torch.all((q.dequant - units).abs() <= step * 0.51 + 1e-6), bits
        assert int(q.codes.max()) <= (1 << bits) - 1


def test_error_falls_with_bits(units):
    for kind in (UNIFORM, COMPANDED):
        errs = [float(((quantize(units, b, kind).dequant - units) ** 2).mean()) for b in range(0, 9)]
        assert all(a > b for a, b in zip(errs, errs[1:])), (kind, errs)
        assert errs[8] < 1e-3 * errs[0]


def test_clipping_search_never_worse_than_minmax(units):
    for bits in (2, 3, 4):
        full = quantize_uniform(units, bits, clip_grid=(1.0,))
        searched = quantize_uniform(units, bits)
        assert float(((searched.dequant - units) ** 2).sum()) <= float(((full.dequant - units) ** 2).sum())


def test_zero_bits_collapses_to_weighted_mean():
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.5, 0.5, 0.5, 0.5]])
    q = quantize_zero(x)
    assert torch.all(q.dequant == q.offset.float()[:, None])
    assert q.offset.float().tolist() == [3.0, 0.5]
    w = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    assert float(quantize_zero(x, w).offset[0]) == 4.5


def test_dequant_matches_stored_parameters(units):
    """What a reader reconstructs from codes + fp16 params equals dequant bit for bit."""
    for bits in (1, 3, 8):
        u = quantize_uniform(units, bits)
        assert torch.equal(dequantize_uniform(u.codes, u.offset, u.scale), u.dequant)
        c = quantize_companded(units, bits)
        assert torch.equal(dequantize_companded(c.codes, c.offset, c.scale, bits), c.dequant)


def test_laplace_table_symmetric_and_increasing():
    for bits in range(1, 9):
        t = laplace_table_np(bits)
        assert len(t) == 1 << bits
        assert np.all(np.diff(t) > 0)
        np.testing.assert_allclose(t, -t[::-1], atol=1e-6)


def test_companded_beats_uniform_on_laplace_at_low_bits(units):
    for bits in (2, 3):
        u = float(((quantize_uniform(units, bits).dequant - units) ** 2).sum())
        c = float(((quantize_companded(units, bits).dequant - units) ** 2).sum())
        assert c < u * 1.02


def test_bias_correction_preserves_mean_output():
    torch.manual_seed(3)
    w = torch.randn(8, 16)
    w_hat = w + 0.1 * torch.randn(8, 16)
    b = torch.randn(8)
    x_mean = torch.randn(16)
    b_new = bias_correction(b, w, w_hat, x_mean)
    torch.testing.assert_close(w_hat @ x_mean + b_new, w @ x_mean + b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias_correction(None, w, w_hat, x_mean), (w - w_hat) @ x_mean)


def test_rtn_groupwise_is_lossless_on_its_own_grid():
    torch.manual_seed(4)
    scale = torch.rand(4, 2, 1) + 0.5
    codes = torch.randint(0, 16, (4, 2, 64)).float()
    codes[..., 0], codes[..., 1] = 0, 15  # min and max present in every group
    w = (codes * scale).reshape(4, 128).half().float()
    out = rtn_groupwise(w, 4, 64)
    assert float((out - w).abs().max()) < 1e-2 * float(scale.max())


@pytest.mark.parametrize("kind", ["uniform", "companded"])
def test_chunked_quantization_is_the_whole_tensor_quantization(kind, monkeypatch):
    """Units are quantized in cache-sized chunks: codes, fp16 parameters and dequantized
    values are exactly those of one pass over every unit."""
    import cvxq_export.quantizers as q

    torch.manual_seed(0)
    x, w = torch.randn(5000, 64), torch.rand(5000, 64)
    fn = q.quantize_uniform if kind == "uniform" else q.quantize_companded
    monkeypatch.setattr(q, "CHUNK_ELEMENTS", 1 << 12)  # 64 units per chunk: 79 chunks
    chunked = fn(x, 3, w)
    monkeypatch.setattr(q, "CHUNK_ELEMENTS", 1 << 30)
    whole = fn(x, 3, w)
    for field in ("codes", "offset", "scale", "dequant"):
        assert torch.equal(getattr(chunked, field), getattr(whole, field)), field
