"""Lossless codecs for model files, and their measurement on this machine.

Registry (name: package, setting):

==========  ==============  =============================================
zstd-1      ``zstandard``   level 1
zstd-3      ``zstandard``   level 3 (zstd's default)
zstd-9      ``zstandard``   level 9
zstd-19     ``zstandard``   level 19 (slow to compress, decodes as fast)
lz4         ``lz4``         LZ4 frame, default (fast) level
brotli-5    ``brotli``      quality 5
brotli-11   ``brotli``      quality 11 (very slow to compress)
ans         ``constriction``  order-0 rANS (``constriction.stream.stack.AnsCoder``)
==========  ==============  =============================================

Each package is an optional dependency (``pip install 'cvxq-export[analysis]'``),
imported on first use; :meth:`Codec.skip_reason` says why a codec cannot run.

The ``ans`` codec's stream layout (little endian), so that its size includes
the cost of its model::

    u64 n_symbols
    u8  table kind: 0 = dense, 1 = sparse
    dense : 256 x u16 frequencies
    sparse: u16 k, then k x (u8 byte value, u16 frequency)
    the ANS words, u32 each

The frequencies are the byte histogram scaled so the largest count is 65535
(non-zero counts stay >= 1); encoder and decoder build the same
``constriction.stream.model.Categorical`` from them.

``ratio`` everywhere in this package is ``compressed / raw`` (1.0: nothing
gained; 0.25: a quarter of the size), and MB means 10**6 bytes, as in the device
profiles' ``storage_read_mb_s``.
"""
from __future__ import annotations

import importlib
import mmap
import struct
import threading
from contextlib import nullcontext
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from .entropy import byte_histogram, entropy_from_counts


@dataclass(frozen=True)
class Codec:
    name: str
    family: str  # "zstd", "lz4", "brotli", "ans"
    module: str  # import name of the optional package
    package: str  # pip name of the optional package
    level: int | None = None
    slow: bool = False  # compresses at a few MB/s or less: analyses sample less data for it
    description: str = ""

    def skip_reason(self) -> str | None:
        """None when usable, else why not (the package is missing)."""
        try:
            _module(self.module)
        except ImportError as exc:
            return f"codec {self.name} needs the optional package '{self.package}' ({exc}); " \
                   f"pip install {self.package}  (or: pip install 'cvxq-export[analysis]')"
        return None

    @property
    def available(self) -> bool:
        return self.skip_reason() is None

    def compress(self, data) -> bytes:
        return _IMPL[self.family][0](self, data)

    def decompress(self, blob) -> bytes:
        return _IMPL[self.family][1](self, blob)


_MODULES: dict[str, object] = {}
_LOCAL = threading.local()  # per-thread (de)compressor contexts: zstd's are not thread-safe


def _module(name: str):
    if name not in _MODULES:
        _MODULES[name] = importlib.import_module(name)
    return _MODULES[name]


# --------------------------------------------------------------------------- implementations


def _zstd_compress(codec: Codec, data) -> bytes:
    key = f"zc{codec.level}"
    ctx = getattr(_LOCAL, key, None)
    if ctx is None:
        ctx = _module("zstandard").ZstdCompressor(level=codec.level)
        setattr(_LOCAL, key, ctx)
    return ctx.compress(data)


def _zstd_decompress(codec: Codec, blob) -> bytes:
    ctx = getattr(_LOCAL, "zd", None)
    if ctx is None:
        ctx = _LOCAL.zd = _module("zstandard").ZstdDecompressor()
    return ctx.decompress(blob)


def _lz4_compress(codec: Codec, data) -> bytes:
    return _module("lz4.frame").compress(data, store_size=True)


def _lz4_decompress(codec: Codec, blob) -> bytes:
    return _module("lz4.frame").decompress(blob)


def _brotli_compress(codec: Codec, data) -> bytes:
    return _module("brotli").compress(bytes(data), quality=codec.level)


def _brotli_decompress(codec: Codec, blob) -> bytes:
    return _module("brotli").decompress(bytes(blob))


def _ans_table(counts: np.ndarray) -> np.ndarray:
    """Histogram -> u16 frequencies (max 65535, non-zero counts stay >= 1)."""
    counts = np.asarray(counts, dtype=np.float64)
    top = counts.max() if counts.size else 0.0
    if top <= 0:
        return np.zeros(256, dtype=np.uint16)
    q = np.rint(counts * (65535.0 / top))
    q[(counts > 0) & (q < 1)] = 1
    return q.astype(np.uint16)


def _ans_model(freq: np.ndarray):
    model = _module("constriction").stream.model
    probs = freq.astype(np.float64)
    return model.Categorical(probs / probs.sum(), perfect=False)


