"""The chunked compressed container (``*.cvxqz``) that the packed reader reads transparently.

A file -- normally a ``model.cvxq.safetensors`` -- is cut into chunks of
``chunk_size`` raw bytes (the last may be shorter), each compressed on its own
(zstd or LZ4 frame, or stored), behind an index of every chunk's offset,
compressed size, raw size and CRC-32. A reader can therefore

* decode while it reads (one chunk after another, on another thread), which is
  what the load-time model of :mod:`cvxq_export.analysis.latency` assumes, and
* seek: raw bytes ``[a, b)`` need only chunks ``a // chunk_size .. (b - 1) // chunk_size``,
  so one tensor of a packed file costs only its own chunks (plus the header's).

Layout (all integers little endian; the spec is section 9 of ``docs/packed-format.md``)::

    offset   size     field
    0        8        magic b"CVXQCHK2"
    8        1        codec id: 0 = stored, 1 = zstd, 2 = lz4 frame
    9        1        codec level (informational; 0 if none)
    10       2        content kind: 0 = any file, 1 = a cvxq-packed file
    12       4        n_chunks (u32) = ceil(raw_size / chunk_size), 0 when raw_size is 0
    16       8        raw_size (u64): bytes of the original file
    24       8        chunk_size (u64): raw bytes per chunk, 1 .. 64 MiB
    32       4        CRC-32 of the chunk index (the 24 * n_chunks bytes below)
    36       4        CRC-32 of bytes 0 .. 36 of this header
    40       24 * n   chunk index, per chunk: u64 offset of its compressed bytes (from the
                      start of the file), u32 compressed size, u32 raw size, u32 CRC-32 of
                      the raw (decoded) bytes, u32 reserved = 0
    40+24n   ...      the chunks' compressed bytes, back to back in chunk order; the file
                      ends with the last chunk

Every field is checked before a byte is decoded (:class:`ChunkedContainer`):
magic, codec, reserved fields, both header CRCs, chunk count vs sizes, each
chunk's raw size, offsets contiguous from the end of the index to the end of
the file, compressed sizes within the codec's worst-case bound. A chunk is
decoded into at most its raw size (a frame claiming more is refused before
anything is allocated), and its CRC-32 is checked when ``verify`` is on. Every
problem is a :class:`~cvxq_export.errors.CvxqError` naming the file and the fix.

Importing this module pulls in NumPy only; zstandard / lz4 are imported when a
chunk of theirs is encoded or decoded.
"""
from __future__ import annotations

import os
import re
import struct
import threading
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ...errors import CvxqError

MAGIC = b"CVXQCHK2"
SUFFIX = ".cvxqz"
CODEC_IDS = {"stored": 0, "zstd": 1, "lz4": 2}
CODEC_FAMILIES = {v: k for k, v in CODEC_IDS.items()}
CONTENT_ANY, CONTENT_PACKED = 0, 1
MAX_CHUNK_BYTES = 64 << 20  # a reader refuses larger chunks (bounds the memory one chunk may take)
DEFAULT_CHUNK_BYTES = 1 << 20
_HEAD = struct.Struct("<8sBBHIQQII")  # 40 bytes
_ENTRY = struct.Struct("<QIIII")  # 24 bytes
HEADER_BYTES = _HEAD.size
ENTRY_BYTES = _ENTRY.size
_LOCAL = threading.local()  # per-thread zstd contexts (they are not thread-safe)


def header_bytes(n_chunks: int) -> int:
    """Bytes before the first chunk: fixed header plus index."""
    return HEADER_BYTES + ENTRY_BYTES * n_chunks


def compressed_bound(raw: int) -> int:
    """Largest compressed chunk a reader accepts for ``raw`` bytes: above zstd's
    (``raw + raw/256 + 64``-ish) and LZ4 frame's (``raw + raw/255 + 19 + header``) worst cases."""
    return raw + raw // 128 + 4096


