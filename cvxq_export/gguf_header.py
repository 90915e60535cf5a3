"""A GGUF file's header, read in milliseconds and without trusting it.

gguf-py's GGUFReader decodes every metadata array into NumPy objects (seconds for a
49k-token vocabulary) and memory-maps every tensor; deciding whether to accept a model
needs only the scalar metadata and the tensor directory. This walks the documented
layout (magic, version, tensor count, metadata count, key/value pairs, tensor infos),
keeps scalars and strings, skips arrays, and bounds every count and length by the
file's own size, so a damaged or hostile header is a clear error, never a huge
allocation or a hang.
"""
from __future__ import annotations

import mmap
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CvxqError

# metadata value type -> (struct format) for the fixed-size ones; 8 string, 9 array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_SIZES = {k: struct.calcsize(v) for k, v in _SCALARS.items()}
MAX_DIMS = 8  # GGML_MAX_DIMS is 4; a little slack for future versions
MAX_STRING_KEPT = 1 << 16  # longer string values (chat templates) are skipped, not decoded


# Types libggml (and llama.cpp) run but gguf-py 0.19's enum does not know yet:
# name -> (ggml type id, block size, bytes per block), as libggml reports them
# (checked against the library in tests/test_ggml_quant.py).
NEWER_TYPES = {"Q2_0": (42, 64, 18)}


def ggml_block(type_id: int) -> tuple[int, int] | None:
    """(weights per block, bytes per block) of a ggml type id, or None if unknown."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    for tid, block, type_size in NEWER_TYPES.values():
        if tid == type_id:
            return block, type_size
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        return None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order (innermost first)
    ggml_type: int
    offset: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GGUFHeader:
    version: int
    values: dict[str, object]  # scalar and string metadata (arrays too when read with arrays=True)
    tensors: list[TensorInfo] = field(default_factory=list)
    types: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # key -> (value type, array item type)
    data_offset: int = 0  # where the tensor data section starts
    array_lengths: dict[str, int] = field(default_factory=dict)  # key -> items, for every array (read or not)

    def tensor_data(self, path: str | Path, info: TensorInfo):
        """The stored bytes of one tensor as a read-only memory map ``[rows, bytes per row]`` uint8
        (rows: the product of the outer dimensions), or a clear error if they lie past the file's end."""
        import numpy as np

        layout = ggml_block(info.ggml_type)
        if layout is None:
            raise CvxqError(f"{path}: tensor {info.name!r} has ggml type {info.ggml_type}, which gguf-py does not know",
                            "upgrade the gguf package (pip install -U gguf)")
        block, type_size = layout
        if info.shape[0] % block:
            raise CvxqError(f"{path}: tensor {info.name!r} rows of {info.shape[0]} are not whole blocks of {block}",
                            "check the file")
        row_bytes = info.shape[0] // block * type_size
        rows = info.n_elements // info.shape[0]
        start = self.data_offset + info.offset
        if start + rows * row_bytes > Path(path).stat().st_size:
            raise CvxqError(f"{path}: tensor {info.name!r} runs past the end of the file",
                            "the file is truncated: download or convert it again")
        return np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(rows, row_bytes))

    @property
    def architecture(self) -> str | None:
        arch = self.values.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def arch_values(self) -> dict[str, object]:
        """``{arch}.*`` keys without the prefix (``block_count``, ``attention.key_length``, ...)."""
        prefix = f"{self.architecture}."
        return {k[len(prefix):]: v for k, v in self.values.items() if k.startswith(prefix)}

    @property
    def parameters(self) -> int:
        return sum(t.n_elements for t in self.tensors)


class _Cursor:
    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)
        self.arrays = False  # decode arrays and keep every string (what copying the metadata needs)

    def fail(self, what: str) -> CvxqError:
        return CvxqError(f"{self.path} is not a valid GGUF file: {what} (at byte {self.pos})",
                         "check the file (a complete download of a GGUF model?)")

    def take(self, fmt: str):
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise self.fail("the header runs past the end of the file")
        value = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def count(self, what: str, item_size: int) -> int:
        (n,) = self.take("<Q")
        if n * max(item_size, 1) > self.size - self.pos:  # every item takes at least item_size bytes
            raise self.fail(f"{what} {n} cannot fit in the file")
        return n

    def string(self, keep: bool = True) -> str | None:
        n = self.count("string length", 1)
        raw = bytes(self.buf[self.pos:self.pos + n]) if keep and (n <= MAX_STRING_KEPT or self.arrays) else None
        self.pos += n
        if raw is None:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("a string is not UTF-8") from None


# The last headers read, by file identity: a fit asks for the same header from several
# stages (architecture check, memory estimate, loader checks, GGUF writer); each read of a
# large vocabulary costs a fraction of a second. Callers treat headers as read-only.
_RECENT: OrderedDict = OrderedDict()
_RECENT_MAX = 2


