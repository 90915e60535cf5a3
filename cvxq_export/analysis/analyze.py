"""Analyse one model file: entropy, codecs, per-tensor view, load time per device.

``analyze_file(path)`` reads the file through a memory map and returns an
:class:`AnalysisResult`:

* the whole file's order-0 byte entropy (exact: every byte is counted);
* a codec table: every available codec compressing the file in independent
  chunks of each size in ``chunk_sizes``. Files larger than ``sample_bytes``
  are measured on a sample of chunks spread evenly over the file (at least 8,
  cut to their first ``sample_bytes / 8`` bytes when 8 whole chunks would not
  fit) and the sizes are extrapolated (ratio x file size, plus the chunk table
  of the container). Slow codecs (zstd-19, brotli-11) see an evenly spread subset
  of that sample, ``slow_sample_bytes`` in all (chunks cut to that size when
  larger), and their ratios are scaled by zstd-3's ratio on the full sample /
  on the subset, which removes most of the subset's bias. Decode throughput is
  timed on up to 1 MiB of the sample, for at least ``min_seconds`` per codec
  and chunk size;
* for GGUF (via :func:`cvxq_export.formats.gguf.directory.read_directory`),
  safetensors and ONNX files (initializers located by
  :mod:`cvxq_export.formats.onnx.directory`), per tensor: its byte entropy
  (exact), the entropy of its quantized codes for GGUF Q8_0 / Q4_0 / Q4_1,
  safetensors I8 / U8 and ONNX int2 / int4 / int8 (and unsigned) tensors,
  and the best of the fast codecs on a sample of it (at most
  ``tensor_sample_bytes`` over all tensors);
* per device profile: plain read, compressed serial and overlapped load times
  (:mod:`.latency`) and the recommendation.

``render_markdown`` turns the result into a report section and
``plot_load_times`` draws the per-device chart (matplotlib, PNG).
"""
from __future__ import annotations

import json
import math
import os
import platform
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import CvxqError
from .codecs import available_codecs, measure_chunks
from .entropy import byte_entropy, byte_histogram, code_entropy, entropy_from_counts
from .latency import Candidate, recommend, reference_zstd_MBps
from .throttle import header_bytes

KiB, MiB = 1 << 10, 1 << 20
DEFAULT_CHUNK_SIZES = (256 * KiB, 1 * MiB, 4 * MiB)
# GGUF block layouts with codes we can take apart: type id -> (name, block bytes, header bytes, elements, bits)
_GGML_BLOCKS = {8: ("Q8_0", 34, 2, 32, 8), 2: ("Q4_0", 18, 2, 32, 4), 3: ("Q4_1", 20, 4, 32, 4)}