def parse_codec(name: str) -> tuple[int, int]:
    """'zstd-3' / 'zstd' / 'lz4' / 'stored' -> (codec id, level)."""
    m = re.fullmatch(r"zstd(?:-(\d+))?", name)
    if m:
        level = int(m.group(1) or 3)
        if not 1 <= level <= 22:
            raise CvxqError(f"zstd level {level} is out of range", "use zstd-1 .. zstd-22 (zstd-3 is the default)")
        return CODEC_IDS["zstd"], level
    if name in ("lz4", "stored"):
        return CODEC_IDS[name], 0
    raise CvxqError(f"the compressed container holds zstd or lz4 chunks, not {name!r}",
                    "use zstd-N (1..22), lz4 or stored")


def codec_name(codec_id: int, level: int) -> str:
    family = CODEC_FAMILIES[codec_id]
    return f"zstd-{level}" if family == "zstd" and level else family


def _import(family: str):
    try:
        if family == "zstd":
            import zstandard

            return zstandard
        import lz4.frame

        return lz4.frame
    except ImportError:
        pkg = "zstandard" if family == "zstd" else "lz4"
        raise CvxqError(f"{family} chunks need the optional package '{pkg}', which is not installed",
                        f"pip install {pkg}  (or: pip install 'cvxq-export[analysis]')") from None


def _compressor(codec_id: int, level: int):
    family = CODEC_FAMILIES[codec_id]
    if family == "stored":
        return bytes
    mod = _import(family)
    if family == "zstd":
        def compress(data) -> bytes:
            # one context per thread and level; the container's CRC replaces zstd's own checksum
            key = f"zc{level}"
            ctx = getattr(_LOCAL, key, None)
            if ctx is None:
                ctx = mod.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
                setattr(_LOCAL, key, ctx)
            return ctx.compress(data)
        return compress
    return lambda data: mod.compress(data, store_size=True)


# =========================================================================== writer


@dataclass(frozen=True)
class ChunkEntry:
    offset: int
    compressed_size: int
    raw_size: int
    crc32: int


@dataclass(frozen=True)
class ContainerInfo:
    """What :func:`write_container` wrote."""

    path: str
    codec: str
    chunk_bytes: int
    n_chunks: int
    raw_bytes: int
    file_bytes: int

    @property
    def ratio(self) -> float:
        return self.file_bytes / self.raw_bytes if self.raw_bytes else 1.0

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


def _pieces(source, chunk_size: int):
    """Raw chunks of ``source`` (a path, or a bytes-like object) in order."""
    if isinstance(source, (str, Path)):
        with open(source, "rb") as f:
            while True:
                piece = f.read(chunk_size)
                if not piece:
                    return
                yield piece
    else:
        buf = memoryview(source).cast("B")
        for i in range(0, len(buf), chunk_size):
            yield buf[i : i + chunk_size]


