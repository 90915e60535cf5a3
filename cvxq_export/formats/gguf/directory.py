"""A minimal GGUF tensor-directory reader that accepts every ggml type id.

gguf-py's ``GGUFReader`` refuses files holding types newer than its enum
(Q2_0, Q1_0, NVFP4 in gguf 0.19), which libggml and llama.cpp already run.
This reads only what a read-back check needs: each tensor's name, shape,
type id and raw bytes (as a memory map). Layout (GGUF v3, little endian):
magic "GGUF", u32 version, u64 n_tensors, u64 n_kv, the key/value pairs, the
tensor infos (name, u32 n_dims, u64 dims[n_dims], u32 type, u64 offset), then
the data section at the next multiple of ``general.alignment`` (default 32).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from ...errors import CvxqError

# GGUF value type -> struct format of a scalar (8 = string, 9 = array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclass
class DirectoryEntry:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the row length
    type_id: int
    offset: int  # absolute file offset of the data
    data: np.ndarray  # uint8 view of the bytes up to the next tensor (or file end)


class _Cursor:
    def __init__(self, buf: np.ndarray):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise CvxqError("the GGUF file is truncated", "re-create the file")
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise CvxqError("the GGUF file is truncated inside a string", "re-create the file")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype == 8:
            return self.string()
        if vtype == 9:
            sub, n = self.take("I"), self.take("Q")
            if sub in _SCALARS:  # skip fixed-size arrays in one step
                size = struct.calcsize("<" + _SCALARS[sub]) * n
                if self.pos + size > len(self.buf):
                    raise CvxqError("the GGUF file is truncated inside an array", "re-create the file")
                self.pos += size
                return None
            return [self.value(sub) for _ in range(n)]
        if vtype not in _SCALARS:
            raise CvxqError(f"unknown GGUF value type {vtype}", "this is not a GGUF v3 file we can read")
        return self.take(_SCALARS[vtype])


def read_directory(path: str) -> dict[str, DirectoryEntry]:
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(buf)
    if bytes(buf[:4]) != b"GGUF":
        raise CvxqError(f"{path} is not a GGUF file (bad magic)", "pass a .gguf file")
    cur.pos = 4
    version, n_tensors, n_kv = cur.take("I"), cur.take("Q"), cur.take("Q")
    if version not in (2, 3):
        raise CvxqError(f"GGUF version {version} is not supported", "use a GGUF v3 file")
    alignment = 32
    for _ in range(n_kv):
        key = cur.string()
        value = cur.value(cur.take("I"))
        if key == "general.alignment":
            alignment = int(value)
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("I")
        dims = tuple(cur.take("Q") for _ in range(n_dims))
        infos.append((name, dims, cur.take("I"), cur.take("Q")))
    start = -(-cur.pos // alignment) * alignment
    ends = sorted({off for *_, off in infos} | {len(buf) - start})
    out = {}
    for name, dims, type_id, off in infos:
        end = ends[ends.index(off) + 1]
        out[name] = DirectoryEntry(name, dims, type_id, start + off, buf[start + off : start + end])
    return out
