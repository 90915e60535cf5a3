"""Seeded mutations of the files cvxq-export reads, and hostile command lines.

Every case is a pure function of ``(seed, target, index)``: the same campaign
reruns the very same inputs. A mutation returns the new bytes and a short
description; ``sealed`` says whether the file's own checksums were recomputed
after the edit (then it is a well-formed file with other content, which a
reader may accept; unsealed edits are corruption, which must never be accepted
as different content).
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass

import numpy as np

TARGET_IDS = {"packed": 1, "gguf": 2, "onnx": 3, "args": 4}
INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0x20, 0x22, 0x30, 0x39, 0x7B, 0x7D)
HOSTILE_INTS = (0, 1, -1, 2, 3, 7, 63, 64, 255, 4096, 4097, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40,
                2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30)
HOSTILE_JSON = (*HOSTILE_INTS, 0.5, -0.0, 1e308, "", "x", "U8", "F32", "F16", "I64", None, True, False, [], [0],
                [1, 1], [2**62, 4], {}, {"a": 1}, "\u00e9", "1")


@dataclass
class Mutation:
    data: bytes
    description: str
    sealed: bool = False


def rng_for(seed: int, target: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, TARGET_IDS[target], index])


# --------------------------------------------------------------------------- raw bytes (any file)


def raw_mutation(data: bytes, rng: np.random.Generator, header_end: int) -> Mutation:
    """One of: flip bits, overwrite bytes, truncate, append, copy a chunk over another spot.
    Half of the positions fall inside the first ``header_end`` bytes, where parsers live."""
    n = len(data)
    buf = bytearray(data)

    def pos() -> int:
        hi = header_end if rng.random() < 0.5 and header_end > 0 else n
        return int(rng.integers(0, max(1, hi)))

    kind = rng.choice(["flip", "bytes", "truncate", "append", "splice"], p=[0.3, 0.3, 0.15, 0.1, 0.15])
    if kind == "flip":
        k = int(rng.integers(1, 9))
        where = [pos() for _ in range(k)]
        for p in where:
            buf[p] ^= 1 << int(rng.integers(0, 8))
        return Mutation(bytes(buf), f"flip {k} bits at {where[:3]}")
    if kind == "bytes":
        k = int(rng.integers(1, 17))
        p = pos()
        for i in range(p, min(n, p + k)):
            buf[i] = int(rng.choice(INTERESTING_BYTES)) if rng.random() < 0.5 else int(rng.integers(0, 256))
        return Mutation(bytes(buf), f"overwrite {k} bytes at {p}")
    if kind == "truncate":
        p = pos()
        return Mutation(bytes(buf[:p]), f"truncate to {p} bytes")
    if kind == "append":
        k = int(rng.integers(1, 4097))
        return Mutation(bytes(buf) + rng.integers(0, 256, k, dtype=np.uint8).tobytes(), f"append {k} bytes")
    k = int(rng.integers(1, 257))
    src, dst = pos(), pos()
    chunk = bytes(buf[src : src + k])
    buf[dst : dst + len(chunk)] = chunk
    return Mutation(bytes(buf[:n]), f"copy {len(chunk)} bytes from {src} to {dst}")


# --------------------------------------------------------------------------- packed files


def _split_packed(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join_packed(header: dict, body: bytes) -> bytes:
    from cvxq_export.formats.packed.container import seal_header

    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((-(8 + len(h))) % 64)
    if h.count(b'"header_crc32":"') == 1:
        h = seal_header(h)
    return len(h).to_bytes(8, "little") + h + body


def _json_paths(obj, prefix=()):
    """Every (path, value) of a JSON document, containers included."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _json_paths(v, prefix + (i,))


def _set(obj, path, value):
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


def packed_header_edit(data: bytes, rng: np.random.Generator) -> Mutation:
    """A hostile value at a random place of the header or of a metadata JSON document
    (tensors, crc32, plan, config), the header checksum then recomputed."""
    header, body = _split_packed(data)
    meta = header["__metadata__"]
    doc_key = rng.choice(["buffers", "tensors", "crc32", "plan", "config", "meta"], p=[0.3, 0.3, 0.1, 0.1, 0.05, 0.15])
    value = HOSTILE_JSON[int(rng.integers(0, len(HOSTILE_JSON)))]
    if doc_key in ("buffers", "meta"):
        root = header if doc_key == "buffers" else meta
        paths = [p for p, _ in _json_paths(root) if p and (doc_key == "buffers" or p[0] != "header_crc32")]
        path = paths[int(rng.integers(0, len(paths)))]
        if doc_key == "meta":
            value = json.dumps(value) if not isinstance(value, str) else value
        _set(root, path, value)
        where = ("__metadata__",) + path if doc_key == "meta" else path
    else:
        doc = json.loads(meta[doc_key])
        paths = [p for p, _ in _json_paths(doc) if p]
        if not paths:
            return Mutation(data, "no field to edit", sealed=True)
        path = paths[int(rng.integers(0, len(paths)))]
        if rng.random() < 0.1:  # drop the field instead
            parent = doc
            for p in path[:-1]:
                parent = parent[p]
            del parent[path[-1]]
            value = "<deleted>"
        else:
            _set(doc, path, value)
        meta[doc_key] = json.dumps(doc, separators=(",", ":"))
        where = (doc_key,) + path
    return Mutation(_join_packed(header, body), f"header {'/'.join(map(str, where))} = {str(value)[:40]}", sealed=True)