def read_gguf_header(path: str | Path, *, arrays: bool = False) -> GGUFHeader:
    """The header of ``path``: scalar and string metadata and the tensor directory.
    ``arrays``: also decode array values (the vocabulary, merges, token types) and long
    strings (the chat template), with every key's value type: all of the metadata.
    A file read before and unchanged since (same inode, size and mtime) is not parsed again."""
    path = str(path)
    try:
        st = os.stat(path)
        identity = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError as exc:
        raise CvxqError(f"cannot read {path} as a GGUF file: {exc}", "check the path and the file") from None
    for key in ((identity, True), (identity, arrays)):
        if key in _RECENT:
            _RECENT.move_to_end(key)
            return _RECENT[key]
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cursor = _Cursor(buf, path)
            cursor.arrays = arrays
            header = _parse(cursor)
    except (OSError, ValueError) as exc:  # ValueError: mmap of an empty file
        raise CvxqError(f"cannot read {path} as a GGUF file: {exc}", "check the path and the file") from None
    _RECENT[(identity, arrays)] = header
    while len(_RECENT) > _RECENT_MAX:
        _RECENT.popitem(last=False)
    return header


def _parse(c: _Cursor) -> GGUFHeader:
    if c.size < 24 or bytes(c.buf[:4]) != b"GGUF":
        raise c.fail("no GGUF magic")
    c.pos = 4
    (version,) = c.take("<I")
    if version not in (2, 3):
        raise c.fail(f"GGUF version {version} (this tool reads 2 and 3)")
    n_tensors = c.count("tensor count", 8 + 4 + 8 + 4 + 8)  # each tensor info is at least that long
    n_kv = c.count("metadata count", 8 + 4)
    values: dict[str, object] = {}
    types: dict[str, tuple[int, int | None]] = {}
    lengths: dict[str, int] = {}
    for _ in range(n_kv):
        key = c.string()
        (vtype,) = c.take("<I")
        item = struct.unpack_from("<I", c.buf, c.pos)[0] if vtype == 9 and c.pos + 4 <= c.size else None
        if item is not None and key is not None and c.pos + 12 <= c.size:
            lengths[key] = struct.unpack_from("<Q", c.buf, c.pos + 4)[0]
        value = _value(c, vtype, depth=0)
        if key is not None and value is not _SKIPPED:
            values[key] = value
            types[key] = (vtype, item)
    tensors = []
    for _ in range(n_tensors):
        name = c.string() or ""
        (n_dims,) = c.take("<I")
        if not 0 < n_dims <= MAX_DIMS:
            raise c.fail(f"tensor {name!r} has {n_dims} dimensions")
        shape = c.take(f"<{n_dims}Q")
        ggml_type, offset = c.take("<IQ")
        if any(d == 0 or d > 1 << 40 for d in shape):
            raise c.fail(f"tensor {name!r} has shape {shape}")
        tensors.append(TensorInfo(name, tuple(int(d) for d in shape), int(ggml_type), int(offset)))
    alignment = values.get("general.alignment", 32)
    if not isinstance(alignment, int) or not 0 < alignment <= 1 << 20:
        raise c.fail(f"general.alignment {alignment!r}")
    data_offset = -(-c.pos // alignment) * alignment
    return GGUFHeader(int(version), values, tensors, types, data_offset, lengths)


_SKIPPED = object()


def _value(c: _Cursor, vtype: int, depth: int):
    if vtype in _SCALARS:
        return c.take(_SCALARS[vtype])[0]
    if vtype == 8:
        s = c.string()
        return _SKIPPED if s is None else s
    if vtype == 9:
        if depth > 2:
            raise c.fail("arrays nested too deeply")
        (item,) = c.take("<I")
        n = c.count("array length", _SIZES.get(item, 8))
        if item in _SIZES:
            start = c.pos
            c.pos += n * _SIZES[item]
            if not c.arrays:
                return _SKIPPED
            import numpy as np

            return np.frombuffer(c.buf, dtype=np.dtype(_SCALARS[item]), count=n, offset=start).tolist()
        if item == 8:  # e.g. the vocabulary: skipped without decoding unless asked for
            return [c.string(keep=c.arrays) for _ in range(n)] if c.arrays else _skip_strings(c, n)
        if item == 9:
            nested = [_value(c, item, depth + 1) for _ in range(n)]
            return nested if c.arrays else _SKIPPED
        raise c.fail(f"unknown array item type {item}")
    raise c.fail(f"unknown metadata type {vtype}")


def _skip_strings(c: _Cursor, n: int):
    for _ in range(n):
        c.string(keep=False)
    return _SKIPPED
