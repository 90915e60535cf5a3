"""Load-latency model: read a file plainly, or read it compressed and decode it.

For a file of ``S`` raw bytes stored as ``C`` compressed bytes (chunks of ``c``
raw bytes compressed one by one, ``n = ceil(S / c)`` chunks), a storage read
speed ``R`` and a decode throughput ``D`` (bytes of output per second, one
core):

* plain read      ``t_plain      = S / R``
* serial          ``t_serial     = C / R + S / D`` (read everything, then decode)
* overlapped      ``t_overlapped = max(C / R, S / D) + min(r, d)`` where ``r`` and
  ``d`` are one chunk's read and decode times. This is the exact finish time of a
  two-stage pipeline of ``n`` equal chunks (read chunk ``i+1`` while decoding chunk
  ``i``): ``r + d`` to fill and drain it plus ``(n - 1) * max(r, d)`` in steady
  state -- the start-up is one chunk's read plus its decode. With one chunk it
  equals ``t_serial``.

Device speeds come from the profiles (:mod:`cvxq_export.devices`):
``storage_read_mb_s`` is the read speed. ``decode_mb_s`` is the profile's
zstd decode throughput on one core of the device, an in-memory benchmark
figure; it gives the **CPU factor** ``decode_mb_s / (zstd-3 decode throughput
on this machine, measured the same way -- in memory, output buffer reused -- on
a fixed reference buffer)`` by which every codec's throughput measured here is
scaled. The codecs' throughputs here are measured as a loader sees them
(output stored into fresh memory), so the device inherits that cost in
proportion. The assumption is that the device runs every codec, memory
stores included, at the same fraction of this machine's speed as it runs
zstd; a profile without ``decode_mb_s`` gets factor 1.0 (this machine's
speed), and the result says so. MB = 10**6 bytes.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Iterable, Mapping

MB = 1e6


@dataclass(frozen=True)
class LoadTimes:
    raw_bytes: int
    compressed_bytes: int
    chunk_bytes: int
    read_MBps: float
    decode_MBps: float
    plain_s: float
    serial_s: float
    overlapped_s: float
    n_chunks: int

    def to_dict(self) -> dict:
        return asdict(self)


def plain_read_seconds(raw_bytes: int, read_MBps: float) -> float:
    return raw_bytes / (read_MBps * MB)


def load_times(raw_bytes: int, compressed_bytes: int, chunk_bytes: int, read_MBps: float,
               decode_MBps: float) -> LoadTimes:
    """The three load times of one file (see the module docstring)."""
    if read_MBps <= 0 or decode_MBps <= 0:
        raise ValueError("read and decode speeds must be positive")
    R, D = read_MBps * MB, decode_MBps * MB
    chunk = min(max(int(chunk_bytes), 1), max(int(raw_bytes), 1))
    n = max(1, math.ceil(raw_bytes / chunk))
    read_all, decode_all = compressed_bytes / R, raw_bytes / D
    r, d = read_all / n, decode_all / n  # one (average) chunk
    return LoadTimes(raw_bytes=int(raw_bytes), compressed_bytes=int(compressed_bytes), chunk_bytes=chunk,
                     read_MBps=read_MBps, decode_MBps=decode_MBps, plain_s=raw_bytes / R,
                     serial_s=read_all + decode_all, overlapped_s=max(read_all, decode_all) + min(r, d), n_chunks=n)


# --------------------------------------------------------------------------- device CPU factor


def reference_buffer(size: int = 4 << 20, seed: int = 1234) -> bytes:
    """A fixed buffer resembling int8 quantized weights (zstd shrinks it to ~64 %)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = np.clip(np.rint(rng.laplace(0.0, 6.0, size)), -127, 127).astype(np.int8)
    return x.view(np.uint8).tobytes()


@lru_cache(maxsize=4)
def reference_zstd_MBps(min_seconds: float = 0.2) -> float | None:
    """zstd (level 3) decode throughput of this machine on :func:`reference_buffer`, in memory
    (output buffer reused, like ``zstd -b``); None without zstandard."""
    from .codecs import get_codec, measure

    codec = get_codec("zstd-3")
    if not codec.available:
        return None
    return measure(reference_buffer(), codec, min_seconds=min_seconds, fresh=False).decode_MBps


@dataclass(frozen=True)
class DeviceSpeeds:
    name: str
    read_MBps: float
    cpu_factor: float
    assumption: str

    def to_dict(self) -> dict:
        return asdict(self)


def device_speeds(profile, local_zstd_MBps: float | None = None, cpu_factor: float | None = None) -> DeviceSpeeds:
    """Read speed and CPU factor of a :class:`~cvxq_export.devices.DeviceProfile`.

    ``cpu_factor`` overrides the derived factor. ``local_zstd_MBps`` is this
    machine's zstd decode throughput on the reference buffer (measured when None).
    """
    read = getattr(profile, "storage_read_mb_s", None)
    if not read:
        raise ValueError(f"device {getattr(profile, 'name', profile)!r} has no storage_read_mb_s")
    name = getattr(profile, "name", str(profile))
    if cpu_factor is not None:
        return DeviceSpeeds(name, float(read), float(cpu_factor), f"CPU factor {cpu_factor:g} given by the caller")
    dev_decode = getattr(profile, "decode_mb_s", None)
    if not dev_decode:
        return DeviceSpeeds(name, float(read), 1.0, "the profile has no decode_mb_s: assumed the device decodes as fast "
                                                    "as this machine (CPU factor 1.0)")
    local = local_zstd_MBps if local_zstd_MBps is not None else reference_zstd_MBps()
    if not local:
        return DeviceSpeeds(name, float(read), 1.0, "zstandard is not installed, so this machine's zstd speed is unknown: "
                                                    "assumed CPU factor 1.0")
    factor = float(dev_decode) / float(local)
    return DeviceSpeeds(name, float(read), factor,
                        f"CPU factor {factor:.3f} = profile decode_mb_s {dev_decode:g} MB/s (zstd, one core) / this "
                        f"machine's zstd-3 decode {local:.0f} MB/s on the reference buffer; every codec is assumed to "
                        f"run at that fraction of its speed here")


