"""libggml's block quantizers through ctypes (needs the `llama` extra)."""
import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: pip install 'cvxq-export[llama]'")
pytest.importorskip("gguf", reason="gguf not installed")

from cvxq_export.formats.ggml_quant import dequantize_rows, quantize_rows, row_bytes  # noqa: E402


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
