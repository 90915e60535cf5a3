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

from ...errors import missing_extra
from ...gguf_header import NEWER_TYPES  # types gguf-py does not know yet: one table for the reader and here
from ...quantizers import worker_count


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




def gguf_py_knows(name: str) -> bool:
    import gguf

    return name in gguf.GGMLQuantizationType.__members__


def type_id(name: str) -> int:
    import gguf

    if name in NEWER_TYPES:
        return NEWER_TYPES[name][0]
    return int(gguf.GGMLQuantizationType[name])


def type_name(type_id_: int) -> str:
    import gguf

    for name, (tid, *_rest) in NEWER_TYPES.items():
        if tid == type_id_:
            return name
    return gguf.GGMLQuantizationType(type_id_).name


def block_size(name: str) -> int:
    return _sizes(name)[0]


def _sizes(name: str) -> tuple[int, int]:
    import gguf

    if name in NEWER_TYPES:
        return NEWER_TYPES[name][1:]
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]


def row_bytes(name: str, n_per_row: int) -> int:
    """Exact bytes of one row of ``n_per_row`` weights in type ``name``."""
    block, type_size = _sizes(name)
    if n_per_row % block:
        raise ValueError(f"{name}: row of {n_per_row} is not a multiple of its block {block}")
    return n_per_row // block * type_size


def requires_importance(name: str) -> bool:
    return bool(_lib().ggml_quantize_requires_imatrix(type_id(name)))


# Rows quantized per worker task: below this many weights a call is too short for a
# second thread to pay for its hand-off.
_MIN_TASK_WEIGHTS = 1 << 14


@lru_cache(maxsize=1)
def _pool():
    """Threads for libggml calls: ``ggml_quantize_chunk`` is thread-safe (llama.cpp's
    quantizer runs it on many threads) and ctypes releases the GIL during the call."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=worker_count(), thread_name_prefix="ggml-quant")


def quantize_rows(name: str, w: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """Quantize ``w`` ``[rows, n]`` float32 to ggml type ``name`` -> ``[rows, row_bytes]`` uint8.

    ``importance`` is ``[rows, n]`` (per-weight, e.g. CVXQ G^2) or ``[n]`` (shared by
    all rows, like llama.cpp's imatrix) or None. Rows with distinct importance are
    quantized one call per row. Large tensors are split by rows over :func:`worker_count`
    threads (each row's bytes depend on that row alone, so the result is the same).
    """
    if name in ("F32", "F16", "BF16"):
        raise ValueError("float types are not block-quantized")
    if name == "Q2_0":
        return quantize_rows_q2_0(w, importance)
    lib = _lib()
    tid = type_id(name)
    lib.ggml_quantize_init(tid)  # builds the IQ grids once, before any worker uses them
    w = np.ascontiguousarray(w, dtype=np.float32)
    rows, n = w.shape
    rb = row_bytes(name, n)
    out = np.zeros((rows, rb), dtype=np.uint8)
    per_row = importance is not None and importance.ndim == 2
    imp = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    quantize = lib.ggml_quantize_chunk
    w_at, out_at, imp_at = w.ctypes.data, out.ctypes.data, None if imp is None else imp.ctypes.data
    row_in = n * 4  # bytes of one float32 input row (and of one importance row)

    def run(lo: int, hi: int) -> None:
        if not per_row:  # one call: the rows share the importance vector (or have none)
            written = quantize(tid, w_at + lo * row_in, out_at + lo * rb, 0, hi - lo, n, imp_at)
            assert written == (hi - lo) * rb
            return
        for r in range(lo, hi):  # pointers by arithmetic: no array views or ctypes objects per row
            quantize(tid, w_at + r * row_in, out_at + r * rb, 0, 1, n, imp_at + r * row_in)

    workers = min(worker_count(), rows * n // _MIN_TASK_WEIGHTS)
    if workers <= 1:
        run(0, rows)
        return out
    bounds = np.linspace(0, rows, workers + 1).astype(int)
    for f in [_pool().submit(run, int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]:
        f.result()
    return out


def dequantize_rows(name: str, data: np.ndarray, n_per_row: int) -> np.ndarray:
    """``[rows, row_bytes]`` uint8 -> ``[rows, n]`` float32: gguf-py's NumPy code where
    gguf-py knows the type, otherwise libggml's own ``to_float`` (llama.cpp's code)."""
    import gguf

    if not gguf_py_knows(name):
        return dequantize_rows_ggml(name, data, n_per_row)
    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[name]).reshape(data.shape[0], n_per_row).astype(np.float32)


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits (ggml.h): the fields up to the dequantizer
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def _traits(name: str) -> _TypeTraits:
    lib = _lib()
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib.ggml_get_type_traits(type_id(name)).contents


def ggml_traits(name: str) -> tuple[int, int]:
    """(block size, bytes per block) as libggml reports them."""
    t = _traits(name)
    return int(t.blck_size), int(t.type_size)


@lru_cache(maxsize=None)
def _to_float(name: str):
    traits = _traits(name)
    if not traits.to_float:
        raise ValueError(f"libggml has no dequantizer for {name}")
    return _TO_FLOAT(traits.to_float)


def dequantize_rows_ggml(name: str, data: np.ndarray, n_per_row: int) -> np.ndarray:
    """libggml's reference dequantizer (the code llama.cpp runs) for any type: one C call,
    where gguf-py's NumPy code loops over groups of 16 rows (the read-back checks that the two
    agree bit for bit, so the menu and the feedback may use either)."""
    to_float = _to_float(name)
    data = np.ascontiguousarray(data, dtype=np.uint8)
    out = np.empty((data.shape[0], n_per_row), dtype=np.float32)
    to_float(data.ctypes.data, out.ctypes.data, out.size)
    return out


# Q2_0 (libggml type 42): blocks of 64 weights, an fp16 scale d, 2-bit codes q
# (four per byte, lowest bits first), value = (q - 1) * d, i.e. the grid
# {-1, 0, 1, 2} * d. libggml's own quantizer sets d = max|w| (it targets
# ternary models), which wastes two of the four levels on ordinary weights.
# Ours searches d, both signs (a negative d mirrors the grid to {-2, -1, 0, 1}
# * |d|), for the least importance-weighted squared error, then refits d by
# least squares once. The bytes are plain Q2_0: libggml dequantizes them
# (checked bit-exact in the read-back).
_Q2_0_SCALES = np.linspace(0.25, 1.0, 16, dtype=np.float32)


def _q2_0_codes(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Nearest grid codes ``[..., 64]`` for scales ``d`` broadcast over the block."""
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    return np.clip(np.rint(x * inv) + 1.0, 0.0, 3.0)