def _ans_compress(codec: Codec, data) -> bytes:
    arr = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    n = len(arr)
    freq = _ans_table(byte_histogram(arr))
    nz = np.flatnonzero(freq)
    if 1 + 2 + 3 * len(nz) < 1 + 512:
        table = struct.pack("<BH", 1, len(nz)) + b"".join(struct.pack("<BH", int(s), int(freq[s])) for s in nz)
    else:
        table = b"\x00" + freq.astype("<u2").tobytes()
    words = b""
    if n:
        coder = _module("constriction").stream.stack.AnsCoder()
        coder.encode_reverse(arr.astype(np.int32), _ans_model(freq))
        words = coder.get_compressed().astype("<u4").tobytes()
    return struct.pack("<Q", n) + table + words


def _ans_decompress(codec: Codec, blob) -> bytes:
    buf = memoryview(blob).cast("B")
    (n,) = struct.unpack_from("<Q", buf, 0)
    kind, pos = buf[8], 9
    if kind == 0:
        freq = np.frombuffer(buf, dtype="<u2", count=256, offset=pos).astype(np.uint16)
        pos += 512
    elif kind == 1:
        (k,) = struct.unpack_from("<H", buf, pos)
        pos += 2
        freq = np.zeros(256, dtype=np.uint16)
        for _ in range(k):
            s, f = struct.unpack_from("<BH", buf, pos)
            freq[s] = f
            pos += 3
    else:
        raise ValueError(f"ans stream: unknown table kind {kind}")
    if n == 0:
        return b""
    words = np.frombuffer(buf, dtype="<u4", offset=pos).astype(np.uint32)
    coder = _module("constriction").stream.stack.AnsCoder(words)
    return coder.decode(_ans_model(freq), n).astype(np.uint8).tobytes()


_IMPL: dict[str, tuple[Callable, Callable]] = {
    "zstd": (_zstd_compress, _zstd_decompress),
    "lz4": (_lz4_compress, _lz4_decompress),
    "brotli": (_brotli_compress, _brotli_decompress),
    "ans": (_ans_compress, _ans_decompress),
}

CODECS: dict[str, Codec] = {c.name: c for c in [
    Codec("zstd-1", "zstd", "zstandard", "zstandard", 1, description="Zstandard level 1"),
    Codec("zstd-3", "zstd", "zstandard", "zstandard", 3, description="Zstandard level 3 (default)"),
    Codec("zstd-9", "zstd", "zstandard", "zstandard", 9, description="Zstandard level 9"),
    Codec("zstd-19", "zstd", "zstandard", "zstandard", 19, slow=True, description="Zstandard level 19"),
    Codec("lz4", "lz4", "lz4.frame", "lz4", None, description="LZ4 frame, default level"),
    Codec("brotli-5", "brotli", "brotli", "brotli", 5, description="Brotli quality 5"),
    Codec("brotli-11", "brotli", "brotli", "brotli", 11, slow=True, description="Brotli quality 11"),
    Codec("ans", "ans", "constriction", "constriction", None,
          description="order-0 rANS over bytes (constriction AnsCoder), table included"),
]}


def get_codec(name: str | Codec) -> Codec:
    if isinstance(name, Codec):
        return name
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; known: {', '.join(CODECS)}") from None


def available_codecs(names: Iterable[str] | None = None) -> tuple[list[Codec], dict[str, str]]:
    """The usable codecs among ``names`` (default: all), and name -> skip reason for the rest."""
    ok, skipped = [], {}
    for name in names if names is not None else CODECS:
        codec = get_codec(name)
        reason = codec.skip_reason()
        if reason is None:
            ok.append(codec)
        else:
            skipped[codec.name] = reason
    return ok, skipped


# --------------------------------------------------------------------------- measurement