# --------------------------------------------------------------------------- recommendation


@dataclass(frozen=True)
class Candidate:
    """One codec at one chunk size, as measured on this machine."""

    codec: str
    chunk_bytes: int
    compressed_bytes: int  # for the whole file (extrapolated from a sample if need be), container header included
    decode_MBps: float  # this machine


@dataclass
class Recommendation:
    device: str
    compress: bool
    codec: str | None
    chunk_bytes: int | None
    plain_s: float
    serial_s: float | None
    overlapped_s: float | None
    saving_s: float
    saving_fraction: float
    read_MBps: float
    decode_MBps: float | None  # the chosen codec on the device (scaled)
    cpu_factor: float
    assumption: str
    reason: str
    options: list[dict] = field(default_factory=list)  # every candidate's times on this device

    def to_dict(self) -> dict:
        return asdict(self)


def recommend(raw_bytes: int, candidates: Iterable[Candidate], devices: Iterable, *,
              local_zstd_MBps: float | None = None, cpu_factors: Mapping[str, float] | None = None,
              min_saving_fraction: float = 0.05, min_saving_s: float = 0.01) -> list[Recommendation]:
    """Per device: compress or not, with which codec and chunk size, and the predicted saving.

    The best option is the candidate with the shortest overlapped (pipelined)
    load time. Compressing is recommended when it saves at least
    ``min_saving_fraction`` of the plain read time and ``min_saving_s`` seconds;
    otherwise the file should stay uncompressed (decoding costs CPU and energy
    for little or no gain).
    """
    candidates = list(candidates)
    out = []
    for profile in devices:
        name = getattr(profile, "name", str(profile))
        speeds = device_speeds(profile, local_zstd_MBps, cpu_factors.get(name) if cpu_factors else None)
        plain = plain_read_seconds(raw_bytes, speeds.read_MBps)
        options = []
        for c in candidates:
            t = load_times(raw_bytes, c.compressed_bytes, c.chunk_bytes, speeds.read_MBps, c.decode_MBps * speeds.cpu_factor)
            options.append((t, c))
        options.sort(key=lambda tc: (tc[0].overlapped_s, tc[0].serial_s))
        rows = [{"codec": c.codec, "chunk_bytes": c.chunk_bytes, **t.to_dict()} for t, c in options]
        if not options:
            out.append(Recommendation(name, False, None, None, plain, None, None, 0.0, 0.0, speeds.read_MBps, None,
                                      speeds.cpu_factor, speeds.assumption, "no codec was measured", rows))
            continue
        best, cand = options[0]
        saving = plain - best.overlapped_s
        frac = saving / plain if plain > 0 else 0.0
        do = saving >= min_saving_s and frac >= min_saving_fraction
        if do:
            bound = "read-bound" if best.compressed_bytes / (speeds.read_MBps * MB) >= raw_bytes / (best.decode_MBps * MB) \
                else "decode-bound"
            reason = (f"{cand.codec} in {_kib(cand.chunk_bytes)} chunks, decoded while reading: "
                      f"{_secs(best.overlapped_s)} vs {_secs(plain)} plain ({100 * frac:.0f} % less, {bound})")
        else:
            smallest = min(candidates, key=lambda c: c.compressed_bytes)
            ideal = plain - smallest.compressed_bytes / (speeds.read_MBps * MB)
            if ideal < min_saving_s or ideal < min_saving_fraction * plain:
                reason = (f"the file compresses only to {100 * smallest.compressed_bytes / max(raw_bytes, 1):.0f} % "
                          f"({smallest.codec}): even with instant decoding it would load only {_secs(ideal)} "
                          f"({100 * ideal / plain if plain else 0:.1f} %) faster, under the {100 * min_saving_fraction:g} % / "
                          f"{_secs(min_saving_s)} threshold: keep it uncompressed")
            elif saving > 0:
                reason = (f"best option {cand.codec} saves only {_secs(saving)} ({100 * frac:.1f} %), under the "
                          f"{100 * min_saving_fraction:g} % / {_secs(min_saving_s)} threshold: keep the file uncompressed")
            else:
                reason = (f"storage ({speeds.read_MBps:g} MB/s) is fast relative to decoding on this device: the best "
                          f"option ({cand.codec}) would take {_secs(best.overlapped_s)} vs {_secs(plain)} plain: "
                          f"keep it uncompressed")
        out.append(Recommendation(name, do, cand.codec, cand.chunk_bytes, plain, best.serial_s, best.overlapped_s,
                                  saving, frac, speeds.read_MBps, best.decode_MBps, speeds.cpu_factor,
                                  speeds.assumption, reason, rows))
    return out


def _kib(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n >> 10} KiB" if n % 1024 == 0 else f"{n} B"


def _secs(s: float) -> str:
    return f"{s * 1000:.3g} ms" if abs(s) < 1 else f"{s:.3g} s"
