"""Check the load-latency model on this machine with a throttled reader.

A file is written as a *chunked container* (layout below), then read back
through :class:`ThrottledFile`, which sleeps so that no read -- and no stretch
of reads -- goes faster than a given speed, while a second thread decodes the
chunks already read (``overlapped``), or after everything is read
(``serial``); ``plain`` reads the uncompressed file through the same throttle.
Each measurement is returned next to what :func:`.latency.load_times` predicts
from the file's sizes, the throttle speed and the codec's decode throughput
measured here (CPU factor 1).

The file is read right after it was written, so it comes from the page cache:
the throttle, not the disk, sets the read speed.

Chunked container layout (all integers little endian)::

    offset  size    field
    0       8       magic b"CVXQCHK1"
    8       1       codec id: 0 = stored, 1 = zstd, 2 = lz4 frame
    9       1       codec level (informational; 0 if none)
    10      2       reserved, 0
    12      4       n_chunks (u32)
    16      8       raw_size (u64): bytes of the original file
    24      8       chunk_size (u64): raw bytes per chunk, the last may be shorter
    32      16 * n  chunk table, per chunk: u64 absolute offset of its compressed
                    bytes, u32 compressed size, u32 raw size
    32+16n  ...     the chunks' compressed bytes, back to back

Chunk ``i`` decodes to raw bytes ``[i * chunk_size, i * chunk_size + raw size)``;
a reader can seek to any chunk through the table.
"""
from __future__ import annotations

import io
import mmap
import os
import queue
import struct
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

from .codecs import CODECS, get_codec, time_decode
from .latency import load_times, plain_read_seconds

MAGIC = b"CVXQCHK1"
_HEAD = struct.Struct("<8sBBHIQQ")  # 32 bytes
_ENTRY = struct.Struct("<QII")  # 16 bytes
CODEC_IDS = {"stored": 0, "zstd": 1, "lz4": 2}
_NAMES = {v: k for k, v in CODEC_IDS.items()}
MB = 1e6


def header_bytes(n_chunks: int) -> int:
    return _HEAD.size + _ENTRY.size * n_chunks


@dataclass(frozen=True)
class ChunkEntry:
    offset: int
    compressed_size: int
    raw_size: int


def _codec_for(name: str):
    """'zstd-3' / 'lz4' / 'stored' -> (codec id, level, Codec or None)."""
    if name == "stored":
        return 0, 0, None
    codec = get_codec(name)
    if codec.family not in ("zstd", "lz4"):
        raise ValueError(f"the chunked container holds zstd or lz4 chunks, not {name}")
    reason = codec.skip_reason()
    if reason:
        raise ImportError(reason)
    return CODEC_IDS[codec.family], codec.level or 0, codec


