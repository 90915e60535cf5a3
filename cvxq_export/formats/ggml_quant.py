"""ggml block quantization through libggml, the library llama.cpp itself uses.

``llama-cpp-python`` builds ``libggml-base``, which exports
``ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix)``:
every block type's maintained quantizer, each taking an importance vector
over the row (llama.cpp feeds it activation energy from an imatrix; we feed
CVXQ output sensitivities). Dequantization is gguf-py's NumPy code, which
reads the same bytes llama.cpp reads, so "what we measured" is "what runs".
"""
from __future__ import annotations

import ctypes
import glob
import os
from functools import lru_cache

import numpy as np

from ..errors import missing_extra


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    try:
        import llama_cpp
    except ImportError:
        raise missing_extra("llama_cpp", "llama") from None
    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    candidates = sorted(glob.glob(os.path.join(libdir, "libggml-base.so*")) + glob.glob(os.path.join(libdir, "libggml-base.dylib")))
    if not candidates:
        raise missing_extra("llama_cpp (libggml-base)", "llama")
    lib = ctypes.CDLL(candidates[0])
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return lib


def type_id(name: str) -> int:
    import gguf

    return int(gguf.GGMLQuantizationType[name])


def block_size(name: str) -> int:
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]][0]


def row_bytes(name: str, n_per_row: int) -> int:
    """Exact bytes of one row of ``n_per_row`` weights in type ``name`` (gguf-py's table)."""
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
    if n_per_row % block:
        raise ValueError(f"{name}: row of {n_per_row} is not a multiple of its block {block}")
    return n_per_row // block * type_size


def requires_importance(name: str) -> bool:
    return bool(_lib().ggml_quantize_requires_imatrix(type_id(name)))


def quantize_rows(name: str, w: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """Quantize ``w`` ``[rows, n]`` float32 to ggml type ``name`` -> ``[rows, row_bytes]`` uint8.

    ``importance`` is ``[rows, n]`` (per-weight, e.g. CVXQ G^2) or ``[n]`` (shared by
    all rows, like llama.cpp's imatrix) or None. Rows with distinct importance are
    quantized one call per row.
    """
    if name in ("F32", "F16", "BF16"):
        raise ValueError("float types are not block-quantized")
    lib = _lib()
    tid = type_id(name)
    lib.ggml_quantize_init(tid)
    w = np.ascontiguousarray(w, dtype=np.float32)
    rows, n = w.shape
    rb = row_bytes(name, n)
    out = np.zeros((rows, rb), dtype=np.uint8)
    if importance is None or importance.ndim == 1:
        imp = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
        written = lib.ggml_quantize_chunk(tid, w.ctypes.data, out.ctypes.data, 0, rows, n,
                                          None if imp is None else imp.ctypes.data)
        assert written == rows * rb
        return out
    imp = np.ascontiguousarray(importance, dtype=np.float32)
    for r in range(rows):
        lib.ggml_quantize_chunk(tid, w[r].ctypes.data, out[r].ctypes.data, 0, 1, n, imp[r].ctypes.data)
    return out


def dequantize_rows(name: str, data: np.ndarray, n_per_row: int) -> np.ndarray:
    """gguf-py's dequantization: ``[rows, row_bytes]`` uint8 -> ``[rows, n]`` float32."""
    import gguf

    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[name]).reshape(data.shape[0], n_per_row).astype(np.float32)
