"""The packed reference format, ``cvxq-packed`` version 2: writer, NumPy reader, loader.

One safetensors-compatible file holds a model quantized under a native CVXQ
plan exactly as the allocator costed it: per quantized tensor four buffers
(bit-packed codes, the per-unit bit-depth map, fp16 offsets, fp16 scales of
the units with bits > 0), each starting on a 64-byte boundary of the file, so
a tensor takes exactly :func:`cvxq_export.native.native_tensor_bytes`.
The specification is ``docs/packed-format.md``; the C reference decoder is
``packed_decoder.c`` next to this file.

Importing this module pulls in NumPy only: :func:`read_packed` and
:class:`PackedFile` need no torch. The writer and the model loader import
torch (and the quantizer modules) inside the functions that need them.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import CvxqError

FORMAT_NAME = "cvxq-packed"
FORMAT_VERSION = "2"
KNOWN_VERSIONS = ("2",)  # version 1 had no header checksum
FILE_NAME = "model.cvxq.safetensors"
ALIGN = 64  # == native.BUFFER_ALIGN (native imports torch, so the value is repeated; a test ties them)
MAX_HEADER_BYTES = 100_000_000  # a reader refuses larger headers before reading them
MAX_BITS = 8
MAX_UNIT_SIZE = 1 << 12  # row_group * col_group: bounds what one stored unit can expand to
MAX_TENSOR_ELEMENTS = 1 << 32  # rows * cols of one quantized tensor (16 GiB as float32)
DTYPES = {"U8": np.dtype("u1"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}
CODE_SUFFIXES = ("codes", "map", "offset", "scale")
LEVELS_PREFIX = "__levels__.b"
PAD_PREFIX = "__pad__."
_CHUNK = 1 << 20  # elements decoded / packed per step (bounds temporary memory)
HEADER_CRC_KEY = "header_crc32"
_HEADER_CRC_FIELD = b'"header_crc32":"'
_HEADER_CRC_PLACEHOLDER = b"00000000"
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3


# =========================================================================== helpers


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _dumps(obj: Any) -> str:
    """The one JSON encoding the format uses: compact, ASCII only (\\u escapes)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _crc(data) -> str:
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def _header_crc_position(header: bytes) -> int:
    """Byte index of the header checksum's 8 hex digits inside ``header``; -1 if the
    field is missing, -2 if it appears more than once."""
    at = header.find(_HEADER_CRC_FIELD)
    if at < 0:
        return -1
    if header.find(_HEADER_CRC_FIELD, at + 1) >= 0:
        return -2
    return at + len(_HEADER_CRC_FIELD)


def header_checksum(header: bytes) -> str:
    """The ``header_crc32`` a header must carry: CRC-32 of the file's first ``8 + N``
    bytes (the length, the JSON and its padding) with the checksum's own 8 hex digits
    read as ``00000000``. ``header`` is the ``N`` bytes after the length."""
    pos = _header_crc_position(header)
    if pos < 0:
        raise ValueError("the header has no single header_crc32 field")
    zeroed = header[:pos] + _HEADER_CRC_PLACEHOLDER + header[pos + 8 :]
    return _crc(len(header).to_bytes(8, "little") + zeroed)


def seal_header(header: bytes) -> bytes:
    """``header`` with its ``header_crc32`` value set (the writer emits a placeholder;
    tools that edit a header on purpose, such as the fuzz suite, reseal it here)."""
    pos = _header_crc_position(header)
    if pos < 0:
        raise ValueError("the header has no single header_crc32 field")
    return header[:pos] + header_checksum(header).encode("ascii") + header[pos + 8 :]