@dataclass
class CodecResult:
    """One codec on one buffer (or on a sample of chunks, each compressed on its own)."""

    name: str
    raw_bytes: int
    compressed_bytes: int
    ratio: float  # compressed / raw
    gap_to_entropy_bits_per_byte: float  # 8 * compressed / raw - order-0 entropy (negative: beats order 0)
    decode_MBps: float | None  # raw bytes out per second / 1e6 on this machine; None if not timed
    compress_MBps: float | None = None
    chunk_bytes: int | None = None  # raw bytes per independently compressed chunk (None: one piece)
    n_chunks: int = 1
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def time_decode(codec: Codec, blobs: Sequence[bytes], raw_bytes: int, min_seconds: float = 0.2, *,
                fresh: bool = True) -> float:
    """Decode throughput (MB/s of output) of ``blobs``, repeating until ``min_seconds`` have passed.

    Each round decodes every blob and stores the output into a buffer of the
    raw size: with ``fresh`` (the default) newly mapped memory each round, as a
    loader filling the model's memory does (that store and its first-touch page
    faults cost about as much as a fast decoder itself); without, one reused
    buffer, as in-memory benchmarks (``zstd -b``, lzbench) do. Reports the best
    round (rounds last at least ``min_seconds / 4``), which is less disturbed by
    other processes on a shared machine than the mean.
    """
    if raw_bytes == 0:
        return float("inf")
    reused = None if fresh else bytearray(raw_bytes)

    def one_round() -> None:
        # stores go through a memoryview: bytearray slice assignment is several times slower
        with (mmap.mmap(-1, raw_bytes) if fresh else nullcontext(reused)) as buf:
            out = memoryview(buf)
            pos = 0
            for b in blobs:
                piece = codec.decompress(b)
                out[pos : pos + len(piece)] = piece
                pos += len(piece)
            out.release()

    one_round()  # warm-up (imports, contexts)
    best = 0.0
    round_min = max(min_seconds / 4, 1e-4)
    t_start = time.perf_counter()
    while True:
        n, t0 = 0, time.perf_counter()
        while True:
            one_round()
            n += 1
            t1 = time.perf_counter()
            if t1 - t0 >= round_min:
                break
        best = max(best, n * raw_bytes / (t1 - t0) / 1e6)
        if t1 - t_start >= min_seconds:
            return best


def measure_chunks(chunks: Sequence, codec: Codec | str, *, min_seconds: float = 0.2, timed: bool = True,
                   entropy_bits: float | None = None, verify: bool = True,
                   chunk_bytes: int | None = None, timed_bytes: int | None = None,
                   fresh: bool = True) -> CodecResult:
    """Compress each chunk on its own, check the round trip, sum the sizes, time decoding.

    ``entropy_bits`` is the order-0 entropy (bits/byte) the gap is taken against;
    by default that of the chunks' bytes together. ``timed_bytes`` times
    decoding on only the first chunks holding that many bytes (at least one);
    ``fresh`` is passed to :func:`time_decode`.
    """
    codec = get_codec(codec)
    reason = codec.skip_reason()
    if reason:
        raise ImportError(reason)
    raw = sum(len(memoryview(c).cast("B")) for c in chunks)
    t0 = time.perf_counter()
    blobs = [codec.compress(c) for c in chunks]
    t_comp = time.perf_counter() - t0
    if verify:
        for c, b in zip(chunks, blobs):
            if codec.decompress(b) != bytes(memoryview(c).cast("B")):
                raise RuntimeError(f"codec {codec.name} did not reproduce its input")
    comp = sum(len(b) for b in blobs)
    if entropy_bits is None:
        counts = np.zeros(256, dtype=np.int64)
        for c in chunks:
            counts += byte_histogram(c)
        entropy_bits = entropy_from_counts(counts)
    ratio = comp / raw if raw else 1.0
    return CodecResult(
        name=codec.name, raw_bytes=raw, compressed_bytes=comp, ratio=ratio,
        gap_to_entropy_bits_per_byte=8 * ratio - entropy_bits if raw else 0.0,
        decode_MBps=_timed(codec, chunks, blobs, min_seconds, timed_bytes, fresh) if timed else None,
        compress_MBps=raw / t_comp / 1e6 if raw and t_comp > 0 else None,
        chunk_bytes=chunk_bytes, n_chunks=len(chunks))


def _timed(codec: Codec, chunks: Sequence, blobs: Sequence[bytes], min_seconds: float, timed_bytes: int | None,
           fresh: bool) -> float:
    sizes = [len(memoryview(c).cast("B")) for c in chunks]
    k = len(blobs)
    if timed_bytes is not None:
        k, total = 0, 0
        while k < len(blobs) and (k == 0 or total < timed_bytes):
            total += sizes[k]
            k += 1
    return time_decode(codec, blobs[:k], sum(sizes[:k]), min_seconds, fresh=fresh)


def measure(data: bytes, codec: Codec | str, *, min_seconds: float = 0.2, timed: bool = True,
            entropy_bits: float | None = None, fresh: bool = True) -> CodecResult:
    """Compress ``data`` in one piece with ``codec``; decode throughput measured for >= ``min_seconds``.

    Raises ImportError (with the skip reason) when the codec's package is missing.
    """
    return measure_chunks([data], codec, min_seconds=min_seconds, timed=timed, entropy_bits=entropy_bits, fresh=fresh)
