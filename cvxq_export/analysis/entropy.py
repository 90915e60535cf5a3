"""Order-0 (memoryless) entropy of byte buffers and of quantized code arrays.

For a source whose symbols occur with frequencies ``p_i`` the order-0 entropy is
``H = -sum_i p_i log2 p_i`` bits per symbol; ``n * H / 8`` bytes is the smallest
size any coder that treats the symbols as independent and identically
distributed can reach (the model / table that a real coder also stores is not
included). Coders that exploit context (zstd's matches, brotli's context
modelling) can go below it on structured data; on quantized weights, whose
bytes are close to independent, it is a tight bound.

NumPy only.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

_BLOCK = 1 << 24  # bytes per bincount call for large (memory-mapped) buffers


@dataclass(frozen=True)
class EntropyResult:
    """Order-0 entropy of ``n_symbols`` symbols from an alphabet of ``alphabet_size``."""

    bits_per_symbol: float
    n_symbols: int
    alphabet_size: int
    bound_bytes: int  # ceil(n_symbols * bits_per_symbol / 8): the order-0 lower bound
    raw_bits_per_symbol: float  # log2(alphabet_size): a fixed-width (bit-packed) code
    distinct_symbols: int

    @property
    def raw_bytes(self) -> int:
        """Bytes of the symbols bit-packed at ``raw_bits_per_symbol`` (rounded up)."""
        return math.ceil(self.n_symbols * self.raw_bits_per_symbol / 8)

    @property
    def efficiency(self) -> float:
        """Entropy / fixed-width bits: 1.0 means nothing to gain from entropy coding."""
        return self.bits_per_symbol / self.raw_bits_per_symbol if self.raw_bits_per_symbol else 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["raw_bytes"] = self.raw_bytes
        d["efficiency"] = self.efficiency
        return d


def _as_uint8(data) -> np.ndarray:
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            data = np.ascontiguousarray(data).view(np.uint8)
        return data.reshape(-1)
    return np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)


def byte_histogram(data) -> np.ndarray:
    """Counts of each byte value (length 256, int64) of a bytes-like object or uint8 array.

    Large buffers (e.g. a ``np.memmap`` of a whole model file) are counted in
    16 MiB blocks so no large temporary is made.
    """
    arr = _as_uint8(data)
    counts = np.zeros(256, dtype=np.int64)
    for start in range(0, len(arr), _BLOCK):
        counts += np.bincount(arr[start : start + _BLOCK], minlength=256)
    return counts


def entropy_from_counts(counts) -> float:
    """Order-0 entropy in bits per symbol of a histogram (0.0 for an empty one)."""
    c = np.asarray(counts, dtype=np.float64).reshape(-1)
    total = c.sum()
    if total <= 0:
        return 0.0
    p = c[c > 0] / total
    h = float(-(p * np.log2(p)).sum())
    return max(h, 0.0)  # -0.0 for a constant source


def _result(counts: np.ndarray, alphabet_size: int) -> EntropyResult:
    n = int(counts.sum())
    h = entropy_from_counts(counts)
    return EntropyResult(bits_per_symbol=h, n_symbols=n, alphabet_size=alphabet_size,
                         bound_bytes=math.ceil(n * h / 8 - 1e-9) if n else 0,
                         raw_bits_per_symbol=math.log2(alphabet_size) if alphabet_size > 1 else 0.0,
                         distinct_symbols=int((counts > 0).sum()))


def byte_entropy(data) -> EntropyResult:
    """Order-0 entropy of a byte buffer (bytes, bytearray, memoryview or uint8 array)."""
    return _result(byte_histogram(data), 256)


def code_entropy(codes, alphabet_size: int) -> EntropyResult:
    """Order-0 entropy of integer codes in ``[0, alphabet_size)``.

    For quantized weights at ``b`` bits pass ``alphabet_size = 2**b``; the result's
    ``raw_bits_per_symbol`` is then ``b`` and ``bound_bytes`` the smallest an
    order-0 entropy coder could store the codes in (vs ``raw_bytes`` bit-packed).
    Signed codes must be offset into range first (e.g. ``codes + 2**(b-1)``).
    """
    if alphabet_size < 1:
        raise ValueError(f"alphabet_size must be >= 1, got {alphabet_size}")
    arr = np.asarray(codes).reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {arr.dtype}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= alphabet_size:
            raise ValueError(f"codes span [{lo}, {hi}], outside the alphabet [0, {alphabet_size})")
    counts = np.bincount(arr.astype(np.int64, copy=False), minlength=alphabet_size) if arr.size \
        else np.zeros(alphabet_size, dtype=np.int64)
    return _result(counts, alphabet_size)


def bits_alphabet(bits: int) -> int:
    """Alphabet size of ``bits``-bit codes."""
    return 1 << int(bits)