def quantize_rows_q2_0(w: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    rows, n = w.shape
    qk = 64
    x = np.ascontiguousarray(w, dtype=np.float32).reshape(-1, qk)  # [blocks, 64]
    imp = np.ones_like(x) if importance is None else np.broadcast_to(importance, w.shape).reshape(-1, qk).astype(np.float32)
    amax = np.abs(x).max(1, keepdims=True)  # [blocks, 1]
    best_err = np.full(x.shape[0], np.inf, dtype=np.float64)
    best_d = np.zeros(x.shape[0], dtype=np.float32)
    for sign in (1.0, -1.0):
        for s in _Q2_0_SCALES:
            d = (sign * s * amax).astype(np.float32)  # [blocks, 1]
            q = _q2_0_codes(x, d)
            # least-squares refit of d for these codes
            lv = q - 1.0
            den = (imp * lv * lv).sum(1, keepdims=True)
            d_fit = np.where(den > 0, (imp * lv * x).sum(1, keepdims=True) / np.maximum(den, 1e-30), d).astype(np.float32)
            d_fit = d_fit.astype(np.float16).astype(np.float32)
            q = _q2_0_codes(x, d_fit)
            err = (imp * (x - (q - 1.0) * d_fit) ** 2).sum(1)
            better = err < best_err
            best_err[better], best_d[better] = err[better], d_fit[better, 0]
    d16 = best_d.astype(np.float16)
    q = _q2_0_codes(x, d16.astype(np.float32)[:, None]).astype(np.uint8).reshape(-1, 16, 4)  # [blocks, 16, 4]
    qs = q[..., 0] | (q[..., 1] << 2) | (q[..., 2] << 4) | (q[..., 3] << 6)  # element j -> byte j//4, bits 2*(j%4)
    blocks = np.concatenate([d16.view(np.uint8).reshape(-1, 2), qs.astype(np.uint8)], axis=1)  # [blocks, 18]
    return blocks.reshape(rows, n // qk * 18)