@dataclass
class TensorInfo:
    name: str
    dtype: str
    offset: int
    nbytes: int
    entropy_bits_per_byte: float
    entropy_bound_bytes: int
    best_codec: str | None
    best_ratio: float | None
    codec_ratios: dict[str, float]
    sampled_bytes: int
    code_entropy: dict | None = None  # {"bits": b, "bits_per_code": H, "codes": n, ...}

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AnalysisResult:
    path: str
    file_bytes: int
    format: str  # gguf | safetensors | blob
    entropy: dict
    codecs: list[dict]  # CodecResult dicts at the reference chunk size, extrapolated to the file
    chunk_table: list[dict]  # codec x chunk size: ratio, compressed bytes (file), decode MB/s here
    reference_chunk_bytes: int
    skipped_codecs: dict[str, str]
    tensors: list[dict]
    tensor_types: list[dict]
    devices: list[dict]  # Recommendation dicts
    sampling: dict
    machine: dict
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return jsonable(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @property
    def best_codec(self) -> dict | None:
        return min(self.codecs, key=lambda c: c["ratio"]) if self.codecs else None


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    return obj


# --------------------------------------------------------------------------- file layouts


def _detect(buf: np.ndarray) -> str:
    if len(buf) >= 4 and bytes(buf[:4]) == b"GGUF":
        return "gguf"
    if len(buf) >= 10:
        (n,) = struct.unpack("<Q", bytes(buf[:8]))
        if 2 <= n <= len(buf) - 8 and bytes(buf[8:9]) == b"{":
            return "safetensors"
    from ..formats.onnx.directory import is_onnx

    if is_onnx(buf):
        return "onnx"
    return "blob"


def _safetensors_tensors(buf: np.ndarray, path: str) -> list[tuple[str, str, int, int, tuple]]:
    """(name, dtype, absolute offset, nbytes, shape) of each tensor, in file order."""
    (n,) = struct.unpack("<Q", bytes(buf[:8]))
    try:
        header = json.loads(bytes(buf[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CvxqError(f"{path}: the safetensors header is not valid JSON ({exc})", "pass an intact .safetensors file") from None
    start = 8 + n
    out = []
    for name, entry in header.items():
        if name == "__metadata__" or not isinstance(entry, dict):
            continue
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CvxqError(f"{path}: tensor {name!r} has no valid data_offsets", "pass an intact .safetensors file") from None
        if not 0 <= begin <= end or start + end > len(buf):
            raise CvxqError(f"{path}: tensor {name!r} lies outside the file", "pass an intact .safetensors file")
        out.append((name, str(entry.get("dtype", "?")), start + begin, end - begin, tuple(entry.get("shape", ()))))
    out.sort(key=lambda t: t[2])
    return out


def _gguf_type_name(type_id: int) -> str:
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(type_id).name
    except Exception:  # noqa: BLE001 - unknown to this gguf version, or gguf missing
        return _GGML_BLOCKS.get(type_id, (f"type{type_id}",))[0]


def _gguf_tensors(path: str) -> list[tuple[str, str, int, int, tuple, int]]:
    from ..formats.gguf.directory import read_directory

    out = []
    for name, e in read_directory(path).items():
        out.append((name, _gguf_type_name(e.type_id), int(e.offset), int(len(e.data)), tuple(e.dims), int(e.type_id)))
    out.sort(key=lambda t: t[2])
    return out


def _gguf_codes(data: np.ndarray, type_id: int, dims: tuple) -> tuple[np.ndarray, int] | None:
    """The quantized codes of a Q8_0 / Q4_0 / Q4_1 tensor (offset to >= 0) and their bit depth."""
    if type_id not in _GGML_BLOCKS:
        return None
    _, block, head, elems, bits = _GGML_BLOCKS[type_id]
    n = int(np.prod(dims)) if dims else 0
    nb = n // elems
    if nb == 0 or nb * block > len(data):
        return None
    blocks = np.asarray(data[: nb * block]).reshape(nb, block)[:, head:]
    if bits == 8:
        return (blocks.view(np.int8).astype(np.int16) + 128).reshape(-1), 8
    return np.concatenate([(blocks & 0x0F).reshape(-1), (blocks >> 4).reshape(-1)]), 4


# --------------------------------------------------------------------------- sampling


def _metadata_end(path: Path, buf: np.ndarray, fmt: str) -> int:
    """Bytes before the first tensor's data (the file's metadata); 0 for an unknown layout."""
    try:
        if fmt == "safetensors":
            (n,) = struct.unpack("<Q", bytes(buf[:8]))
            return min(len(buf), 8 + n)
        if fmt == "gguf":
            offsets = [t[2] for t in _gguf_tensors(str(path))]
            return min(len(buf), min(offsets)) if offsets else 0
        # ONNX: the graph's nodes follow the initializers in our files, so there is no metadata head to split off
    except Exception:  # noqa: BLE001 - a layout we cannot read is analysed as a plain blob
        return 0
    return 0



def _sample_chunks(buf: np.ndarray, chunk: int, budget: int, min_pieces: int = 8) -> tuple[list[bytes], bool]:
    """Chunks of ``chunk`` bytes spread evenly over ``buf`` (all of them if the file fits in ``budget``).

    At least ``min_pieces`` chunks are taken (when the file has that many), so
    the sample spans the file's different regions; when ``min_pieces`` whole
    chunks exceed ``budget`` each is cut to its first ``budget // min_pieces``
    bytes. Returns the pieces and whether the file was sampled (rather than
    covered entirely).
    """
    size = len(buf)
    n = max(1, -(-size // chunk))
    if size <= budget:
        return [bytes(buf[i * chunk : (i + 1) * chunk]) for i in range(n)], False
    n_full = max(1, size // chunk)
    k = max(1, min(n_full, max(min_pieces, budget // chunk)))
    piece = min(chunk, max(budget // k, 1))
    idx = sorted({int(round(x)) for x in np.linspace(0, n_full - 1, k)})
    return [bytes(buf[i * chunk : i * chunk + piece]) for i in idx], True


def _subsample(pieces: list[bytes], budget: int) -> tuple[list[bytes], bool]:
    """An evenly spread subset of ``pieces``, each cut to at most ``budget`` bytes, ``budget`` bytes in all."""
    if sum(map(len, pieces)) <= budget:
        return pieces, False
    cut = min(budget, max(map(len, pieces)))
    k = max(1, min(len(pieces), budget // cut))
    idx = sorted({int(round(x)) for x in np.linspace(0, len(pieces) - 1, k)})
    return [pieces[i][:cut] for i in idx], True


def _tensor_sample(data: np.ndarray, per: int) -> list[bytes]:
    if len(data) <= per:
        return [bytes(data)]
    k = 4
    piece = per // k
    starts = np.linspace(0, len(data) - piece, k).astype(np.int64)
    return [bytes(data[s : s + piece]) for s in starts]


# --------------------------------------------------------------------------- analysis


def analyze_file(path: str | Path, devices: Sequence | None = None,
                 chunk_sizes: Sequence[int] = DEFAULT_CHUNK_SIZES, *, codecs: Iterable[str] | None = None,
                 sample_bytes: int = 4 * MiB, slow_sample_bytes: int = 1 * MiB, tensor_sample_bytes: int = 8 * MiB,
                 min_seconds: float = 0.2, per_tensor: bool = True,
                 cpu_factors: dict[str, float] | None = None) -> AnalysisResult:
    """Analyse ``path``; ``devices`` are DeviceProfile objects (None: every shipped profile).

    ``codecs`` limits the codecs tried (default: all available). See the module
    docstring for the sampling; the result's ``sampling`` and ``notes`` say what
    was sampled and what was assumed.
    """
    t_start = time.perf_counter()
    path = Path(path)
    if not path.is_file():
        raise CvxqError(f"{path} does not exist or is not a file", "pass the path of a model file (.gguf, .safetensors, ...)")
    chunk_sizes = sorted({int(c) for c in chunk_sizes})
    if not chunk_sizes or chunk_sizes[0] <= 0:
        raise CvxqError(f"chunk sizes must be positive, got {chunk_sizes}", "pass chunk sizes in bytes, e.g. 262144")
    if devices is None:
        from ..devices import list_devices, load_device

        devices = [load_device(d) for d in list_devices()]
    size = path.stat().st_size
    buf = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, dtype=np.uint8)
    fmt = _detect(buf)
    notes: list[str] = []
    usable, skipped = available_codecs(codecs)
    for name, reason in skipped.items():
        notes.append(f"skipped {name}: {reason}")

    # ---- whole-file entropy (exact)
    ent = byte_entropy(buf)
    h = ent.bits_per_symbol

    # ---- codecs per chunk size, on a sample of whole chunks
    chunk_table: list[dict] = []
    sampled_any = False
    sample_info = {}
    fast = [c for c in usable if not c.slow]
    ref_codec = next((c for c in fast if c.name == "zstd-3"), fast[0] if fast else None)
    corrected = False
    # The metadata at the head of the file (safetensors JSON, GGUF key-values and tokenizer) compresses far
    # better than tensor data; a sample spread evenly over the file would weight it by the sample's share,
    # not the file's. So the head is measured in full (its own chunks) and only the tensor data is sampled.
    head_end = _metadata_end(path, buf, fmt) if size else 0
    rest = buf[head_end:]
    for cs in chunk_sizes:
        n_chunks = max(1, -(-size // cs)) if size else 0
        head_pieces = [bytes(buf[i : min(i + cs, head_end)]) for i in range(0, head_end, cs)]
        pieces, sampled = _sample_chunks(rest, cs, sample_bytes) if len(rest) else ([], False)
        # slow codecs: a subset of the same pieces (cut to slow_sample_bytes if a chunk is larger)
        slow_pieces, sub = _subsample(pieces, slow_sample_bytes)
        slow_head, head_sub = _subsample(head_pieces, slow_sample_bytes)
        sample_info[str(cs)] = {"head_bytes": head_end, "sample_bytes": sum(map(len, pieces)), "chunks": len(pieces),
                                "piece_bytes": max(map(len, pieces)) if pieces else 0,
                                "slow_sample_bytes": sum(map(len, slow_pieces)), "slow_chunks": len(slow_pieces),
                                "slow_piece_bytes": max(map(len, slow_pieces)) if slow_pieces else 0}
        if not pieces and not head_pieces:
            continue
        ref_full = ref_sub = None
        for codec in usable:
            use = slow_pieces if codec.slow else pieces
            sampled_any |= sampled or (codec.slow and (sub or head_sub))
            # decoding is timed on the first ~1 MiB of the pieces (at least one): enough for a stable rate
            timed_on = use or (slow_head if codec.slow else head_pieces)
            r = measure_chunks(timed_on, codec, min_seconds=min_seconds, entropy_bits=h, chunk_bytes=cs,
                               timed_bytes=min(slow_sample_bytes, MiB))
            ratio, factor = (r.ratio if use else 0.0), 1.0
            if codec is ref_codec:
                ref_full = ratio
            if use and codec.slow and sub and ref_codec is not None:
                # sample-bias correction: scale by how the reference codec's ratio differs between the two samples
                if ref_sub is None:
                    ref_sub = measure_chunks(slow_pieces, ref_codec, timed=False, entropy_bits=h, verify=False).ratio
                if ref_full is None:
                    ref_full = measure_chunks(pieces, ref_codec, timed=False, entropy_bits=h, verify=False).ratio
                factor = ref_full / ref_sub if ref_sub else 1.0
                ratio = r.ratio * factor
                corrected = True
            head_ratio = 0.0
            if head_pieces:
                hp = slow_head if codec.slow else head_pieces
                head_ratio = r.ratio if not use else \
                    measure_chunks(hp, codec, timed=False, entropy_bits=h, verify=False).ratio
            comp_file = head_ratio * head_end + ratio * len(rest) + header_bytes(n_chunks)
            chunk_table.append({"codec": codec.name, "chunk_bytes": cs, "ratio": (comp_file - header_bytes(n_chunks)) / size,
                                "compressed_bytes": int(math.ceil(comp_file)), "file_ratio": comp_file / size,
                                "decode_MBps": r.decode_MBps, "compress_MBps": r.compress_MBps,
                                "sample_bytes": r.raw_bytes, "sample_ratio": r.ratio, "ratio_correction": factor,
                                "head_bytes": head_end, "head_ratio": head_ratio if head_pieces else None,
                                "data_ratio": ratio if use else None,
                                "sampled": sampled or (codec.slow and (sub or head_sub))})
    ref_cs = MiB if MiB in chunk_sizes else chunk_sizes[len(chunk_sizes) // 2]
    codec_rows = []
    for row in chunk_table:
        if row["chunk_bytes"] != ref_cs:
            continue
        codec_rows.append({"name": row["codec"], "raw_bytes": size, "compressed_bytes": row["compressed_bytes"],
                           "ratio": row["file_ratio"], "gap_to_entropy_bits_per_byte": 8 * row["ratio"] - h,
                           "decode_MBps": row["decode_MBps"], "compress_MBps": row["compress_MBps"],
                           "chunk_bytes": ref_cs, "sampled": row["sampled"], "sample_bytes": row["sample_bytes"]})

    # ---- per tensor
    tensors: list[TensorInfo] = []
    if per_tensor and fmt in ("gguf", "safetensors", "onnx") and size:
        tensors = _analyze_tensors(path, buf, fmt, usable, tensor_sample_bytes, notes)

    # ---- devices
    local_ref = reference_zstd_MBps(min_seconds)  # None without zstandard
    cands = [Candidate(r["codec"], r["chunk_bytes"], r["compressed_bytes"], r["decode_MBps"]) for r in chunk_table]
    recs = recommend(size, cands, devices, local_zstd_MBps=local_ref, cpu_factors=cpu_factors) if size else []
    if recs and local_ref:
        notes.append(f"CPU factor per device = profile decode_mb_s (zstd, one core) / this machine's zstd-3 decode speed "
                     f"on a fixed reference buffer ({local_ref:.0f} MB/s); each codec is assumed to run on the device at "
                     f"that fraction of its speed here (caller-given factors override it)")
    elif recs:
        notes.append(recs[0].assumption)
    if sampled_any:
        cut = [f"{_chunk(int(k))} chunks cut to their first {_chunk(v['piece_bytes'])}"
               for k, v in sample_info.items() if v["chunks"] and v["piece_bytes"] < int(k)]
        notes.append(f"codec sizes were measured on a sample ({sample_bytes // KiB} KiB per chunk size: at least 8 chunks "
                     f"spread evenly over the file" + (f"; {', '.join(cut)}" if cut else "") +
                     ") and extrapolated as ratio x file size + the container's chunk table")
    if corrected:
        notes.append(f"the slow codecs ({', '.join(c.name for c in usable if c.slow)}) were measured on an evenly spread "
                     f"{slow_sample_bytes // KiB} KiB subset of that sample (chunks cut to {slow_sample_bytes // KiB} KiB "
                     f"where larger); their ratios are scaled by {ref_codec.name}'s ratio on the full sample / on the "
                     f"subset to remove the subset's bias")
    notes.append("decode throughput is one core of this machine, output stored into fresh memory (page faults included), "
                 "best of several rounds")
    result = AnalysisResult(
        path=str(path), file_bytes=size, format=fmt, entropy=ent.to_dict(), codecs=codec_rows, chunk_table=chunk_table,
        reference_chunk_bytes=ref_cs, skipped_codecs=skipped, tensors=[t.to_dict() for t in tensors],
        tensor_types=_type_summary(tensors), devices=[r.to_dict() for r in recs],
        sampling={"entropy": "exact (every byte)", "sample_bytes": sample_bytes, "slow_sample_bytes": slow_sample_bytes,
                  "tensor_sample_bytes": tensor_sample_bytes, "sampled": sampled_any, "per_chunk_size": sample_info,
                  "min_decode_seconds": min_seconds},
        machine={"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                 "zstd_reference_decode_MBps": local_ref},
        notes=notes)
    result.seconds = time.perf_counter() - t_start
    return result


def _analyze_tensors(path: Path, buf: np.ndarray, fmt: str, usable, budget: int, notes: list[str]) -> list[TensorInfo]:
    onnx_inits = {}
    if fmt == "gguf":
        rows = _gguf_tensors(str(path))
    elif fmt == "onnx":
        from ..formats.onnx.directory import read_initializers

        inits = [i for i in read_initializers(buf) if i.nbytes]
        onnx_inits = {i.name: i for i in inits}
        rows = [(i.name, i.type_name, i.offset, i.nbytes, i.dims, None) for i in inits]
    else:
        rows = [(n, d, off, nb, shape, None) for n, d, off, nb, shape in _safetensors_tensors(buf, str(path))]
    fast = [c for c in usable if not c.slow]
    if len(fast) < len(usable):
        notes.append("per-tensor best codec is chosen among the fast codecs ("
                     + ", ".join(c.name for c in fast) + "); zstd-19 / brotli-11 are measured on the whole file only")
    n = max(1, len(rows))
    per = int(min(MiB, max(16 * KiB, budget // n)))
    out = []
    any_sampled = False
    for name, dtype, off, nbytes, shape, type_id in rows:
        data = buf[off : off + nbytes]
        counts = byte_histogram(data)
        h = entropy_from_counts(counts)
        code = None
        codes = None
        if type_id is not None:
            codes = _gguf_codes(data, type_id, shape)
        elif name in onnx_inits:
            from ..formats.onnx.directory import initializer_codes

            codes = initializer_codes(buf, onnx_inits[name])
        elif dtype in ("I8", "U8") and nbytes:
            arr = np.asarray(data)
            codes = ((arr.view(np.int8).astype(np.int16) + 128) if dtype == "I8" else arr, 8)
        if codes is not None:
            ce = code_entropy(codes[0], 1 << codes[1])
            code = {"bits": codes[1], "bits_per_code": ce.bits_per_symbol, "codes": ce.n_symbols,
                    "bound_bytes": ce.bound_bytes, "packed_bytes": ce.raw_bytes}
        ratios: dict[str, float] = {}
        sampled = 0
        if nbytes and fast:
            pieces = _tensor_sample(data, per)
            sampled = sum(map(len, pieces))
            any_sampled |= sampled < nbytes
            for codec in fast:
                ratios[codec.name] = measure_chunks(pieces, codec, timed=False, entropy_bits=h, verify=False).ratio
        best = min(ratios, key=ratios.get) if ratios else None
        out.append(TensorInfo(name=name, dtype=dtype, offset=off, nbytes=nbytes, entropy_bits_per_byte=h,
                              entropy_bound_bytes=math.ceil(nbytes * h / 8 - 1e-9), best_codec=best,
                              best_ratio=ratios.get(best) if best else None, codec_ratios=ratios, sampled_bytes=sampled,
                              code_entropy=code))
    if any_sampled:
        notes.append(f"per-tensor codec ratios use up to {per // KiB} KiB of each tensor (4 evenly spaced pieces, "
                     f"each compressed on its own); per-tensor entropy is exact")
    return out


def _type_summary(tensors: list[TensorInfo]) -> list[dict]:
    groups: dict[str, list[TensorInfo]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    rows = []
    for dtype, ts in sorted(groups.items(), key=lambda kv: -sum(t.nbytes for t in kv[1])):
        total = sum(t.nbytes for t in ts)
        bound = sum(t.entropy_bound_bytes for t in ts)
        codec_bytes: dict[str, float] = {}
        for t in ts:
            for name, r in t.codec_ratios.items():
                codec_bytes[name] = codec_bytes.get(name, 0.0) + r * t.nbytes
        best = min(codec_bytes, key=codec_bytes.get) if codec_bytes and len({len(t.codec_ratios) for t in ts}) == 1 else None
        rows.append({"dtype": dtype, "tensors": len(ts), "bytes": total,
                     "entropy_bits_per_byte": 8 * bound / total if total else 0.0,
                     "best_codec": best, "best_ratio": codec_bytes[best] / total if best and total else None})
    return rows


# --------------------------------------------------------------------------- rendering


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def _chunk(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n // MiB} MiB" if n % MiB == 0 else f"{n // KiB} KiB" if n % KiB == 0 else f"{n} B"


def _secs(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def _mbps(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:,.0f}" if x >= 10 else f"{x:.2g}"


def render_markdown(result: AnalysisResult | dict, *, max_tensors: int = 20, heading_level: int = 2) -> str:
    """A report section: summary, codec tables, tensors, per-device load times and recommendations."""
    r = result.to_dict() if isinstance(result, AnalysisResult) else result
    hx = "#" * heading_level
    ent = r["entropy"]
    size = r["file_bytes"]
    lines = [f"{hx} Compressibility and load time: `{Path(r['path']).name}`", ""]
    lines.append(f"- file: {_size(size)} ({size:,} bytes), format {r['format']}")
    if size:
        lines.append(f"- order-0 byte entropy: {ent['bits_per_symbol']:.3f} bits/byte: no order-0 coder can go below "
                     f"{_size(ent['bound_bytes'])} ({100 * ent['bound_bytes'] / size:.1f} % of the file)")
    codecs = r["codecs"]
    if codecs:
        best = min(codecs, key=lambda c: c["ratio"])
        lines.append(f"- best codec ({_chunk(r['reference_chunk_bytes'])} chunks): {best['name']}, "
                     f"{100 * best['ratio']:.1f} % of the file ({_size(best['compressed_bytes'])})")
    lines.append(f"- analysed in {r['seconds']:.1f} s")
    lines.append("")
    if codecs:
        lines += [f"{hx}# Codecs ({_chunk(r['reference_chunk_bytes'])} chunks, each compressed on its own)", "",
                  "| codec | compressed | compressed / raw | gap to entropy (bits/byte) | decode MB/s (here) | compress MB/s (here) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for c in sorted(codecs, key=lambda c: c["ratio"]):
            lines.append(f"| {c['name']} | {_size(c['compressed_bytes'])} | {100 * c['ratio']:.1f} % | "
                         f"{c['gap_to_entropy_bits_per_byte']:+.3f} | {_mbps(c['decode_MBps'])} | {_mbps(c['compress_MBps'])} |")
        lines.append("")
        sizes = sorted({row["chunk_bytes"] for row in r["chunk_table"]})
        if len(sizes) > 1:
            lines += [f"{hx}# Chunk size (compressed / raw, decode MB/s here)", "",
                      "| codec | " + " | ".join(_chunk(s) for s in sizes) + " |", "|---|" + "---:|" * len(sizes)]
            by = {(row["codec"], row["chunk_bytes"]): row for row in r["chunk_table"]}
            for name in dict.fromkeys(row["codec"] for row in r["chunk_table"]):
                cells = []
                for s in sizes:
                    row = by.get((name, s))
                    cells.append(f"{100 * row['file_ratio']:.1f} %, {_mbps(row['decode_MBps'])}" if row else "-")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
    if r["tensor_types"]:
        lines += [f"{hx}# Tensors by type", "", "| type | tensors | bytes | entropy (bits/byte) | best codec | compressed / raw |",
                  "|---|---:|---:|---:|---|---:|"]
        for t in r["tensor_types"]:
            ratio = f"{100 * t['best_ratio']:.1f} %" if t["best_ratio"] is not None else "-"
            lines.append(f"| {t['dtype']} | {t['tensors']} | {_size(t['bytes'])} | {t['entropy_bits_per_byte']:.3f} | "
                         f"{t['best_codec'] or '-'} | {ratio} |")
        lines.append("")
        ts = sorted(r["tensors"], key=lambda t: -t["nbytes"])
        shown = ts[:max_tensors]
        title = f"Largest {len(shown)} of {len(ts)} tensors" if len(ts) > len(shown) else "Tensors"
        lines += [f"{hx}# {title}", "",
                  "| tensor | type | bytes | entropy (bits/byte) | code entropy (bits/code) | best codec | compressed / raw |",
                  "|---|---|---:|---:|---:|---|---:|"]
        for t in shown:
            ce = t["code_entropy"]
            code = f"{ce['bits_per_code']:.3f} of {ce['bits']}" if ce else "-"
            ratio = f"{100 * t['best_ratio']:.1f} %" if t["best_ratio"] is not None else "-"
            lines.append(f"| `{t['name']}` | {t['dtype']} | {_size(t['nbytes'])} | {t['entropy_bits_per_byte']:.3f} | {code} | "
                         f"{t['best_codec'] or '-'} | {ratio} |")
        lines.append("")
    if r["devices"]:
        lines += [f"{hx}# Load time per device", "",
                  "| device | read MB/s | CPU factor | plain read | best codec, chunk | serial | overlapped | saving | compress? |",
                  "|---|---:|---:|---:|---|---:|---:|---:|---|"]
        for d in r["devices"]:
            best = f"{d['codec']}, {_chunk(d['chunk_bytes'])}" if d["codec"] else "-"
            saving = f"{_secs(d['saving_s'])} ({100 * d['saving_fraction']:.0f} %)" if d["codec"] else "-"
            lines.append(f"| {d['device']} | {d['read_MBps']:,.0f} | {d['cpu_factor']:.2f} | {_secs(d['plain_s'])} | {best} | "
                         f"{_secs(d['serial_s'])} | {_secs(d['overlapped_s'])} | {saving} | "
                         f"{'**yes**' if d['compress'] else 'no'} |")
        lines += ["", "Recommendations:", ""]
        for d in r["devices"]:
            lines.append(f"- **{d['device']}**: {'compress' if d['compress'] else 'do not compress'}: {d['reason']}")
        lines += ["", "Model: plain = size / read; serial = compressed / read + size / decode; overlapped = "
                      "max(compressed / read, size / decode) + min(one chunk's read, its decode) (a two-stage pipeline "
                      "of equal chunks: one chunk's read and decode to fill and drain it). Decode speeds are this "
                      "machine's, times the device's CPU factor.", ""]
    if r["notes"]:
        lines += ["Notes:", ""] + [f"- {n}" for n in r["notes"]] + [""]
    return "\n".join(lines)


def plot_load_times(result: AnalysisResult | dict, path: str | Path) -> Path:
    """Bar chart per device: plain read vs compressed serial vs overlapped (best codec); saved as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    r = result.to_dict() if isinstance(result, AnalysisResult) else result
    devs = r["devices"]
    fig = Figure(figsize=(max(6.0, 1.6 * len(devs) + 2), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(devs))
    w = 0.27
    series = [("plain read", "plain_s", "#888888"), ("compressed, serial", "serial_s", "#e39c37"),
              ("compressed, overlapped", "overlapped_s", "#3b7dd8")]
    for k, (label, key, color) in enumerate(series):
        vals = [d[key] if d[key] is not None else 0.0 for d in devs]
        bars = ax.bar(x + (k - 1) * w, vals, w, label=label, color=color)
        if key == "overlapped_s":
            for b, d in zip(bars, devs):
                if d["codec"]:
                    ax.annotate(f"{d['codec']}\n{_chunk(d['chunk_bytes'])}", (b.get_x() + b.get_width() / 2, b.get_height()),
                                ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(x)
    ax.set_xticklabels([d["device"] for d in devs], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("load time (s)")
    ax.set_title(f"Load time of {Path(r['path']).name} ({_size(r['file_bytes'])}), best codec per device", fontsize=9)
    ax.legend(fontsize=8)
    ax.margins(y=0.18)
    fig.tight_layout()
    out = Path(path)
    from ..io import atomic_path

    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return out
