"""libggml's block quantizers through ctypes (needs the `llama` extra)."""
import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: pip install 'cvxq-export[llama]'")
pytest.importorskip("gguf", reason="gguf not installed")

from cvxq_export.formats.gguf.ggml_quant import dequantize_rows, quantize_rows, row_bytes  # noqa: E402


@pytest.fixture
def weights():
    rng = np.random.default_rng(0)
    return rng.laplace(0, 0.02, (64, 256)).astype(np.float32), rng.random((64, 256)).astype(np.float32) ** 4


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                                  "IQ4_XS"])
def test_sizes_and_roundtrip(name, weights):
    w, imp = weights
    q = quantize_rows(name, w, imp)
    assert q.shape == (64, row_bytes(name, 256))
    d = dequantize_rows(name, q, 256)
    assert d.shape == w.shape
    assert np.mean((d - w) ** 2) < 0.2 * w.var()


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "IQ4_NL", "Q3_K", "Q4_K"])
def test_importance_lowers_weighted_error(name, weights):
    w, imp = weights
    plain = dequantize_rows(name, quantize_rows(name, w), 256)
    weighted = dequantize_rows(name, quantize_rows(name, w, imp), 256)
    assert np.sum(imp * (weighted - w) ** 2) < np.sum(imp * (plain - w) ** 2)


def test_bad_row_length():
    with pytest.raises(ValueError, match="multiple of its block"):
        row_bytes("Q4_K", 576)


def test_newer_types_match_libggml_and_q2_0_search_beats_amax():
    from cvxq_export.formats.gguf import ggml_quant

    for name, (_tid, block, size) in ggml_quant.NEWER_TYPES.items():
        assert ggml_quant.ggml_traits(name) == (block, size)
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 576)) * 0.02).astype(np.float32)
    raw = ggml_quant.quantize_rows("Q2_0", w)
    deq = ggml_quant.dequantize_rows_ggml("Q2_0", raw, 576)
    # the documented layout: fp16 d, then codes 4 per byte lowest bits first, value (q - 1) * d
    blocks = raw.reshape(-1, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [blocks, 1]
    q = (blocks[:, 2:, None] >> np.array([0, 2, 4, 6], dtype=np.uint8)) & 3  # [blocks, 16, 4]
    assert np.array_equal(deq.reshape(-1, 64), ((q.reshape(-1, 64).astype(np.float32) - 1) * d))
    # libggml's own Q2_0 quantizer (d = max|w|, meant for ternary models) is much worse on Gaussian weights
    lib = ggml_quant._lib()
    own = np.zeros_like(raw)
    lib.ggml_quantize_chunk(ggml_quant.type_id("Q2_0"), w.ctypes.data, own.ctypes.data, 0, 16, 576, None)
    err_ours = float(((deq - w) ** 2).mean())
    err_ggml = float(((ggml_quant.dequantize_rows_ggml("Q2_0", own, 576) - w) ** 2).mean())
    assert err_ours < 0.5 * err_ggml


def _correlated_inputs(n: int, seed: int = 1) -> np.ndarray:
    """H = E[x x^T] of inputs with strongly correlated columns (as in real layers)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(n, n)) / np.sqrt(n)
    x = rng.normal(size=(2048, n)) @ mix + 0.3 * rng.normal(size=(2048, n))  # [tokens, n]
    return x.T @ x / len(x)


@pytest.mark.parametrize("name", ["Q4_0", "IQ4_NL", "MXFP4", "Q3_K"])
def test_error_feedback_lowers_output_error_and_stays_exact(name, weights):
    from cvxq_export.formats.gguf.ggml_feedback import quantize_rows_feedback
    from cvxq_export.formats.gguf.ggml_quant import dequantize_rows_ggml

    rng = np.random.default_rng(2)
    n = 512  # two 256-blocks for the K-quants: feedback needs a later block to push into
    w, imp = rng.laplace(0, 0.02, (64, n)).astype(np.float32), rng.random((64, n)).astype(np.float32) ** 4
    h = _correlated_inputs(n)
    plain = dequantize_rows(name, quantize_rows(name, w, imp), n)
    raw, deq = quantize_rows_feedback(name, w, imp, h)
    # the values we report are what llama.cpp's own dequantizer reads from the bytes
    assert raw.shape == (64, row_bytes(name, n))
    assert np.array_equal(dequantize_rows_ggml(name, raw, n), deq)

    def output_error(q):  # sum over rows of (w - q) H (w - q)^T = E ||(w - q) x||^2
        return float(np.einsum("ij,jk,ik->", w - q, h, w - q))

    assert output_error(deq) < 0.85 * output_error(plain)


def test_error_feedback_with_uncorrelated_inputs_is_plain_rounding(weights):
    """With H = I nothing can be compensated: feedback must change nothing."""
    from cvxq_export.formats.gguf.ggml_feedback import quantize_rows_feedback

    w, imp = weights
    raw, deq = quantize_rows_feedback("Q4_0", w, imp, np.eye(256))
    # block by block, each block's scale from libggml (its row statistics then cover one block)
    blockwise = np.concatenate([quantize_rows("Q4_0", w[:, s:s + 32], imp[:, s:s + 32]) for s in range(0, 256, 32)], axis=1)
    plain = dequantize_rows("Q4_0", blockwise, 256)
    # same scales; every weight takes its nearest level, so never further than libggml's code
    assert np.array_equal(raw.reshape(64, 8, 18)[:, :, :2], blockwise.reshape(64, 8, 18)[:, :, :2])
    assert np.all(np.abs(w - deq) <= np.abs(w - plain) + 1e-7)


@pytest.mark.parametrize("name", ["IQ4_NL", "Q4_K"])
def test_energy_order_keeps_row_layout_and_lowers_output_error(name):
    """Blocks fixed from the largest input energy down: the bytes still decode in row
    order to exactly the values returned, and the output error is no worse than left to
    right when a few blocks carry most of the input energy."""
    from cvxq_export.formats.gguf.ggml_feedback import quantize_rows_feedback
    from cvxq_export.formats.gguf.ggml_quant import dequantize_rows_ggml

    rng = np.random.default_rng(5)
    n = 1024
    w, imp = rng.laplace(0, 0.02, (32, n)).astype(np.float32), rng.random((32, n)).astype(np.float32) ** 4
    scale = np.repeat(rng.choice([0.2, 1.0, 4.0], n // 32), 32)  # per-32-column input scale
    h = _correlated_inputs(n, seed=6) * np.outer(scale, scale)

    def output_error(q):
        return float(np.einsum("ij,jk,ik->", w - q, h, w - q))

    raw_e, deq_e = quantize_rows_feedback(name, w, imp, h, order="energy")
    raw_n, deq_n = quantize_rows_feedback(name, w, imp, h, order="natural")
    assert np.array_equal(dequantize_rows_ggml(name, raw_e, n), deq_e)
    assert raw_e.shape == raw_n.shape
    assert output_error(deq_e) <= 1.01 * output_error(deq_n)
    with pytest.raises(ValueError, match="order"):
        quantize_rows_feedback(name, w, imp, h, order="random")