def write_chunked(data, path: str | Path, codec: str = "zstd-3", chunk_size: int = 1 << 20) -> list[ChunkEntry]:
    """Write ``data`` (bytes-like) to ``path`` as a chunked container; returns the chunk table."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    cid, level, c = _codec_for(codec)
    buf = memoryview(data).cast("B")
    n = max(1, -(-len(buf) // chunk_size))
    blobs = []
    for i in range(n):
        piece = buf[i * chunk_size : (i + 1) * chunk_size]
        blobs.append(bytes(piece) if c is None else c.compress(piece))
    entries, offset = [], header_bytes(n)
    for i, b in enumerate(blobs):
        raw = min(chunk_size, len(buf) - i * chunk_size)
        entries.append(ChunkEntry(offset, len(b), raw))
        offset += len(b)
    from ..io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(_HEAD.pack(MAGIC, cid, level, 0, n, len(buf), chunk_size))
        for e in entries:
            f.write(_ENTRY.pack(e.offset, e.compressed_size, e.raw_size))
        for b in blobs:
            f.write(b)
    return entries


class ChunkedReader:
    """Random access to a chunked container through any binary file object."""

    def __init__(self, f: BinaryIO):
        self.f = f
        head = _read_exact(f, _HEAD.size)
        magic, cid, level, _, n, raw, chunk = _HEAD.unpack(head)
        if magic != MAGIC:
            raise ValueError("not a chunked container (bad magic)")
        if cid not in _NAMES:
            raise ValueError(f"unknown codec id {cid}")
        # decoding does not depend on the level; the name only reports it
        self.codec_name = {0: "stored", 2: "lz4"}.get(cid) or (f"zstd-{level}" if f"zstd-{level}" in CODECS else "zstd-3")
        self.level, self.raw_size, self.chunk_size = level, raw, chunk
        table = _read_exact(f, _ENTRY.size * n)
        self.chunks = [ChunkEntry(*_ENTRY.unpack_from(table, i * _ENTRY.size)) for i in range(n)]
        self._codec = None if cid == 0 else get_codec(self.codec_name)

    def read_raw(self, i: int) -> bytes:
        e = self.chunks[i]
        self.f.seek(e.offset)
        return _read_exact(self.f, e.compressed_size)

    def decode(self, blob: bytes) -> bytes:
        return blob if self._codec is None else self._codec.decompress(blob)

    def read_chunk(self, i: int) -> bytes:
        return self.decode(self.read_raw(i))

    def read_all(self) -> bytes:
        return b"".join(self.read_chunk(i) for i in range(len(self.chunks)))


def _read_exact(f, n: int) -> bytes:
    out = f.read(n)
    if len(out) != n:
        raise ValueError(f"truncated file: wanted {n} bytes, got {len(out)}")
    return out


class ThrottledFile(io.RawIOBase):
    """A read-only file whose reads never go faster than ``read_MBps``.

    Each read of ``n`` bytes is due ``n / speed`` after the later of the
    previous read's due time and its own start (less ``slack``), and returns no
    earlier: the reader sleeps the rest. Since due times never fall behind the
    schedule ``first start + bytes so far / speed``, bytes / elapsed never
    exceeds the speed. Idle time (a reader waiting for its consumer) earns at
    most ``slack`` seconds of credit -- like a storage device, which cannot
    read ahead for a caller that is not asking -- while ``slack`` absorbs the
    operating system's sleep overshoot (tens of microseconds per sleep), which
    would otherwise add up over many blocks. Reads are split into ``block``
    bytes so long reads progress smoothly.
    """

    def __init__(self, path: str | Path, read_MBps: float, block: int = 64 << 10, slack: float = 0.02):
        super().__init__()
        if read_MBps <= 0:
            raise ValueError("read_MBps must be positive")
        self._f = open(path, "rb", buffering=0)
        self.bytes_per_s = read_MBps * MB
        self.block = block
        self.slack = slack
        self._due: float | None = None
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readinto(self, b) -> int:
        view = memoryview(b).cast("B")
        done = 0
        while done < len(view):
            start = time.perf_counter()
            got = self._f.readinto(view[done : done + self.block])
            if not got:
                break
            done += got
            self.bytes_read += got
            base = start if self._due is None else max(self._due, start - self.slack)
            self._due = base + got / self.bytes_per_s
            wait = self._due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        return done

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = os.fstat(self._f.fileno()).st_size - self._f.tell()
        buf = bytearray(n)
        got = self.readinto(buf)
        return bytes(buf[:got])

    def close(self) -> None:
        self._f.close()
        super().close()


# --------------------------------------------------------------------------- loads


def _fresh(n: int):
    """Freshly mapped memory for the loaded bytes: first-touch page faults count, as in a real loader
    (a reused heap buffer would make repeated loads look faster than the first)."""
    return mmap.mmap(-1, max(n, 1))


def _finish(out, n: int, t0: float) -> tuple[bytes, float]:
    seconds = time.perf_counter() - t0
    data = out[:n]
    out.close()
    return data, seconds


def load_plain(path: str | Path, read_MBps: float) -> tuple[bytes, float]:
    """Read the whole (uncompressed) file through the throttle; (bytes, seconds)."""
    t0 = time.perf_counter()
    size = os.path.getsize(path)
    out = _fresh(size)
    with ThrottledFile(path, read_MBps) as f:
        view = memoryview(out)
        f.readinto(view[:size])
        view.release()
    return _finish(out, size, t0)


def load_serial(path: str | Path, read_MBps: float) -> tuple[bytes, float]:
    """Read every chunk through the throttle, then decode them all; (bytes, seconds)."""
    t0 = time.perf_counter()
    with ThrottledFile(path, read_MBps) as f:
        r = ChunkedReader(f)
        blobs = [r.read_raw(i) for i in range(len(r.chunks))]
        out = _fresh(r.raw_size)
        view = memoryview(out)  # slice stores through a memoryview (a bytearray's are several times slower)
        pos = 0
        for b in blobs:
            piece = r.decode(b)
            view[pos : pos + len(piece)] = piece
            pos += len(piece)
        view.release()
    return _finish(out, r.raw_size, t0)


def load_overlapped(path: str | Path, read_MBps: float, depth: int = 4) -> tuple[bytes, float]:
    """Read chunks through the throttle while a second thread decodes those already read."""
    t0 = time.perf_counter()
    with ThrottledFile(path, read_MBps) as f:
        r = ChunkedReader(f)
        out = _fresh(r.raw_size)
        view = memoryview(out)
        q: queue.Queue = queue.Queue(maxsize=depth)
        errors: list[BaseException] = []

        def decoder() -> None:
            try:
                while True:
                    item = q.get()
                    if item is None:
                        return
                    i, blob = item
                    piece = r.decode(blob)
                    start = i * r.chunk_size
                    view[start : start + len(piece)] = piece
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(exc)

        worker = threading.Thread(target=decoder, name="cvxq-decode", daemon=True)
        worker.start()
        try:
            for i in range(len(r.chunks)):
                if errors:
                    break
                q.put((i, r.read_raw(i)))
        finally:
            q.put(None)
            worker.join()
        view.release()
        if errors:
            out.close()
            raise errors[0]
    return _finish(out, r.raw_size, t0)


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class ThrottleResult:
    mode: str  # plain | serial | overlapped
    codec: str | None
    chunk_bytes: int | None
    read_MBps: float
    raw_bytes: int
    file_bytes: int
    decode_MBps: float | None  # measured here on the file's chunks
    measured_s: float
    predicted_s: float

    @property
    def rel_error(self) -> float:
        """(measured - predicted) / predicted."""
        return (self.measured_s - self.predicted_s) / self.predicted_s if self.predicted_s else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "rel_error": self.rel_error}


def validate(data, workdir: str | Path, *, codec: str = "zstd-3", chunk_size: int = 1 << 20, read_MBps: float = 40.0,
             modes: Sequence[str] = ("plain", "serial", "overlapped"), min_seconds: float = 0.2,
             repeats: int = 1) -> list[ThrottleResult]:
    """Write ``data`` plainly and as a chunked container under ``workdir``, load each way, compare with the model.

    With ``repeats > 1`` each load runs that many times and the fastest is kept
    (the least disturbed by other processes). The loaded bytes are checked
    against ``data``.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    raw = bytes(memoryview(data).cast("B"))
    plain_path, packed_path = workdir / "plain.bin", workdir / f"chunked-{codec}.cvxqc"
    plain_path.write_bytes(raw)
    entries = write_chunked(raw, packed_path, codec, chunk_size)
    file_bytes = packed_path.stat().st_size
    decode_MBps = None
    if codec != "stored":
        with open(packed_path, "rb") as f:
            r = ChunkedReader(f)
            blobs = [r.read_raw(i) for i in range(len(entries))]
        decode_MBps = time_decode(get_codec(codec), blobs, len(raw), min_seconds)
    results = []
    for mode in modes:
        if mode == "plain":
            fn, path = load_plain, plain_path
            predicted = plain_read_seconds(len(raw), read_MBps)
        elif mode in ("serial", "overlapped"):
            fn, path = (load_serial if mode == "serial" else load_overlapped), packed_path
            t = load_times(len(raw), file_bytes, chunk_size, read_MBps, decode_MBps or float("inf"))
            predicted = t.serial_s if mode == "serial" else t.overlapped_s
        else:
            raise ValueError(f"unknown mode {mode!r}: use plain, serial or overlapped")
        best = float("inf")
        for _ in range(max(1, repeats)):
            out, seconds = fn(path, read_MBps)
            if out != raw:
                raise RuntimeError(f"{mode} load did not reproduce the data")
            best = min(best, seconds)
        results.append(ThrottleResult(mode, None if mode == "plain" else codec, None if mode == "plain" else chunk_size,
                                      read_MBps, len(raw), len(raw) if mode == "plain" else file_bytes,
                                      None if mode == "plain" else decode_MBps, best, predicted))
    return results