def weight_checksum(w: np.ndarray) -> str:
    """The decoder checksum of a ``[rows, cols]`` weight, as 16 lowercase hex digits.

    Each row's float32 little-endian bytes are hashed with FNV-1a 64; the final
    value is FNV-1a 64 over the row hashes, each as 8 little-endian bytes
    (the C reference decoder prints the same). Vectorised over rows.
    """
    w = np.ascontiguousarray(w, dtype="<f4")
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    rows, cols = w.shape
    prime = np.uint64(FNV_PRIME)
    raw = w.view(np.uint8).reshape(rows, cols * 4)
    h = np.full(rows, FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(cols * 4):
            h ^= raw[:, j].astype(np.uint64)
            h *= prime
    final = FNV_OFFSET
    for byte in h.astype("<u8").tobytes():
        final = ((final ^ byte) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return f"{final:016x}"


# =========================================================================== writer


@dataclass
class _Buffer:
    name: str
    dtype: str  # "U8" | "F16" | "F32"
    shape: tuple[int, ...]
    data: Any = None  # contiguous np.ndarray (None while estimating)
    nbytes: int = 0


def _layout(buffers: list[_Buffer]) -> tuple[list[tuple[_Buffer, int, int]], int]:
    """Place buffers one after another, each on a 64-byte boundary of the data
    section; gaps become explicit zero ``__pad__.K`` U8 entries so the file
    stays a valid safetensors file (which forbids holes). Returns the entries
    (buffer, begin, end) in file order and the data section length."""
    entries: list[tuple[_Buffer, int, int]] = []
    pos = 0
    n_pad = 0
    for buf in buffers:
        if pos % ALIGN:
            gap = ALIGN - pos % ALIGN
            entries.append((_Buffer(f"{PAD_PREFIX}{n_pad}", "U8", (gap,), None, gap), pos, pos + gap))
            n_pad += 1
            pos += gap
        entries.append((buf, pos, pos + buf.nbytes))
        pos += buf.nbytes
    return entries, pos


def _encode_header(entries: list[tuple[_Buffer, int, int]], metadata: dict[str, str]) -> bytes:
    """Compact ASCII JSON, padded with spaces so that the data section (which
    starts after the 8-byte length and the header) begins on a 64-byte boundary."""
    header: dict[str, Any] = {"__metadata__": metadata}
    for buf, begin, end in entries:
        header[buf.name] = {"dtype": buf.dtype, "shape": list(buf.shape), "data_offsets": [begin, end]}
    raw = _dumps(header).encode("ascii")
    return seal_header(raw + b" " * ((-(8 + len(raw))) % ALIGN))


def _plan_for_header(plan_json: dict | None) -> dict:
    """The plan as stored in the header: unit maps are left out (each tensor's
    ``.map`` buffer holds them; a base64 copy would cost budget bytes)."""
    plan = dict(plan_json or {})
    if "tensors" in plan:
        plan["tensors"] = [{k: v for k, v in t.items() if k != "unit_map"} for t in plan["tensors"]]
    return plan


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    # a torch tensor (the writer's callers hold torch tensors); NumPy has no bfloat16
    x = x.detach().cpu()
    return (x.float() if str(x.dtype) == "torch.bfloat16" else x).numpy()


def _as_f16(name: str, x) -> np.ndarray:
    a = np.asarray(_to_numpy(x))
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{name}: expected a floating point tensor, got {a.dtype}")
    with np.errstate(over="ignore"):
        h = np.ascontiguousarray(a.astype("<f2"))
    if not np.array_equal(np.isfinite(h), np.isfinite(a)):
        raise CvxqError(f"tensor {name} has values outside the float16 range (|x| > 65504)",
                        "the packed format stores unquantized tensors as float16; quantize this tensor or rescale the model")
    return h


def _unit_codes(qt) -> np.ndarray:
    """``[n_units, unit_size]`` uint8 codes in unit index order, reassembled from
    NativeTensor.codes (one array per (bits, kind) group, in OPTIONS order)."""
    from ...native import OPTIONS, decode_map
    from ...quantizers import UNIFORM

    bits, kind = decode_map(np.asarray(qt.unit_map, dtype=np.uint8))
    n, size = len(bits), qt.row_group * qt.col_group
    out = np.zeros((n, size), dtype=np.uint8)
    groups = list(qt.codes)
    g = 0
    for b, k in OPTIONS:  # the same walk as native.quantize_tensor
        sel = np.nonzero((bits == b) & ((kind == k) | (b == 0)))[0]
        if b == 0 and k != UNIFORM or len(sel) == 0:
            continue
        if g >= len(groups):
            raise ValueError(f"{qt.ref.name}: fewer code groups than the unit map needs")
        codes = np.asarray(_to_numpy(groups[g]))
        if codes.shape != (len(sel), size):
            raise ValueError(f"{qt.ref.name}: code group for {b} bits has shape {codes.shape}, expected {(len(sel), size)}")
        out[sel] = codes.astype(np.uint8)
        g += 1
    if g != len(groups):
        raise ValueError(f"{qt.ref.name}: {len(groups) - g} code groups left over after the unit map")
    return out


def pack_codes(codes: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Bit-pack ``codes`` ``[n_units, unit_size]`` with ``bits[u]`` bits each:
    LSB-first within a byte, a code's low bit first, codes straddle bytes, no
    padding between units; the last byte's unused high bits are zero."""
    n, size = codes.shape
    bits = np.asarray(bits, dtype=np.uint8)
    total_bits = int(bits.astype(np.int64).sum()) * size
    out = np.zeros(-(-total_bits // 8), dtype=np.uint8)
    if total_bits == 0:
        return out
    too_big = codes >= (np.left_shift(1, bits.astype(np.int64))[:, None])
    if too_big.any():
        u = int(np.nonzero(too_big.any(1))[0][0])
        raise ValueError(f"unit {u}: a code does not fit in {int(bits[u])} bits")
    if size % 8 == 0:
        _pack_whole_bytes(codes, bits, out)
        return out
    shifts = np.arange(8, dtype=np.uint8)
    per_chunk = max(1, _CHUNK // max(1, size))
    carry = np.zeros(0, dtype=np.uint8)
    pos = 0
    for lo in range(0, n, per_chunk):
        cb, bb = codes[lo : lo + per_chunk], bits[lo : lo + per_chunk]
        planes = (cb[:, :, None] >> shifts) & 1  # [m, size, 8]: bit k of each code
        keep = np.broadcast_to(shifts[None, None, :] < bb[:, None, None], planes.shape)
        stream = np.concatenate([carry, planes[keep].astype(np.uint8)])
        full = len(stream) // 8 * 8
        packed = np.packbits(stream[:full], bitorder="little")
        out[pos : pos + len(packed)] = packed
        pos += len(packed)
        carry = stream[full:]
    if len(carry):
        out[pos] = np.packbits(carry, bitorder="little")[0]
        pos += 1
    assert pos == len(out)
    return out


def _pack_whole_bytes(codes: np.ndarray, bits: np.ndarray, out: np.ndarray) -> None:
    """:func:`pack_codes` when every unit fills whole bytes (``unit_size % 8 == 0``): each
    unit starts on a byte, so the units of one bit depth are packed together and
    scattered to their offsets, not streamed one bit at a time. Same bytes."""
    n, size = codes.shape
    unit_bytes = bits.astype(np.int64) * (size // 8)  # [n]
    start = np.concatenate([[0], np.cumsum(unit_bytes)[:-1]])  # [n] each unit's first byte
    per_chunk = max(1, _CHUNK // max(1, size))
    for b in np.unique(bits):
        if b == 0:
            continue
        sel = np.nonzero(bits == b)[0]
        shifts = np.arange(int(b), dtype=np.uint8)
        width = int(b) * size // 8
        for lo in range(0, len(sel), per_chunk):
            part = sel[lo : lo + per_chunk]
            planes = (codes[part][:, :, None] >> shifts) & 1  # [m, size, b]: a code's bits, low first
            packed = np.packbits(planes.reshape(len(part), -1), axis=1, bitorder="little")  # [m, width]
            out[start[part][:, None] + np.arange(width)] = packed


def _tensor_entry(qt, bias_param: str | None) -> dict:
    ref = qt.ref
    return {"shape": [int(ref.rows), int(ref.cols)], "row_group": int(qt.row_group), "col_group": int(qt.col_group),
            "transposed": bool(ref.transposed), "also": list(ref.also), "bias": bias_param}


def _buffers_for(qtensors: dict, unquantized: dict, biases: dict) -> tuple[list[_Buffer], dict[str, dict]]:
    """Every buffer of the file, in file order, with its data."""
    from ...quantizers import COMPANDED, laplace_table_np

    buffers: list[_Buffer] = []
    tensors: dict[str, dict] = {}
    depths: set[int] = set()
    body: list[_Buffer] = []
    for name, qt in qtensors.items():
        if name != qt.ref.name:
            raise ValueError(f"tensor key {name} does not match its WeightRef name {qt.ref.name}")
        unit_map = np.ascontiguousarray(np.asarray(qt.unit_map, dtype=np.uint8))
        rows, cols, r, c = qt.ref.rows, qt.ref.cols, qt.row_group, qt.col_group
        if rows % r or cols % c or len(unit_map) != (rows // r) * (cols // c):
            raise ValueError(f"{name}: unit map of {len(unit_map)} units does not tile [{rows}, {cols}] by {r}x{c}")
        bits, kind = unit_map & 0x0F, (unit_map >> 4) & 0x01
        if (bits > MAX_BITS).any() or (unit_map >> 5).any():
            raise ValueError(f"{name}: unit map holds values outside bits 0..8, kind 0..1")
        depths.update(int(b) for b in np.unique(bits[(kind == COMPANDED) & (bits > 0)]))
        codes = pack_codes(_unit_codes(qt), bits)
        offset = np.ascontiguousarray(_to_numpy(qt.offset).astype("<f2"))  # already fp16: exact
        scale = np.ascontiguousarray(_to_numpy(qt.scale).astype("<f2")[bits > 0])
        if offset.shape != (len(unit_map),) or _to_numpy(qt.scale).shape != (len(unit_map),):
            raise ValueError(f"{name}: offset/scale must hold one value per unit")
        for suffix, dtype, arr in (("codes", "U8", codes), ("map", "U8", unit_map), ("offset", "F16", offset),
                                   ("scale", "F16", scale)):
            body.append(_Buffer(f"{name}.{suffix}", dtype, arr.shape, arr, arr.nbytes))
        bias_param = None
        if name in biases:
            bias_param = f"{qt.ref.module}.bias"
            if bias_param in unquantized:
                raise ValueError(f"{bias_param} is passed both as a corrected bias of {name} and as an unquantized tensor")
            b16 = _as_f16(f"{name}.bias", biases[name]).reshape(-1)
            if b16.shape != (rows,):
                raise ValueError(f"{name}: bias has {b16.size} values, expected {rows}")
            body.append(_Buffer(f"{name}.bias", "F16", b16.shape, b16, b16.nbytes))
        tensors[name] = _tensor_entry(qt, bias_param)
    for b in sorted(depths):
        table = np.ascontiguousarray(laplace_table_np(b).astype("<f4"))
        buffers.append(_Buffer(f"{LEVELS_PREFIX}{b}", "F32", table.shape, table, table.nbytes))
    buffers += body
    for name, value in unquantized.items():
        h = _as_f16(name, value)
        buffers.append(_Buffer(name, "F16", h.shape, h, h.nbytes))
    names = [b.name for b in buffers]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"buffer names collide: {dup[:5]}")
    for n in names:
        if n == "__metadata__" or n.startswith(PAD_PREFIX):
            raise ValueError(f"tensor name {n} is reserved by the format")
    return buffers, tensors


def write_packed(path: str | Path, qtensors: dict, unquantized: dict, *, plan_json: dict | None, config: dict,
                 biases: dict | None = None, budget: int | None = None) -> dict:
    """Write one ``cvxq-packed`` file (see ``docs/packed-format.md``).

    qtensors: name -> NativeTensor; unquantized: parameter name -> tensor
    (stored as float16, its own shape); biases: quantized weight name -> the
    corrected bias of its layer (stored as ``NAME.bias``, float16; the layer's
    original bias must then not be in ``unquantized``). ``budget`` (default:
    ``plan_json["budget_bytes"]``): the file is not written if it would be
    larger. Returns sizes for the report.
    """
    from ...io import atomic_path

    biases = dict(biases or {})
    unknown = sorted(set(biases) - set(qtensors))
    if unknown:
        raise ValueError(f"biases given for tensors that are not quantized: {unknown[:5]}")
    buffers, tensors = _buffers_for(qtensors, unquantized, biases)
    entries, data_len = _layout(buffers)
    metadata = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "checksum": "crc32",
        HEADER_CRC_KEY: _HEADER_CRC_PLACEHOLDER.decode(),
        "tensors": _dumps(tensors),
        "crc32": _dumps({b.name: _crc(b.data) for b in buffers}),
        "plan": _dumps(_plan_for_header(plan_json)),
        "config": _dumps(config),
    }
    header = _encode_header(entries, metadata)
    size = 8 + len(header) + data_len
    if budget is None and plan_json is not None:
        budget = plan_json.get("budget_bytes") or None
    if budget is not None and size > budget:
        raise CvxqError(
            f"the packed file would take {size:,} bytes, over the budget of {budget:,} bytes "
            f"(header {len(header):,} bytes, {size - budget:,} bytes too many)",
            "plan with formats.packed.plan_packed (what `fit --format packed` does), which reserves room for "
            "the header, level tables and alignment; or raise the budget")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            pos = 0
            for buf, begin, end in entries:
                assert begin == pos
                if buf.data is None:  # padding
                    f.write(b"\0" * (end - begin))
                else:
                    f.write(memoryview(np.ascontiguousarray(buf.data)).cast("B"))
                pos = end
            f.flush()
            os.fsync(f.fileno())
        if tmp.stat().st_size != size:  # pragma: no cover - a short write
            raise CvxqError(f"wrote {tmp.stat().st_size} bytes to {path}, expected {size}", "check the free disk space")
    level_bytes = sum(_align(b.nbytes) for b in buffers if b.name.startswith(LEVELS_PREFIX))
    return {"path": str(path), "file_bytes": size, "header_bytes": 8 + len(header), "level_bytes": level_bytes,
            "budget_bytes": budget, "tensors": len(qtensors), "unquantized": len(unquantized), "biases": len(biases)}


# --------------------------------------------------------------------------- header reserve


_BIG_FLOAT = -1.2345678901234567e-300  # a float with the longest repr (24 characters)


def _maximize(obj: Any, big_int: int) -> Any:
    """Replace every number (and null) by a placeholder at least as long as any real value."""
    if isinstance(obj, bool):
        return obj
    if isinstance(obj, int):
        return big_int
    if isinstance(obj, float) or obj is None:
        return _BIG_FLOAT
    if isinstance(obj, dict):
        return {k: _maximize(v, big_int) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_maximize(v, big_int) for v in obj]
    return obj


def overhead_upper_bound(tensors: dict[str, dict], unquantized: dict[str, tuple[int, ...]], config: dict,
                         plan_json: dict | None) -> int:
    """Bytes a packed file takes beyond what the plan counts (quantized tensors
    at :func:`native_tensor_bytes`, unquantized tensors and biases at 2 bytes a
    value): the 8-byte length, the header, the level tables of all eight bit
    depths, and the alignment padding after each unquantized tensor and bias.

    tensors: quantized name -> the header's tensor entry, exactly as the writer
    will store it (``bias`` set where a corrected bias is stored); unquantized:
    name -> shape; plan_json: a plan of the same tensors with any numbers.

    The header is bounded by building it with every buffer at its largest
    possible size (8-bit codes, a scale per unit) followed by a padding entry,
    so every real offset, size and name has at most as many digits, and with
    the plan's numbers replaced by placeholders at least as long as any value.
    """
    buffers: list[tuple[_Buffer, bool]] = []  # (largest buffer, size known exactly)

    def add(name: str, dtype: str, shape: tuple[int, ...], nbytes: int, exact: bool = True) -> None:
        buffers.append((_Buffer(name, dtype, shape, None, nbytes), exact))

    for b in range(1, MAX_BITS + 1):
        add(f"{LEVELS_PREFIX}{b}", "F32", (1 << b,), 4 << b)
    for name, t in tensors.items():
        rows, cols = t["shape"]
        size = t["row_group"] * t["col_group"]
        n_units = (rows // t["row_group"]) * (cols // t["col_group"])
        add(f"{name}.codes", "U8", (n_units * size,), n_units * size, exact=False)
        add(f"{name}.map", "U8", (n_units,), n_units)
        add(f"{name}.offset", "F16", (n_units,), 2 * n_units)
        add(f"{name}.scale", "F16", (n_units,), 2 * n_units, exact=False)
        if t.get("bias"):
            add(f"{name}.bias", "F16", (rows,), 2 * rows)
    for name, shape in unquantized.items():
        add(name, "F16", tuple(shape), 2 * int(np.prod(shape, dtype=np.int64)))
    # Each buffer starts aligned, so a pad follows it only if its size is not a
    # multiple of 64: known for all but codes and scales, which always get one
    # here (63 bytes): every real offset is at most the one computed here.
    entries: list[tuple[_Buffer, int, int]] = []
    pos = n_pad = 0
    for buf, exact in buffers:
        entries.append((buf, pos, pos + buf.nbytes))
        pos += buf.nbytes
        if not exact or buf.nbytes % ALIGN:
            entries.append((_Buffer(f"{PAD_PREFIX}{n_pad}", "U8", (ALIGN - 1,), None, ALIGN - 1), pos, pos + ALIGN - 1))
            pos += ALIGN - 1
            n_pad += 1
    big_int = 10 ** len(str(10 * pos))  # more digits than any byte count or weight count of this model
    metadata = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "checksum": "crc32",
        HEADER_CRC_KEY: _HEADER_CRC_PLACEHOLDER.decode(),
        "tensors": _dumps(tensors),
        "crc32": _dumps({b.name: "ffffffff" for b, _ in buffers}),
        "plan": _dumps(_maximize(_plan_for_header(plan_json), big_int)),
        "config": _dumps(config),
    }
    header = 8 + len(_encode_header(entries, metadata)) + ALIGN
    levels = sum(_align(4 << b) for b in range(1, MAX_BITS + 1))
    n_bias = sum(1 for t in tensors.values() if t.get("bias"))
    return header + levels + (ALIGN - 1) * (len(unquantized) + n_bias)


# =========================================================================== reader


@dataclass(frozen=True)
class BufferInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class TensorInfo:
    """One quantized tensor as the header describes it."""

    name: str
    rows: int
    cols: int
    row_group: int
    col_group: int
    transposed: bool
    also: tuple[str, ...]
    bias: str | None  # the model parameter its corrected bias replaces

    @property
    def unit_size(self) -> int:
        return self.row_group * self.col_group

    @property
    def n_units(self) -> int:
        return (self.rows // self.row_group) * (self.cols // self.col_group)


def _bad(path, what: str, fix: str = "re-export the file; it is damaged or was not written by cvxq-export") -> CvxqError:
    return CvxqError(f"{path}: not a valid {FORMAT_NAME} file: {what}", fix)


def _is_int(x) -> bool:
    return type(x) is int  # noqa: E721 - bool is not an integer here


def _unique_pairs(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _loads(text: str):
    return json.loads(text, object_pairs_hook=_unique_pairs,
                      parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"{c} is not valid JSON")))


class PackedFile:
    """A validated ``cvxq-packed`` file, memory-mapped (or decoded from a
    compressed container). Use :func:`read_packed`.

    Opened with ``lazy=True``, the checks that need a tensor's bytes (its
    checksums, unit map, code count, ...) run on the first access to any of
    its buffers instead of at open, so reading one tensor touches only that
    tensor's bytes (and, for a container, only its chunks).
    """

    def __init__(self, path: Path, metadata: dict[str, str], buffers: dict[str, BufferInfo],
                 tensors: dict[str, TensorInfo], data: np.ndarray, mm: mmap.mmap | None, header_bytes: int,
                 *, deferred_crcs: dict[str, str] | None = None, deferred_tensors: bool = False, container=None):
        self.path = path
        self.metadata = metadata
        self.buffers = buffers
        self.tensors = tensors
        self._data = data  # uint8 view of the whole file
        self._mmap = mm
        self.header_bytes = header_bytes
        self.version = metadata["version"]
        self.plan_json: dict = _loads(metadata["plan"]) if "plan" in metadata else {}
        self.config: dict = _loads(metadata["config"]) if "config" in metadata else {}
        owned = {f"{n}.{s}" for n in tensors for s in CODE_SUFFIXES}
        owned |= {f"{n}.bias" for n, t in tensors.items() if t.bias}
        self.unquantized_names = [n for n in buffers if n not in owned and not n.startswith((LEVELS_PREFIX, PAD_PREFIX))]
        # the compressed container the bytes come from (formats.packed_compressed.ChunkedContainer), if any
        self.container = container
        self._pending_crcs = dict(deferred_crcs or {})  # buffer -> crc32 still to check (lazy, uncompressed)
        self._pending_tensors = set(tensors) if deferred_tensors else set()
        self._owner = {f"{n}.{s}": n for n in tensors for s in (*CODE_SUFFIXES, "bias")} if deferred_tensors else {}

    @property
    def compressed(self) -> bool:
        return self.container is not None

    @property
    def stored_bytes(self) -> int:
        """Bytes on disk (the container's size for a compressed file)."""
        return self.container.file_size if self.container is not None else self.file_bytes

    def _check_buffer(self, name: str) -> None:
        want = self._pending_crcs.get(name)
        if want is not None:
            b = self.buffers[name]
            got = _crc(self._data[b.begin : b.end])
            if got != want:  # stays pending: every later access fails the same way
                raise _bad(self.path, f"{name}: crc32 {got} does not match the stored {want} (corrupted data)")
            del self._pending_crcs[name]

    def _check_on_access(self, name: str) -> None:
        """Lazy mode: the deferred checks of the tensor owning buffer ``name`` (or of the buffer alone)."""
        owner = self._owner.get(name)
        if owner is not None and owner in self._pending_tensors:
            t = self.tensors[owner]
            for suffix in (*CODE_SUFFIXES, "bias"):
                if f"{owner}.{suffix}" in self.buffers:
                    self._check_buffer(f"{owner}.{suffix}")
            _check_tensor_data(self.path, t, self.buffers, self._data)
            self._pending_tensors.discard(owner)
        self._check_buffer(name)

    def verify_all(self) -> None:
        """Run every check a lazy open deferred (padding included); a no-op after an eager open."""
        for name in list(self._pending_tensors):
            self._check_on_access(f"{name}.map")
        for name in list(self._pending_crcs):
            self._check_buffer(name)
        for name, b in self.buffers.items():
            if name.startswith(PAD_PREFIX) and b.nbytes and self._data[b.begin : b.end].any():
                raise _bad(self.path, f"{name}: padding bytes are not zero")

    # -- lifecycle
    def close(self) -> None:
        self._data = None
        if self.container is not None:
            self.container.close()
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # views still alive elsewhere; the GC closes it
                pass
            self._mmap = None

    def __enter__(self) -> "PackedFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def file_bytes(self) -> int:
        return int(self._data.size)

    # -- raw access
    def raw(self, name: str) -> np.ndarray:
        """A buffer as a read-only NumPy array of its dtype and shape (no copy)."""
        info = self.buffers[name]
        if self._pending_tensors or self._pending_crcs:
            self._check_on_access(name)
        arr = self._data[info.begin : info.end].view(DTYPES[info.dtype])
        return arr.reshape(info.shape)

    def levels(self, bits: int) -> np.ndarray:
        return self.raw(f"{LEVELS_PREFIX}{bits}")

    def unit_map(self, name: str) -> np.ndarray:
        return self.raw(f"{name}.map")

    def unquantized(self, name: str) -> np.ndarray:
        if name not in self.unquantized_names:
            raise KeyError(name)
        return self.raw(name)

    def bias(self, name: str) -> np.ndarray | None:
        return self.raw(f"{name}.bias") if self.tensors[name].bias else None

    def plan(self):
        """The plan (plan.Plan) the file was made from, unit maps restored from the file."""
        from ...plan import Plan, TensorPlan

        d = dict(self.plan_json)
        if not d.get("tensors"):
            raise CvxqError(f"{self.path} carries no plan", "re-export it with cvxq-export")
        tensors = []
        for t in d.pop("tensors"):
            t = dict(t)
            if t["name"] in self.tensors:
                t["unit_map"] = np.array(self.unit_map(t["name"]))
            tensors.append(TensorPlan(**{k: v for k, v in t.items() if k in TensorPlan.__dataclass_fields__}))
        known = set(Plan.__dataclass_fields__) - {"tensors"}
        return Plan(tensors=tensors, **{k: v for k, v in d.items() if k in known})

    # -- decoding
    def unit_codes(self, name: str, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Codes of units ``lo..hi`` as ``[n, unit_size]`` uint8 (zero-bit units: 0)."""
        t = self.tensors[name]
        hi = t.n_units if hi is None else hi
        bits = (self.unit_map(name) & 0x0F).astype(np.int64)
        start = np.zeros(t.n_units + 1, dtype=np.int64)
        np.cumsum(bits * t.unit_size, out=start[1:])
        return _unpack(self.raw(f"{name}.codes"), bits[lo:hi], start[lo:hi], t.unit_size)

    def weight(self, name: str) -> np.ndarray:
        """The dequantized ``[rows, cols]`` float32 weight, bit for bit what the
        quantizer's ``dequant`` holds (float32 ``offset + code * scale``,
        ``offset + scale * level``, or ``offset``; multiply, round, add, round)."""
        if name not in self.tensors:
            raise KeyError(f"{name} is not a quantized tensor of {self.path}")
        t = self.tensors[name]
        r, c, size = t.row_group, t.col_group, t.unit_size
        n_cg = t.cols // c
        m = self.unit_map(name)
        bits, kind = (m & 0x0F).astype(np.int64), ((m >> 4) & 1).astype(np.int64)
        start = np.zeros(t.n_units + 1, dtype=np.int64)
        np.cumsum(bits * size, out=start[1:])
        offset = self.raw(f"{name}.offset").astype(np.float32)
        scale = np.zeros(t.n_units, dtype=np.float32)
        scale[bits > 0] = self.raw(f"{name}.scale").astype(np.float32)
        codes_buf = self.raw(f"{name}.codes")
        tables = {b: self.levels(b).astype(np.float32) for b in np.unique(bits[(kind == 1) & (bits > 0)]).tolist()}
        try:
            out = np.empty((t.rows, t.cols), dtype=np.float32)
        except MemoryError:
            raise CvxqError(f"{self.path}: tensor {name} claims [{t.rows:,}, {t.cols:,}] weights, more float32 than "
                            "this machine can hold", "check that the file is intact; decode it on a larger machine") from None
        # one step decodes at most ~_CHUNK weights: several row groups when a row group is
        # small, else a run of column groups of one row group (temporaries stay bounded)
        per_step = max(1, _CHUNK // size)  # units per step
        for rg0, rg1, cg0, cg1 in _steps(t.rows // r, n_cg, per_step):
            lo, hi = rg0 * n_cg + cg0, (rg1 - 1) * n_cg + cg1
            b, kd = bits[lo:hi], kind[lo:hi]
            codes = _unpack(codes_buf, b, start[lo:hi], size)
            off, sc = offset[lo:hi], scale[lo:hi]
            val = np.empty((hi - lo, size), dtype=np.float32)  # [units, r * c]
            zero = b == 0
            val[zero] = off[zero][:, None]
            uni = (b > 0) & (kd == 0)
            val[uni] = off[uni][:, None] + codes[uni].astype(np.float32) * sc[uni][:, None]
            for depth, table in tables.items():
                sel = (b == depth) & (kd == 1)
                if sel.any():
                    val[sel] = off[sel][:, None] + sc[sel][:, None] * table[codes[sel]]
            k, n = rg1 - rg0, cg1 - cg0  # [k row groups, n column groups, r, c] -> [k * r, n * c]
            out[rg0 * r : rg1 * r, cg0 * c : cg1 * c] = val.reshape(k, n, r, c).transpose(0, 2, 1, 3).reshape(k * r, n * c)
        return out

    def checksum(self, name: str) -> str:
        """:func:`weight_checksum` of :meth:`weight` (what ``packed_decoder FILE NAME`` prints)."""
        return weight_checksum(self.weight(name))


def _steps(n_rg: int, n_cg: int, per_step: int):
    """Decode steps ``(rg0, rg1, cg0, cg1)`` of at most ``per_step`` units each: whole
    row groups ``rg0..rg1`` when one fits, else column-group runs of one row group."""
    if n_cg <= per_step:
        k = per_step // n_cg
        for rg in range(0, n_rg, k):
            yield rg, min(rg + k, n_rg), 0, n_cg
    else:
        for rg in range(n_rg):
            for cg in range(0, n_cg, per_step):
                yield rg, rg + 1, cg, min(cg + per_step, n_cg)


def _unpack(buf: np.ndarray, bits: np.ndarray, start: np.ndarray, size: int) -> np.ndarray:
    """Codes ``[n, size]`` of units with ``bits[i]`` bits starting at bit ``start[i]``."""
    n = len(bits)
    if n == 0 or len(buf) == 0 or not bits.any():
        return np.zeros((n, size), dtype=np.uint8)
    last = len(buf) - 1
    pos = start[:, None] + np.arange(size, dtype=np.int64)[None, :] * bits[:, None]  # bit offset of each code
    byte = np.minimum(pos >> 3, last)
    # a code spans at most two bytes (bits <= 8, shift <= 7); where byte + 1 is
    # past the end, the code lies inside `byte` and the mask drops the rest
    window = buf[byte].astype(np.uint16) | (buf[np.minimum(byte + 1, last)].astype(np.uint16) << 8)
    mask = ((1 << bits) - 1).astype(np.uint16)[:, None]
    return ((window >> (pos & 7).astype(np.uint16)) & mask).astype(np.uint8)


def read_packed(path: str | Path, *, verify_checksums: bool = True, lazy: bool = False) -> PackedFile:
    """Open and validate a ``cvxq-packed`` file; every problem is a CvxqError.

    Everything is checked before any tensor is decoded: header length vs file
    size, header size limit, JSON, format and version, every buffer's dtype,
    shape, byte count, bounds, alignment and overlap, the tensors' geometry,
    unit maps, code and scale counts, level tables, zero padding, checksums.

    A compressed container (``*.cvxqz``, :mod:`.packed_compressed`) is
    recognised by its magic and read transparently: its index is validated,
    every chunk is decoded (and its CRC-32 checked with ``verify_checksums``;
    the chunk CRCs cover every byte, so the per-buffer CRCs are then
    redundant and skipped), and the payload goes through the same checks.

    ``lazy=True`` checks only the header at open and each tensor's bytes on
    first access (:class:`PackedFile`); for a container, only the chunks a
    read touches are decoded. ``PackedFile.verify_all()`` runs the rest.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except FileNotFoundError:
        raise CvxqError(f"{path} does not exist", "check the path") from None
    except OSError as exc:
        raise CvxqError(f"cannot open {path}: {exc.strerror or exc}", "check the path and its permissions") from None
    with f:
        if size < 8:
            raise _bad(path, f"the file has {size} bytes, fewer than the 8-byte header length (truncated?)")
        first = f.read(8)
        from .compressed import MAGIC as CONTAINER_MAGIC

        if first == CONTAINER_MAGIC:
            return _read_compressed(path, verify_checksums, lazy)
        n = int.from_bytes(first, "little")
        _check_header_length(path, n, size, "file (truncated?)")
        raw = f.read(n)
        if len(raw) != n:  # pragma: no cover - file shrank while reading
            raise _bad(path, "the file shrank while it was read")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        data = np.frombuffer(mm, dtype=np.uint8)
        pf = _validate(path, raw, size, data, mm, verify_checksums, deferred=lazy)
    except BaseException:
        data = None  # noqa: F841 - drop the view so the map can close
        try:
            mm.close()
        except BufferError:
            pass
        raise
    return pf


def _check_header_length(path, n: int, size: int, what: str) -> None:
    """The 8-byte header length must be plausible before anything is read or allocated for it."""
    if n > MAX_HEADER_BYTES:
        raise _bad(path, f"header length {n:,} bytes exceeds the limit of {MAX_HEADER_BYTES:,} bytes")
    if n < 2:
        raise _bad(path, f"header length {n} is too small for a JSON object")
    if 8 + n > size:
        raise _bad(path, f"header length {n:,} runs past the end of the {size:,}-byte {what}")


def _read_compressed(path: Path, verify: bool, lazy: bool) -> PackedFile:
    """:func:`read_packed` of a container: the same checks, on the decoded payload."""
    from .compressed import ChunkedContainer, LazyBytes

    container = ChunkedContainer.open(path, verify=verify)
    mm = None
    try:
        size = container.raw_size
        if size < 8:
            raise _bad(path, f"the payload has {size} bytes, fewer than the 8-byte header length")
        n = int.from_bytes(container.read_range(0, 8), "little")
        _check_header_length(path, n, size, "payload")
        raw = container.read_range(8, 8 + n)
        if lazy:
            data = LazyBytes(container)
        else:
            try:
                mm = mmap.mmap(-1, max(size, 1))  # anonymous: pages are only committed as chunks land
            except (OSError, ValueError, OverflowError, MemoryError):
                raise CvxqError(f"{path}: cannot allocate {size:,} bytes for the decoded file",
                                "open it with read_packed(path, lazy=True) to decode tensors one at a time") from None
            container.read_into(mm)
            data = np.frombuffer(mm, dtype=np.uint8)[:size]
        # the chunk CRCs (checked while decoding when verify is on) cover every byte: no per-buffer CRCs
        pf = _validate(path, raw, size, data, mm, False, deferred=lazy, container=container)
    except BaseException:
        data = None  # noqa: F841 - drop the view so the map can close
        container.close()
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass
        raise
    if not lazy:
        container.close()  # everything is decoded; keep the (closed) container for its index and sizes
    return pf


def _validate(path: Path, raw: bytes, size: int, data: np.ndarray, mm, verify: bool, *, deferred: bool = False,
              container=None) -> PackedFile:
    """Every check of :func:`read_packed`. With ``deferred``, only what the header
    alone decides; the checks that read tensor bytes wait for their first access."""
    bad = lambda what: _bad(path, what)  # noqa: E731
    if raw[:1] != b"{":
        raise bad("the header does not start with '{'")
    # the header checksum first: an edited header (plan, config, shapes, flags) is
    # refused as such instead of being read as different content
    crc_at = _header_crc_position(raw)
    stored_crc = raw[crc_at : crc_at + 8] if crc_at >= 0 else b""
    if crc_at >= 0 and re.fullmatch(rb"[0-9a-f]{8}", stored_crc) and raw[crc_at + 8 : crc_at + 9] == b'"':
        if header_checksum(raw) != stored_crc.decode():
            raise bad(f"header crc32 {header_checksum(raw)} does not match the stored {stored_crc.decode()} "
                      "(corrupted or edited header)")
    else:  # refused below, once the header shows whether it is a cvxq-packed file of this version at all
        stored_crc = None
    try:
        header = _loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise bad(f"the header is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        raise bad(f"the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is None or isinstance(meta, dict) and "format" not in meta:
        raise CvxqError(f"{path} is not a {FORMAT_NAME} file (its header names no format)",
                        "pass a file written by `cvxq-export fit --format packed`")
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise bad("__metadata__ is missing or not a string -> string map")
    if meta.get("format") != FORMAT_NAME:
        raise CvxqError(f"{path} is not a {FORMAT_NAME} file (format {meta.get('format')!r})",
                        "pass a file written by `cvxq-export fit --format packed`")
    if meta.get("version") not in KNOWN_VERSIONS:
        raise CvxqError(f"{path} has {FORMAT_NAME} version {meta.get('version')!r}; this reader knows version "
                        f"{', '.join(KNOWN_VERSIONS)}", "upgrade cvxq-export, or re-export the file with this version")
    if meta.get("checksum") != "crc32":
        raise bad(f"unknown checksum algorithm {meta.get('checksum')!r} (version {FORMAT_VERSION} uses crc32)")
    if stored_crc is None:
        raise bad("the header has no single header_crc32 field of 8 lowercase hex digits")
    if meta.get(HEADER_CRC_KEY) != stored_crc.decode():
        raise bad(f"__metadata__ {HEADER_CRC_KEY} is not the header's one checksum field")
    for key in ("tensors", "crc32"):
        if key not in meta:
            raise bad(f"__metadata__ has no {key!r}")
    start = 8 + len(raw)
    if start % ALIGN:
        raise bad(f"the data section starts at byte {start}, not on a {ALIGN}-byte boundary")
    data_len = size - start

    # ---- buffers: dtype, shape, byte count, bounds
    buffers: dict[str, BufferInfo] = {}
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"entry {name!r} must be an object with dtype, shape and data_offsets")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise bad(f"{name}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise bad(f"{name}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise bad(f"{name}: data_offsets {offsets!r} is not two integers")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise bad(f"{name}: data_offsets [{begin}, {end}] are not ordered")
        if end > data_len:
            raise bad(f"{name}: bytes [{begin}, {end}) run past the end of the data section ({data_len:,} bytes; truncated?)")
        count = int(np.prod(shape, dtype=object)) if shape else 1
        if count * DTYPES[dtype].itemsize != end - begin:
            raise bad(f"{name}: shape {shape} of {dtype} is {count * DTYPES[dtype].itemsize:,} bytes "
                      f"but data_offsets span {end - begin:,}")
        if not name.startswith(PAD_PREFIX) and (start + begin) % ALIGN:
            raise bad(f"{name}: starts at file offset {start + begin}, not on a {ALIGN}-byte boundary")
        buffers[name] = BufferInfo(name, dtype, tuple(shape), start + begin, start + end)
    ordered = sorted(buffers.values(), key=lambda b: (b.begin, b.end))
    for prev, cur in zip(ordered, ordered[1:]):
        if cur.begin < prev.end:
            raise bad(f"buffers {prev.name} and {cur.name} overlap")
    used = max((b.end for b in ordered), default=start) - start
    if used != data_len:
        raise bad(f"the data section has {data_len - used:,} bytes after its last buffer")

    # ---- metadata JSON
    try:
        tmeta = _loads(meta["tensors"])
        crcs = _loads(meta["crc32"])
        for key in ("plan", "config"):
            if key in meta:
                _loads(meta[key])
    except (ValueError, RecursionError) as exc:
        raise bad(f"__metadata__ holds invalid JSON ({exc})") from None
    if not isinstance(tmeta, dict) or not isinstance(crcs, dict):
        raise bad("__metadata__ 'tensors' and 'crc32' must be JSON objects")

    # ---- checksums first: corrupted bytes are reported as such, not as odd content
    for name, b in buffers.items():
        if name.startswith(PAD_PREFIX):
            continue
        want = crcs.get(name)
        if not isinstance(want, str) or not re.fullmatch(r"[0-9a-f]{8}", want):
            raise bad(f"{name}: no crc32 checksum (8 lowercase hex digits) in __metadata__")
        if verify and not deferred and _crc(data[b.begin : b.end]) != want:
            raise bad(f"{name}: crc32 {_crc(data[b.begin : b.end])} does not match the stored {want} (corrupted data)")

    # ---- quantized tensors, level tables, padding, unquantized tensors
    tensors: dict[str, TensorInfo] = {}
    for name, t in tmeta.items():
        tensors[name] = _check_tensor(path, name, t, buffers)
        if not deferred:
            _check_tensor_data(path, tensors[name], buffers, data)
    owned = {f"{n}.{s}" for n in tensors for s in CODE_SUFFIXES} | {f"{n}.bias" for n, t in tensors.items() if t.bias}
    for name, b in buffers.items():
        if name.startswith(LEVELS_PREFIX):
            depth = name[len(LEVELS_PREFIX):]
            if not re.fullmatch(r"[1-8]", depth) or b.dtype != "F32" or b.shape != (1 << int(depth),):
                raise bad(f"{name}: level tables are __levels__.b1..b8, F32 of 2^bits values")
        elif name.startswith(PAD_PREFIX):
            if b.dtype != "U8" or len(b.shape) != 1:
                raise bad(f"{name}: padding must be U8 with one dimension")
            if b.nbytes and not deferred and data[b.begin : b.end].any():
                raise bad(f"{name}: padding bytes are not zero")
        elif name not in owned and b.dtype != "F16":
            raise bad(f"{name}: unquantized tensors are F16, found {b.dtype}")
    extra = sorted(set(crcs) - set(buffers))
    if extra:
        raise bad(f"crc32 names buffers the file does not have: {extra[:3]}")
    pending = {n: crcs[n] for n in buffers if not n.startswith(PAD_PREFIX)} if deferred and verify else None
    return PackedFile(path, meta, buffers, tensors, data, mm, start, deferred_crcs=pending, deferred_tensors=deferred,
                      container=container)


def _check_tensor(path, name: str, t: Any, buffers: dict[str, BufferInfo]) -> TensorInfo:
    """The checks of one tensor that the header alone decides."""
    bad = lambda what: _bad(path, f"tensor {name}: {what}")  # noqa: E731
    if not isinstance(t, dict):
        raise bad("its entry is not an object")
    shape, r, c = t.get("shape"), t.get("row_group"), t.get("col_group")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(s) and s > 0 for s in shape)):
        raise bad(f"shape {shape!r} is not [rows, cols] of positive integers")
    rows, cols = shape
    if not (_is_int(r) and _is_int(c) and r > 0 and c > 0):
        raise bad("row_group and col_group must be positive integers")
    if rows % r or cols % c:
        raise bad(f"units of {r}x{c} do not tile [{rows}, {cols}]")
    if r * c > MAX_UNIT_SIZE:
        raise bad(f"unit size {r * c:,} exceeds the limit {MAX_UNIT_SIZE:,}")
    if rows * cols > MAX_TENSOR_ELEMENTS:
        raise bad(f"[{rows:,}, {cols:,}] exceeds the limit of {MAX_TENSOR_ELEMENTS:,} weights per tensor")
    transposed, also, bias = t.get("transposed"), t.get("also", []), t.get("bias")
    if not isinstance(transposed, bool):
        raise bad("transposed must be true or false")
    if not (isinstance(also, list) and all(isinstance(a, str) for a in also)):
        raise bad("also must be a list of names")
    if bias is not None and not isinstance(bias, str):
        raise bad("bias must be a parameter name or null")
    n_units = (rows // r) * (cols // c)
    want = {"codes": "U8", "map": "U8", "offset": "F16", "scale": "F16"} | ({"bias": "F16"} if bias else {})
    for suffix, dtype in want.items():
        b = buffers.get(f"{name}.{suffix}")
        if b is None:
            raise bad(f"buffer {name}.{suffix} is missing")
        if b.dtype != dtype or len(b.shape) != 1:
            raise bad(f"buffer {name}.{suffix} must be 1-D {dtype}, found {b.dtype} {list(b.shape)}")
    for suffix, n in (("map", n_units), ("offset", n_units)) + ((("bias", rows),) if bias else ()):
        if buffers[f"{name}.{suffix}"].shape[0] != n:
            raise bad(f"buffer {name}.{suffix} has {buffers[f'{name}.{suffix}'].shape[0]:,} values, expected {n:,}")
    return TensorInfo(name, rows, cols, r, c, transposed, tuple(also), bias)


def _check_tensor_data(path, info: TensorInfo, buffers: dict[str, BufferInfo], data) -> None:
    """The checks of one tensor that read its bytes: unit map, code count and tail, scales, level tables."""
    name, r, c = info.name, info.row_group, info.col_group
    bad = lambda what: _bad(path, f"tensor {name}: {what}")  # noqa: E731
    mb = buffers[f"{name}.map"]
    m = data[mb.begin : mb.end]
    illegal = ((m & 0x0F) > MAX_BITS) | ((m >> 5) != 0)
    if illegal.any():
        u = int(np.nonzero(illegal)[0][0])
        raise bad(f"unit {u} has map byte 0x{int(m[u]):02x}: bits must be 0..8 (low nibble), kind 0..1 (bit 4), bits 5-7 zero")
    bits = (m & 0x0F).astype(np.int64)
    total_bits = int(bits.sum()) * r * c
    cb = buffers[f"{name}.codes"]
    if cb.nbytes != -(-total_bits // 8):
        raise bad(f"codes hold {cb.nbytes:,} bytes, the map needs {-(-total_bits // 8):,} ({total_bits:,} bits)")
    if total_bits % 8 and data[cb.end - 1] >> (total_bits % 8):
        raise bad("the unused high bits of the last code byte are not zero")
    n_scaled = int((bits > 0).sum())
    if buffers[f"{name}.scale"].shape[0] != n_scaled:
        raise bad(f"scale has {buffers[f'{name}.scale'].shape[0]:,} values, expected {n_scaled:,} (units with bits > 0)")
    for suffix in ("offset", "scale"):
        b = buffers[f"{name}.{suffix}"]
        if not np.isfinite(data[b.begin : b.end].view("<f2")).all():
            raise bad(f"{suffix} holds an infinite or NaN value (no quantizer writes one)")
    kinds = (m >> 4) & 1
    for depth in np.unique(bits[(kinds == 1) & (bits > 0)]).tolist():
        table = buffers.get(f"{LEVELS_PREFIX}{depth}")
        if table is None:
            raise bad(f"companded units at {depth} bits but no {LEVELS_PREFIX}{depth} level table")
        if table.dtype == "F32" and not np.isfinite(data[table.begin : table.end].view("<f4")).all():
            raise bad(f"{LEVELS_PREFIX}{depth} holds an infinite or NaN level")


# =========================================================================== model side (torch)


def collect_unquantized(loaded, qtensors: dict, sens=None, *, bias_correction: bool = True) -> tuple[dict, dict]:
    """What the file stores besides the quantized tensors: every other parameter
    (tied ones once) and, where a quantized layer has a bias and calibration
    recorded its mean input, CVXQ's corrected bias (the same values
    :func:`pipeline.apply_quantized` computes) in place of the original.
    Call before the model's weights are overwritten."""
    import torch

    from ...quantizers import bias_correction as correct

    biases: dict[str, Any] = {}
    with torch.no_grad():
        if bias_correction and sens is not None:
            for name, qt in qtensors.items():
                ref = qt.ref
                if ref.has_bias and name in sens.stats and sens[name].input_mean is not None:
                    module = loaded.model.get_submodule(ref.module)
                    original = loaded.weight_tensor(ref).detach()
                    mean = torch.from_numpy(sens[name].input_mean)
                    biases[name] = correct(module.bias, original, qt.dequant, mean).float()
        skip = set(qtensors) | {a for qt in qtensors.values() for a in qt.ref.also}
        skip |= {f"{qtensors[n].ref.module}.bias" for n in biases}
        unquantized = {name: p.detach() for name, p in loaded.model.named_parameters() if name not in skip}
    return unquantized, biases


# Config fields about how the source was read, not what the model is: transformers' marker
# of a GGUF-loaded model (a reader would take the packed model for a GGUF one) and a local path.
SOURCE_CONFIG_FIELDS = ("quantization_config", "_name_or_path")


def model_config_json(loaded) -> dict:
    config = json.loads(loaded.config.to_json_string(use_diff=False))
    return {k: v for k, v in config.items() if k not in SOURCE_CONFIG_FIELDS}


def header_reserve(loaded, refs, geometry, stat_row_group: int, corrected: set[str], fingerprint: str = "",
                   scope: str = "all") -> int:
    """Bytes the packed file needs beyond the native plan's (header, level tables, alignment of
    unquantized tensors), an upper bound from the shapes alone. ``corrected``: the bias
    parameters stored bias-corrected next to their weight."""
    from ...plan import Plan, TensorPlan

    quantized = {r.name for r in refs} | {a for r in refs for a in r.also}
    tensors, tplans = {}, []
    for r in refs:
        rg = geometry.row_group_for(r.rows, stat_row_group)
        tensors[r.name] = {"shape": [r.rows, r.cols], "row_group": rg, "col_group": geometry.col_group,
                           "transposed": r.transposed, "also": list(r.also),
                           "bias": f"{r.module}.bias" if f"{r.module}.bias" in corrected else None}
        tplans.append(TensorPlan(r.name, r.rows, r.cols, "native", rg, geometry.col_group, None, 0, 0.0))
    unq = {n: tuple(p.shape) for n, p in loaded.model.named_parameters() if n not in quantized and n not in corrected}
    template = Plan("packed", 0, 0, 0, 0.0, 0.0, 0, 0, loaded.source.display if loaded.source else "",
                    fingerprint, tplans, scope)
    return overhead_upper_bound(tensors, unq, model_config_json(loaded), json.loads(template.to_json()))


def plan_packed(loaded, sens, budget: int, *, scope: str = "all", geometry=None, progress: bool = True, menu=None):
    """:func:`pipeline.plan_native` with the packed file's own overhead (header,
    level tables, alignment of unquantized tensors) counted as fixed bytes, so
    ``plan.total_bytes`` bounds the file size and the file fits ``budget``."""
    from ...native import Geometry
    from ...pipeline import plan_native, select_weights

    geometry = geometry or Geometry()
    refs = select_weights(loaded, scope)
    has_stats = lambda r: r.name in sens.stats and sens[r.name].input_mean is not None  # noqa: E731
    corrected = {f"{r.module}.bias" for r in refs if r.has_bias and has_stats(r)}
    reserve = header_reserve(loaded, refs, geometry, sens.settings.row_group, corrected, sens.model_fingerprint, scope)
    plan, _ = plan_native(loaded, sens, budget, scope=scope, geometry=geometry, progress=progress, menu=menu,
                          extra_fixed_bytes=reserve)
    plan.format = "packed"
    return plan


def export_packed(loaded, sens, plan, out: str | Path, *, progress: bool = True, bias_correction: bool = True,
                  qtensors: dict | None = None, save_tokenizer: bool = True, hessians: dict | None = None,
                  load_into_model: bool = False) -> dict:
    """Quantize under ``plan`` and write ``OUT/model.cvxq.safetensors`` (plus
    config.json and the tokenizer), then read the file back with the NumPy
    reader and check every weight and bias bit for bit against the in-memory
    quantization and the file size on disk against the budget. With
    ``load_into_model`` the weights read back also go into ``loaded.model``
    (what :func:`load_packed_into_model` does, from the same single read)."""
    from ...io import write_text
    from ...pipeline import quantize_plan

    out = Path(out)
    if qtensors is None:
        qtensors = quantize_plan(loaded, sens, plan, progress=progress, hessians=hessians)
    unquantized, biases = collect_unquantized(loaded, qtensors, sens, bias_correction=bias_correction)
    path = out / FILE_NAME
    info = write_packed(path, qtensors, unquantized, plan_json=json.loads(plan.to_json()),
                        config=model_config_json(loaded), biases=biases, budget=plan.budget_bytes)
    write_text(out / "config.json", json.dumps(model_config_json(loaded), indent=2, sort_keys=True) + "\n")
    if save_tokenizer and loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(str(out))
    info.update(verify_packed(path, qtensors, biases, budget=plan.budget_bytes,
                              load_into=loaded if load_into_model else None))
    info["bias_corrected"] = sorted(biases)
    # the tensors quantize_plan fed back: those with a Hessian and single-column units
    info["error_feedback"] = sorted(n for n, qt in qtensors.items() if hessians and n in hessians and qt.col_group == 1)
    return info


def verify_packed(path: str | Path, qtensors: dict, biases: dict | None = None, *, budget: int | None = None,
                  load_into=None) -> dict:
    """Read ``path`` back with the NumPy reader: every weight must equal the
    in-memory ``dequant`` bit for bit, every bias its float16 rounding, and the
    file on disk must fit ``budget``. Raises CvxqError otherwise. ``load_into``
    (a LoadedModel): also put the file's weights into its model, as
    :func:`load_packed_into_model` does, decoding each tensor once for both."""
    size = os.path.getsize(path)
    if budget is not None and size > budget:
        raise CvxqError(f"{path} takes {size:,} bytes on disk, over the budget of {budget:,}", "re-plan with a smaller budget")
    mismatched = []
    with read_packed(path) as pf:
        decoded: dict[str, np.ndarray] = {}
        for name, qt in qtensors.items():
            got = pf.weight(name)
            want = _to_numpy(qt.dequant).astype(np.float32)
            if got.shape != want.shape or not np.array_equal(got.view(np.uint32), want.view(np.uint32)):
                mismatched.append(name)
            decoded[name] = got
        for name, b in (biases or {}).items():
            if not np.array_equal(pf.bias(name), _as_f16(name, b).reshape(-1)):
                mismatched.append(f"{name}.bias")
        if mismatched:
            raise CvxqError(f"{path}: read-back differs from the quantized model for {len(mismatched)} tensors "
                            f"({', '.join(mismatched[:3])})", "this is a bug in the packed writer or reader; please report it")
        if load_into is not None:
            _put_into_model(pf, path, load_into, decoded=decoded)
    return {"verified": True, "verified_tensors": len(qtensors), "file_bytes_on_disk": size}


def load_packed_into_model(path: str | Path, loaded, *, strict: bool = True) -> PackedFile:
    """Put a packed file's weights into ``loaded.model`` in place: quantized
    tensors dequantized (transposed back for Conv1D, copied to tied names),
    corrected biases, unquantized tensors. With ``strict``, every parameter
    of the model must come from the file. Returns the (closed) PackedFile."""
    with read_packed(path) as pf:
        _put_into_model(pf, path, loaded, strict=strict)
    return pf


def _put_into_model(pf: PackedFile, path, loaded, *, strict: bool = True,
                    decoded: dict[str, np.ndarray] | None = None) -> None:
    """:func:`load_packed_into_model` on an open file; ``decoded``: weights already decoded from it."""
    import torch

    model = loaded.model
    params = dict(model.named_parameters(remove_duplicate=False))

    def put(name: str, value: np.ndarray) -> None:
        p = params.get(name)
        if p is None:
            raise CvxqError(f"{path} holds {name}, which the model has no parameter for",
                            "load the file into the model it was exported from")
        t = torch.from_numpy(np.ascontiguousarray(value))
        if tuple(p.shape) != tuple(t.shape):
            raise CvxqError(f"{name}: the file holds shape {list(t.shape)}, the model {list(p.shape)}",
                            "load the file into the model it was exported from")
        p.copy_(t.to(device=p.device, dtype=p.dtype))
        done.add(id(p))

    done: set[int] = set()
    decoded = decoded or {}
    with torch.no_grad():
        for name, t in pf.tensors.items():
            w = decoded[name] if name in decoded else pf.weight(name)
            if t.transposed:
                w = w.T
            for n in (name, *t.also):
                put(n, w)
            if t.bias:
                put(t.bias, pf.bias(name).astype(np.float32))
        for name in pf.unquantized_names:
            put(name, pf.unquantized(name).astype(np.float32))
    if strict:
        missing = [n for n, p in params.items() if id(p) not in done]
        if missing:
            raise CvxqError(f"{path} does not hold {len(missing)} parameters of the model ({', '.join(missing[:3])})",
                            "load the file into the model it was exported from")


def write_compressed_packed(src: str | Path, dst: str | Path | None = None, *, codec: str = "zstd-3",
                            chunk_size: int | None = None, progress: bool = False) -> dict:
    """Compress a packed file into a container next to it (or at ``dst``), then read the result back.

    The source is fully validated first (checksums included), so the chunk CRCs
    are taken over known-good bytes; afterwards the container is opened with
    :func:`read_packed` (every chunk decoded and
    checked, every packed-format rule checked) before this returns.
    """
    from .compressed import CONTENT_PACKED, DEFAULT_CHUNK_BYTES, compressed_name, is_container, write_container

    src = Path(src)
    chunk_size = DEFAULT_CHUNK_BYTES if chunk_size is None else chunk_size
    dst = Path(dst) if dst is not None else compressed_name(src)
    if is_container(src):
        raise CvxqError(f"{src} is already a compressed container", "pass the uncompressed model.cvxq.safetensors")
    with read_packed(src):
        pass
    info = write_container(src, dst, codec, chunk_size, content=CONTENT_PACKED, progress=progress)
    with read_packed(dst) as pf:
        tensors = len(pf.tensors)
    return {**info.to_dict(), "source": str(src), "verified": True, "tensors": tensors}


def decoder_source() -> Path:
    """Path of the C reference decoder's source shipped with the package."""
    return Path(__file__).with_name("packed_decoder.c")


__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "FILE_NAME", "PackedFile", "TensorInfo", "BufferInfo", "write_packed",
    "read_packed", "load_packed_into_model", "plan_packed", "export_packed", "verify_packed", "weight_checksum",
    "pack_codes", "collect_unquantized", "overhead_upper_bound", "decoder_source", "write_compressed_packed",
]
