"""Where each initializer's bytes sit inside an ``.onnx`` file, read from the
protobuf wire format directly (no ``onnx`` import, no copy of the data).

The compressibility analysis needs per-tensor byte ranges of the file as stored,
which the protobuf runtime does not expose. The path walked is short and fixed
by the ONNX schema (``onnx.proto``):

    ModelProto.graph (field 7, message)
      GraphProto.initializer (field 5, repeated TensorProto)
        TensorProto.dims (1, packed or repeated varint), data_type (2, varint),
                    name (8, string), raw_data (9, bytes)

Initializers stored in typed fields (float_data, int32_data, ...) instead of
``raw_data`` are listed with ``raw=False`` and the byte range of that field,
so sizes still add up. Every length is checked against the buffer: a damaged
file gives a :class:`CvxqError`, never a read past the end.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import CvxqError

# TensorProto.DataType values (onnx.proto) -> (name, bits per element)
DATA_TYPES = {1: ("FLOAT", 32), 2: ("UINT8", 8), 3: ("INT8", 8), 4: ("UINT16", 16), 5: ("INT16", 16),
              6: ("INT32", 32), 7: ("INT64", 64), 9: ("BOOL", 8), 10: ("FLOAT16", 16), 11: ("DOUBLE", 64),
              16: ("BFLOAT16", 16), 21: ("UINT4", 4), 22: ("INT4", 4), 25: ("UINT2", 2), 26: ("INT2", 2)}
_FIX = "pass an intact .onnx file (weights inside it, as `cvxq-export fit --format onnx` writes)"


@dataclass(frozen=True)
class OnnxInitializer:
    name: str
    data_type: int  # TensorProto.DataType
    dims: tuple[int, ...]
    offset: int  # absolute file offset of the data bytes
    nbytes: int
    raw: bool  # True: raw_data (little-endian, sub-byte types packed low bits first)

    @property
    def type_name(self) -> str:
        return DATA_TYPES.get(self.data_type, (f"type{self.data_type}", 0))[0]

    @property
    def bits(self) -> int:
        return DATA_TYPES.get(self.data_type, ("", 0))[1]


def _varint(buf: np.ndarray, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise CvxqError("the ONNX file ends inside a field (truncated or not ONNX)", _FIX)
        b = int(buf[pos])
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf: np.ndarray, start: int, end: int):
    """Yield (field number, wire type, value or (offset, length)) over one message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = _varint(buf, pos, end)
            yield num, wire, val
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise CvxqError(f"an ONNX field claims {n:,} bytes past the end of its message (truncated file?)", _FIX)
            yield num, wire, (pos, n)
            pos += n
        elif wire == 5:
            pos += 4
            yield num, wire, None
        elif wire == 1:
            pos += 8
            yield num, wire, None
        else:
            raise CvxqError(f"unsupported protobuf wire type {wire} at byte {pos} (not an ONNX file?)", _FIX)
        if pos > end:
            raise CvxqError("the ONNX file ends inside a field (truncated)", _FIX)


def _tensor(buf: np.ndarray, start: int, end: int) -> OnnxInitializer:
    dims: list[int] = []
    dtype, name, data, raw = 0, "", (start, 0), False
    for num, wire, val in _fields(buf, start, end):
        if num == 1 and wire == 0:
            dims.append(int(val))
        elif num == 1 and wire == 2:  # packed dims
            p, n = val
            while p < val[0] + n:
                d, p = _varint(buf, p, val[0] + n)
                dims.append(d)
        elif num == 2 and wire == 0:
            dtype = int(val)
        elif num == 8 and wire == 2:
            name = bytes(buf[val[0]:val[0] + val[1]]).decode("utf-8", "replace")
        elif num == 9 and wire == 2:
            data, raw = val, True
        elif wire == 2 and num in (4, 5, 6, 7, 10, 11) and not raw:  # typed data fields
            data = val
    return OnnxInitializer(name, dtype, tuple(dims), data[0], data[1], raw)


def is_onnx(buf: np.ndarray) -> bool:
    """ModelProto starts with ir_version (field 1, varint: tag byte 0x08) and, among its
    first keys, has the graph (field 7, length-delimited)."""
    return len(buf) >= 2 and int(buf[0]) == 0x08 and _leading_graph_key(buf)


def _leading_graph_key(buf: np.ndarray) -> bool:
    pos, end = 0, len(buf)
    try:
        for _ in range(16):
            key, pos = _varint(buf, pos, end)
            num, wire = key >> 3, key & 7
            if num == 7 and wire == 2:
                return True
            if wire == 0:
                _, pos = _varint(buf, pos, end)
            elif wire == 2:
                n, pos = _varint(buf, pos, end)
                pos += n
            else:
                return False
    except CvxqError:
        return False
    return False


def read_initializers(buf: np.ndarray) -> list[OnnxInitializer]:
    """Every initializer of the main graph, in file order."""
    graph = None
    for num, wire, val in _fields(buf, 0, len(buf)):
        if num == 7 and wire == 2:
            graph = val
    if graph is None:
        raise CvxqError("the file has no ONNX graph", _FIX)
    out = []
    g0, gn = graph
    for num, wire, val in _fields(buf, g0, g0 + gn):
        if num == 5 and wire == 2:
            out.append(_tensor(buf, val[0], val[0] + val[1]))
    out.sort(key=lambda t: t.offset)
    return out


def initializer_codes(buf: np.ndarray, init: OnnxInitializer) -> tuple[np.ndarray, int] | None:
    """The integer codes of a raw int2/int4/int8 (or unsigned) initializer, offset to >= 0,
    and their bit depth; None for float and other types. Sub-byte codes are packed
    low bits first (onnx.proto: the first element in the least significant bits)."""
    bits = init.bits
    if not init.raw or init.type_name not in ("UINT2", "INT2", "UINT4", "INT4", "UINT8", "INT8") or not init.nbytes:
        return None
    data = np.asarray(buf[init.offset:init.offset + init.nbytes])
    if bits == 8:
        return (data.view(np.int8).astype(np.int16) + 128 if init.type_name == "INT8" else data.astype(np.int16)), 8
    per = 8 // bits
    mask = (1 << bits) - 1
    codes = np.stack([(data >> (bits * i)) & mask for i in range(per)], axis=1).reshape(-1).astype(np.int16)
    n = int(np.prod(init.dims)) if init.dims else codes.size
    codes = codes[:n]
    if init.type_name.startswith("INT"):  # two's complement in `bits` bits -> shift to >= 0
        codes = (codes ^ (1 << (bits - 1)))
    return codes, bits
