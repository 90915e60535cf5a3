"""Check the load-latency model on this machine with a throttled reader.

A file is written as the chunked compressed container that the packed reader
reads (:mod:`cvxq_export.formats.packed.compressed`, ``*.cvxqz``: a header, an
index of every chunk's offset, sizes and CRC-32, then the chunks), then read
back through :class:`ThrottledFile`, which sleeps so that no read -- and no
stretch of reads -- goes faster than a given speed, while a second thread
decodes the chunks already read (``overlapped``), or after everything is read
(``serial``); ``plain`` reads the uncompressed file through the same throttle.
Each measurement is returned next to what :func:`.latency.load_times` predicts
from the file's sizes, the throttle speed and the decode throughput of the
container's own chunk decoder (codec plus CRC-32 check) measured here.

The file is read right after it was written, so it comes from the page cache:
the throttle, not the disk, sets the read speed.
"""
from __future__ import annotations

import io
import mmap
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

from ..formats.packed.compressed import MAGIC, ChunkedContainer, ChunkEntry, header_bytes, write_container
from .codecs import time_decode
from .latency import load_times, plain_read_seconds

MB = 1e6
__all__ = ["MAGIC", "ChunkEntry", "ChunkedReader", "ThrottledFile", "ThrottleResult", "header_bytes", "load_overlapped",
           "load_plain", "load_serial", "validate", "write_chunked"]


def write_chunked(data, path: str | Path, codec: str = "zstd-3", chunk_size: int = 1 << 20) -> list[ChunkEntry]:
    """Write ``data`` (bytes-like) to ``path`` as a container; returns its chunk index."""
    write_container(data, path, codec, chunk_size)
    with ChunkedContainer.open(path) as c:
        return list(c.chunks)


def ChunkedReader(f: BinaryIO, *, verify: bool = True) -> ChunkedContainer:  # noqa: N802 - reads like the class it returns
    """Random access to a container through any seekable binary file object."""
    return ChunkedContainer(f, getattr(f, "name", "<stream>"), verify=verify)


class _ContainerDecode:
    """Adapter so :func:`.codecs.time_decode` times the container's chunk decoder (codec + CRC check)."""

    def __init__(self, container: ChunkedContainer):
        self.container = container

    def decompress(self, item) -> bytes:
        return self.container.decode(*item)


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
        blobs = [r.read_compressed(i) for i in range(len(r.chunks))]
        out = _fresh(r.raw_size)
        view = memoryview(out)  # slice stores through a memoryview (a bytearray's are several times slower)
        pos = 0
        for i, b in enumerate(blobs):
            piece = r.decode(i, b)
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
                    piece = r.decode(i, blob)
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
                q.put((i, r.read_compressed(i)))
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
    plain_path, packed_path = workdir / "plain.bin", workdir / f"chunked-{codec}.cvxqz"
    plain_path.write_bytes(raw)
    write_container(raw, packed_path, codec, chunk_size)
    file_bytes = packed_path.stat().st_size
    # the decode speed the model is given is the loaders' own chunk decoder (codec + CRC-32), measured here
    with ChunkedContainer.open(packed_path) as r:
        items = [(i, r.read_compressed(i)) for i in range(len(r.chunks))]
        decode_MBps = time_decode(_ContainerDecode(r), items, len(raw), min_seconds)
    results = []
    for mode in modes:
        if mode == "plain":
            fn, path = load_plain, plain_path
            predicted = plain_read_seconds(len(raw), read_MBps)
        elif mode in ("serial", "overlapped"):
            fn, path = (load_serial if mode == "serial" else load_overlapped), packed_path
            t = load_times(len(raw), file_bytes, chunk_size, read_MBps, decode_MBps)
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
    plain_path.unlink()
    packed_path.unlink()
    return results