def write_container(source, path: str | Path, codec: str = "zstd-3", chunk_size: int = DEFAULT_CHUNK_BYTES, *,
                    content: int = CONTENT_ANY, workers: int | None = None, progress: bool = False) -> ContainerInfo:
    """Compress ``source`` (a file path or a bytes-like object) into a container at ``path``, atomically.

    Chunks are compressed on ``workers`` threads (default: the CPU count; zstd
    and LZ4 release the GIL), a bounded batch at a time, so memory stays at a
    few chunks per worker whatever the file size.
    """
    from tqdm.auto import tqdm

    from ...io import atomic_path

    if not 1 <= int(chunk_size) <= MAX_CHUNK_BYTES:
        raise CvxqError(f"chunk size {chunk_size:,} bytes is out of range", f"use 1 B .. {MAX_CHUNK_BYTES >> 20} MiB (1 MiB is a good default)")
    chunk_size = int(chunk_size)
    cid, level = parse_codec(codec)
    compress = _compressor(cid, level)
    raw_size = os.path.getsize(source) if isinstance(source, (str, Path)) else len(memoryview(source).cast("B"))
    n = -(-raw_size // chunk_size)
    if n >= 1 << 32:
        raise CvxqError(f"{raw_size:,} bytes in {chunk_size:,}-byte chunks need {n:,} chunks, more than the index holds",
                        "use a larger chunk size")
    workers = max(1, workers or os.cpu_count() or 1)
    entries: list[ChunkEntry] = []
    offset = header_bytes(n)
    bar = tqdm(total=raw_size, desc=f"compress {codec_name(cid, level)}", unit="B", unit_scale=True, disable=not progress)
    with atomic_path(path) as tmp, open(tmp, "wb") as f, ThreadPoolExecutor(workers) as pool:
        f.write(b"\0" * header_bytes(n))  # header and index are filled in once the chunk sizes are known
        batch: list = []

        def flush() -> None:
            nonlocal offset
            for piece, blob in zip(batch, pool.map(compress, batch)):
                entries.append(ChunkEntry(offset, len(blob), len(piece), zlib.crc32(piece) & 0xFFFFFFFF))
                f.write(blob)
                offset += len(blob)
                bar.update(len(piece))
            batch.clear()

        for piece in _pieces(source, chunk_size):
            batch.append(piece)
            if len(batch) >= 2 * workers:
                flush()
        flush()
        if len(entries) != n:  # the source changed size while it was read
            raise CvxqError(f"{source} changed while it was compressed", "compress it again once nothing writes to it")
        index = b"".join(_ENTRY.pack(e.offset, e.compressed_size, e.raw_size, e.crc32, 0) for e in entries)
        head = _HEAD.pack(MAGIC, cid, level, content, n, raw_size, chunk_size, zlib.crc32(index) & 0xFFFFFFFF, 0)
        head = head[:36] + struct.pack("<I", zlib.crc32(head[:36]) & 0xFFFFFFFF)
        f.seek(0)
        f.write(head)
        f.write(index)
        f.flush()
        os.fsync(f.fileno())
    bar.close()
    return ContainerInfo(str(path), codec_name(cid, level), chunk_size, n, raw_size, offset)


# =========================================================================== reader


def is_container(path: str | Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _bad(path, what: str) -> CvxqError:
    return CvxqError(f"{path}: not a valid compressed container ({SUFFIX}): {what}",
                     "compress the packed file again (`cvxq-export analyze FILE --write-compressed`); "
                     "this one is damaged or was not written by cvxq-export")


class ChunkedContainer:
    """A validated container, read through any seekable binary file object.

    ``chunk(i)`` decodes one chunk (kept in a small LRU cache), ``read_range``
    any raw byte range, ``read_into`` the whole payload. ``decoded`` counts how
    often each chunk was decoded (what a seek cost).
    """

    def __init__(self, f: BinaryIO, path: str | Path = "<stream>", *, verify: bool = True, cache_chunks: int = 4,
                 owns_file: bool = False):
        self.f, self.path, self.verify = f, str(path), verify
        self._owns = owns_file
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_chunks = max(1, cache_chunks)
        self._lock = threading.Lock()  # seek + read must not interleave between threads
        self.decoded: dict[int, int] = {}
        f.seek(0, os.SEEK_END)
        self.file_size = f.tell()
        f.seek(0)
        self._read_index()

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True, cache_chunks: int = 4) -> "ChunkedContainer":
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise CvxqError(f"{path} does not exist", "check the path") from None
        except OSError as exc:
            raise CvxqError(f"cannot open {path}: {exc.strerror or exc}", "check the path and its permissions") from None
        try:
            return cls(f, path, verify=verify, cache_chunks=cache_chunks, owns_file=True)
        except BaseException:
            f.close()
            raise

    def _read_index(self) -> None:
        bad = lambda what: _bad(self.path, what)  # noqa: E731
        size = self.file_size
        if size < HEADER_BYTES:
            raise bad(f"the file has {size} bytes, fewer than the {HEADER_BYTES}-byte header (truncated?)")
        head = self.f.read(HEADER_BYTES)
        magic, cid, level, content, n, raw, chunk, index_crc, head_crc = _HEAD.unpack(head)
        if magic != MAGIC:
            raise bad(f"bad magic {magic!r} (expected {MAGIC!r})")
        if zlib.crc32(head[:36]) & 0xFFFFFFFF != head_crc:
            raise bad("the header's CRC-32 does not match (corrupted header)")
        if cid not in CODEC_FAMILIES:
            raise bad(f"unknown codec id {cid} (0 = stored, 1 = zstd, 2 = lz4)")
        if content not in (CONTENT_ANY, CONTENT_PACKED):
            raise bad(f"unknown content kind {content}")
        if not 1 <= chunk <= MAX_CHUNK_BYTES:
            raise bad(f"chunk size {chunk:,} is outside 1 .. {MAX_CHUNK_BYTES:,} bytes")
        if n != -(-raw // chunk):
            raise bad(f"{n:,} chunks cannot hold {raw:,} bytes in chunks of {chunk:,}")
        if header_bytes(n) > size:
            raise bad(f"an index of {n:,} chunks needs {header_bytes(n):,} bytes, the file has {size:,} (truncated?)")
        index = self.f.read(ENTRY_BYTES * n)
        if len(index) != ENTRY_BYTES * n:  # pragma: no cover - the file shrank while it was read
            raise bad("the file shrank while it was read")
        if zlib.crc32(index) & 0xFFFFFFFF != index_crc:
            raise bad("the chunk index's CRC-32 does not match (corrupted index)")
        chunks, expect = [], header_bytes(n)
        for i in range(n):
            off, csize, rsize, crc, reserved = _ENTRY.unpack_from(index, i * ENTRY_BYTES)
            want_raw = chunk if i < n - 1 else raw - chunk * (n - 1)
            if rsize != want_raw:
                raise bad(f"chunk {i} claims {rsize:,} raw bytes, expected {want_raw:,}")
            if reserved:
                raise bad(f"chunk {i}: the reserved field is not zero")
            if off != expect:
                raise bad(f"chunk {i} starts at byte {off:,}, expected {expect:,} (chunks lie back to back)")
            if csize == 0 or csize > compressed_bound(rsize) or (cid == 0 and csize != rsize):
                raise bad(f"chunk {i} has an impossible compressed size {csize:,} for {rsize:,} raw bytes")
            if off + csize > size:
                raise bad(f"chunk {i} (bytes {off:,} .. {off + csize:,}) runs past the end of the {size:,}-byte file "
                          "(truncated?)")
            chunks.append(ChunkEntry(off, csize, rsize, crc))
            expect = off + csize
        if expect != size:
            raise bad(f"{size - expect:,} bytes follow the last chunk")
        self.codec_id, self.level, self.content = cid, level, content
        self.codec = codec_name(cid, level)
        self.raw_size, self.chunk_size, self.chunks = raw, chunk, chunks
        self._decoder = self._make_decoder()

    def _make_decoder(self):
        family = CODEC_FAMILIES[self.codec_id]
        if family == "stored":
            return lambda blob, raw: bytes(blob)
        mod = _import(family)
        if family == "zstd":
            def decode(blob, raw: int) -> bytes:
                # a frame states its content size; refuse one that claims more before zstd allocates it
                declared = mod.frame_content_size(blob)
                if declared not in (-1, raw):
                    raise ValueError(f"the zstd frame declares {declared:,} bytes")
                ctx = getattr(_LOCAL, "zd", None)
                if ctx is None:
                    ctx = _LOCAL.zd = mod.ZstdDecompressor()
                return ctx.decompress(blob, max_output_size=raw)
            return decode

        def decode(blob, raw: int) -> bytes:
            d = mod.LZ4FrameDecompressor()
            out = d.decompress(blob, max_length=raw)
            if not d.eof:
                raise ValueError("the LZ4 frame does not end within the chunk's raw size")
            return out
        return decode

    # -- chunks
    def chunk_range(self, begin: int, end: int) -> range:
        """Indices of the chunks holding raw bytes ``[begin, end)``."""
        if end <= begin:
            return range(0)
        return range(begin // self.chunk_size, (end - 1) // self.chunk_size + 1)

    def read_compressed(self, i: int) -> bytes:
        e = self.chunks[i]
        with self._lock:
            self.f.seek(e.offset)
            blob = self.f.read(e.compressed_size)
        if len(blob) != e.compressed_size:
            raise _bad(self.path, f"chunk {i}: the file ended early (truncated while open?)")
        return blob

    def decode(self, i: int, blob) -> bytes:
        """Decode chunk ``i`` from its compressed bytes; size always checked, CRC-32 when ``verify``."""
        e = self.chunks[i]
        try:
            out = self._decoder(blob, e.raw_size)
        except CvxqError:
            raise
        except Exception as exc:  # noqa: BLE001 - every codec raises its own error type
            raise _bad(self.path, f"chunk {i} does not decode with {self.codec} ({exc})") from None
        if len(out) != e.raw_size:
            raise _bad(self.path, f"chunk {i} decodes to {len(out):,} bytes, the index says {e.raw_size:,}")
        if self.verify and zlib.crc32(out) & 0xFFFFFFFF != e.crc32:
            raise _bad(self.path, f"chunk {i}: CRC-32 of the decoded bytes does not match the index (corrupted data)")
        self.decoded[i] = self.decoded.get(i, 0) + 1
        return out

    def chunk(self, i: int) -> bytes:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        out = self.decode(i, self.read_compressed(i))
        self._cache[i] = out
        if len(self._cache) > self._cache_chunks:
            self._cache.popitem(last=False)
        return out

    def read_range(self, begin: int, end: int) -> bytes:
        """Raw bytes ``[begin, end)`` (clipped to the payload), decoding only the chunks they lie in."""
        begin, end = max(0, begin), min(end, self.raw_size)
        parts = []
        for i in self.chunk_range(begin, end):
            lo = i * self.chunk_size
            piece = self.chunk(i)
            parts.append(piece[max(begin - lo, 0) : min(end - lo, len(piece))])
        return b"".join(parts)

    def read_into(self, out) -> int:
        """Decode every chunk, in order, into ``out`` (a writable buffer of ``raw_size`` bytes)."""
        view = memoryview(out).cast("B")
        if len(view) < self.raw_size:
            raise ValueError(f"output buffer of {len(view):,} bytes is smaller than the payload ({self.raw_size:,})")
        for i in range(len(self.chunks)):
            piece = self.decode(i, self.read_compressed(i))
            view[i * self.chunk_size : i * self.chunk_size + len(piece)] = piece
        view.release()
        return self.raw_size

    # -- lifecycle
    def close(self) -> None:
        self._cache.clear()
        if self._owns:
            self.f.close()

    def __enter__(self) -> "ChunkedContainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LazyBytes:
    """The payload of a container as a read-only byte sequence decoded on demand.

    ``data[a:b]`` is a uint8 NumPy array (decoding only the chunks it touches),
    ``data[i]`` one byte; what the packed reader needs of its ``data``.
    """

    def __init__(self, container: ChunkedContainer):
        self.container = container
        self.size = container.raw_size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key):
        if isinstance(key, slice):
            begin, end, step = key.indices(self.size)
            if step != 1:
                raise ValueError("LazyBytes supports contiguous slices only")
            return np.frombuffer(self.container.read_range(begin, end), dtype=np.uint8)
        i = int(key)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(i)
        return np.uint8(self.container.read_range(i, i + 1)[0])


# =========================================================================== the packed format


def compressed_name(path: str | Path) -> Path:
    """``model.cvxq.safetensors`` -> ``model.cvxq.safetensors.cvxqz``."""
    path = Path(path)
    return path.with_name(path.name + SUFFIX)


__all__ = ["MAGIC", "SUFFIX", "ChunkEntry", "ChunkedContainer", "ContainerInfo", "LazyBytes", "write_container",
           "compressed_name", "is_container", "header_bytes", "parse_codec"]