def packed_data_edit(data: bytes, rng: np.random.Generator) -> Mutation:
    """Bytes of one buffer changed and its crc32 recomputed: a well-formed file whose
    content (map bytes, code tails, scales, level tables) is hostile."""
    header, body = _split_packed(data)
    names = [n for n, e in header.items() if n != "__metadata__" and e["data_offsets"][1] > e["data_offsets"][0]]
    name = names[int(rng.integers(0, len(names)))]
    b, e = header[name]["data_offsets"]
    buf = bytearray(body)
    k = int(rng.integers(1, 9))
    for _ in range(k):
        p = int(rng.integers(b, e))
        buf[p] = int(rng.choice(INTERESTING_BYTES)) if rng.random() < 0.5 else int(rng.integers(0, 256))
    crcs = json.loads(header["__metadata__"]["crc32"])
    if name in crcs:
        crcs[name] = f"{zlib.crc32(bytes(buf[b:e])) & 0xFFFFFFFF:08x}"
        header["__metadata__"]["crc32"] = json.dumps(crcs, separators=(",", ":"))
    return Mutation(_join_packed(header, bytes(buf)), f"{k} bytes of {name} (crc32 resealed)", sealed=True)


def packed_mutation(data: bytes, rng: np.random.Generator) -> Mutation:
    header_end = 8 + int.from_bytes(data[:8], "little")
    r = rng.random()
    if r < 0.5:
        return raw_mutation(data, rng, header_end)
    if r < 0.8:
        return packed_header_edit(data, rng)
    return packed_data_edit(data, rng)


# --------------------------------------------------------------------------- GGUF files


GGUF_HOSTILE = {
    "u": (0, 1, 2, 3, 1000, 2**16, 2**31, 2**32 - 1),
    "i": (0, -1, 1, 2**31 - 1, -(2**31)),
    "f": (float("nan"), float("inf"), float("-inf"), 0.0, -1.0, 1e-45, 1e30, 1.0),
    "q": (0, 1, 2**31, 2**32, 2**63, 2**64 - 1),
}


def gguf_field_edit(path: str, rng: np.random.Generator) -> str:
    """Set a random scalar metadata value or tensor-info field of the GGUF at ``path`` (in
    place, same width) to a hostile value. Returns the description."""
    from gguf import GGUFReader

    reader = GGUFReader(path, "r+")
    if rng.random() < 0.6:
        fields = [(k, f) for k, f in reader.fields.items() if len(f.data) == 1 and f.parts[f.data[0]].dtype.kind in "uif"
                  and f.parts[f.data[0]].size == 1]
        key, field = fields[int(rng.integers(0, len(fields)))]
        part = field.parts[field.data[0]]
    else:
        t = reader.tensors[int(rng.integers(0, len(reader.tensors)))]
        which = int(rng.choice([2, 3, 4, 5]))  # n_dims, dims, type, offset
        part = t.field.parts[which]
        key = f"{t.name}.{['', '', 'n_dims', 'dims', 'type', 'offset'][which]}"
    kind = "q" if part.dtype.itemsize == 8 and part.dtype.kind == "u" else part.dtype.kind
    values = GGUF_HOSTILE.get(kind, GGUF_HOSTILE["u"])
    value = values[int(rng.integers(0, len(values)))]
    i = int(rng.integers(0, part.size))
    with np.errstate(all="ignore"):
        part[i] = np.array(value).astype(part.dtype)
    part.flush() if hasattr(part, "flush") else None
    reader.data.flush()
    del reader
    return f"{key}[{i}] = {value}"


def gguf_mutation(data: bytes, tmp_path: str, rng: np.random.Generator, data_offset: int) -> Mutation:
    if rng.random() < 0.5:
        with open(tmp_path, "wb") as f:
            f.write(data)
        what = gguf_field_edit(tmp_path, rng)
        with open(tmp_path, "rb") as f:
            return Mutation(f.read(), what)
    return raw_mutation(data, rng, data_offset)
