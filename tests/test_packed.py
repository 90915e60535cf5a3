"""The packed mobile format: writer, NumPy reader, C reference decoder, loader, CLI."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from cvxq_export.errors import CvxqError
from cvxq_export.formats.packed import container as packed
from cvxq_export.formats.packed.container import read_packed, weight_checksum, write_packed

FAST = ["--windows", "3", "--seq-len", "32", "--n-pcs", "8", "-q"]
# name, rows, cols, row_group, col_group, transposed (GPT-2 Conv1D layout), bias
SHAPES = [
    ("a_proj.weight", 7, 13, 7, 1, False, False),
    ("b_proj.weight", 12, 10, 3, 5, False, True),
    ("c_proj.weight", 5, 9, 1, 3, True, False),
    ("d_proj.weight", 64, 33, 8, 1, False, False),  # every option, cyclically
    ("e_proj.weight", 6, 4, 2, 2, False, False),  # all zero bits: empty codes and scales
]


def same_bits(a, b) -> bool:
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# --------------------------------------------------------------------------- synthetic tensors


class _Holder:
    pass


def _synthetic(tmp: Path):
    """Hand-made unit maps over odd shapes: every bit depth 0..8 with both
    quantizers, a 0x10 map byte (zero bits, kind bit set), an all-zero tensor."""
    import torch

    from cvxq_export.calibrate import CalibrationSettings, Sensitivities, WeightStats
    from cvxq_export.model import LoadedModel, WeightRef
    from cvxq_export.native import OPTIONS, encode_map, quantize_tensor

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = torch.nn.Module()
    refs, stats = [], {}
    for name, rows, cols, rg, cg, tr, bias in SHAPES:
        mod = torch.nn.Module()
        mod.weight = torch.nn.Parameter(torch.randn(cols, rows) if tr else torch.randn(rows, cols) * 0.1)
        if bias:
            mod.bias = torch.nn.Parameter(torch.randn(rows))
        mod.norm = torch.nn.Parameter(torch.rand(cols) + 0.5)
        model.add_module(name.removesuffix(".weight"), mod)
        refs.append(WeightRef(name, name.removesuffix(".weight"), rows, cols, "linear", transposed=tr, has_bias=bias))
        stats[name] = WeightStats(rng.random((rows, cols), dtype=np.float32), np.ones(rows, np.float32))
    loaded = LoadedModel(model, None, None, "synthetic", refs)
    sens = Sensitivities(stats, CalibrationSettings(row_group=1), "synthetic")
    qts = {}
    for (name, rows, cols, rg, cg, tr, bias), ref in zip(SHAPES, refs):
        n = (rows // rg) * (cols // cg)
        if name.startswith("e_"):
            opts = np.zeros(n, dtype=np.int64)
        elif name.startswith("d_"):
            opts = np.arange(n) % len(OPTIONS)
        else:
            opts = rng.integers(0, len(OPTIONS), n)
        unit_map = encode_map(np.array([OPTIONS[o][0] for o in opts]), np.array([OPTIONS[o][1] for o in opts]))
        if name.startswith("d_"):
            unit_map[0] = 0x10  # zero bits with the kind bit set: still a zero-bit unit
        qts[name] = quantize_tensor(loaded, sens, ref, unit_map, rg, cg)
    biases = {"b_proj.weight": torch.randn(12) * 0.1}
    unquantized = {f"{n.removesuffix('.weight')}.norm": getattr(model, n.removesuffix(".weight")).norm.detach()
                   for n, *_ in SHAPES}
    unquantized["odd.table"] = np.arange(15, dtype=np.float32).reshape(3, 5) / 7  # a 2-D unquantized tensor
    path = tmp / "synthetic.cvxq.safetensors"
    info = write_packed(path, qts, unquantized, plan_json={"format": "packed", "note": "synthetic"},
                        config={"model_type": "synthetic"}, biases=biases)
    h = _Holder()
    h.path, h.qts, h.unquantized, h.biases, h.info, h.loaded, h.sens = path, qts, unquantized, biases, info, loaded, sens
    return h


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return _synthetic(tmp_path_factory.mktemp("packed-synth"))


def test_roundtrip_bit_exact_every_depth_and_kind(synth):
    from cvxq_export.native import decode_map

    seen = set()
    with read_packed(synth.path) as pf:
        assert set(pf.tensors) == set(synth.qts)
        for name, qt in synth.qts.items():
            w = pf.weight(name)
            assert w.dtype == np.float32 and w.shape == (qt.ref.rows, qt.ref.cols)
            assert same_bits(w, qt.dequant.numpy()), name
            assert np.array_equal(pf.unit_map(name), qt.unit_map)
            assert np.array_equal(pf.unit_codes(name), packed._unit_codes(qt))
            assert np.array_equal(pf.raw(f"{name}.offset"), qt.offset.numpy())
            bits, kind = decode_map(qt.unit_map)
            assert np.array_equal(pf.raw(f"{name}.scale"), qt.scale.numpy()[bits > 0])
            seen |= {(int(b), int(k) if b else 0) for b, k in zip(bits, kind)}
            info = pf.tensors[name]
            assert (info.row_group, info.col_group, info.transposed) == (qt.row_group, qt.col_group, qt.ref.transposed)
        assert seen == {(0, 0)} | {(b, k) for b in range(1, 9) for k in (0, 1)}
        assert pf.bias("b_proj.weight").dtype == np.float16
        assert np.array_equal(pf.bias("b_proj.weight"), synth.biases["b_proj.weight"].numpy().astype(np.float16))
        assert pf.tensors["b_proj.weight"].bias == "b_proj.bias"
        for name, value in synth.unquantized.items():
            want = np.asarray(value.numpy() if hasattr(value, "numpy") else value).astype(np.float16)
            assert np.array_equal(pf.unquantized(name), want)
        assert pf.config == {"model_type": "synthetic"} and pf.plan_json["note"] == "synthetic"
        # the level tables are the quantizer's
        from cvxq_export.quantizers import laplace_table_np

        for b in range(1, 9):
            assert np.array_equal(pf.levels(b), laplace_table_np(b))
        assert pf.raw("e_proj.weight.codes").size == 0 and pf.raw("e_proj.weight.scale").size == 0


@pytest.mark.parametrize("chunk", [1, 7, 40, 1 << 20])
def test_decode_steps_of_any_size_give_the_same_weights(synth, monkeypatch, chunk):
    """weight() decodes ~_CHUNK weights per step: several row groups, one row group, or a
    run of its column groups; every split gives the same bits."""
    monkeypatch.setattr(packed, "_CHUNK", chunk)
    with read_packed(synth.path) as pf:
        for name, qt in synth.qts.items():
            assert same_bits(pf.weight(name), qt.dequant.numpy()), (name, chunk)


def test_bit_order_is_lsb_first_and_codes_straddle_bytes():
    from cvxq_export.formats.packed.container import _unpack, pack_codes

    # the spec's example: 3-bit codes 5, 2, 7 -> stream 101 010 111 -> 0xD5 0x01
    assert pack_codes(np.array([[5, 2, 7]], np.uint8), np.array([3])).tolist() == [0xD5, 0x01]
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 9, 40)
    codes = (rng.integers(0, 256, (40, 7)) % (1 << bits)[:, None]).astype(np.uint8)
    stream = [(int(c) >> i) & 1 for u in range(40) for c in codes[u] for i in range(bits[u])]
    want = np.packbits(np.array(stream + [0] * (-len(stream) % 8), np.uint8), bitorder="little")
    got = pack_codes(codes, bits)
    assert np.array_equal(got, want)
    start = np.concatenate([[0], np.cumsum(bits * 7)[:-1]])
    assert np.array_equal(_unpack(got, bits.astype(np.int64), start, 7), codes)
    with pytest.raises(ValueError, match="does not fit"):
        pack_codes(np.array([[8]], np.uint8), np.array([3]))


@pytest.mark.parametrize("size", [8, 32, 256])
def test_whole_byte_units_pack_like_the_bit_stream(size):
    """Units of a multiple of 8 codes start on a byte and are packed per bit depth: the
    same bytes as the definition (one LSB-first stream of every code's bits)."""
    from cvxq_export.formats.packed.container import _unpack, pack_codes

    rng = np.random.default_rng(size)
    bits = rng.integers(0, 9, 60)
    codes = (rng.integers(0, 256, (60, size)) % (1 << bits)[:, None]).astype(np.uint8)
    stream = [(int(c) >> i) & 1 for u in range(60) for c in codes[u] for i in range(bits[u])]
    want = np.packbits(np.array(stream + [0] * (-len(stream) % 8), np.uint8), bitorder="little")
    got = pack_codes(codes, bits)
    assert np.array_equal(got, want)
    start = np.concatenate([[0], np.cumsum(bits * size)[:-1]])
    assert np.array_equal(_unpack(got, bits.astype(np.int64), start, size), codes)


def test_layout_alignment_sizes_and_safetensors_compatible(synth):
    from safetensors import safe_open

    from cvxq_export.native import BUFFER_ALIGN

    from cvxq_export.checks import LIMITS

    assert packed.ALIGN == BUFFER_ALIGN
    assert LIMITS["max_row_group"] == packed.MAX_UNIT_SIZE  # every plan's units fit the format
    size = synth.path.stat().st_size
    assert size == synth.info["file_bytes"]
    with read_packed(synth.path) as pf:
        assert pf.header_bytes % 64 == 0
        for name, b in pf.buffers.items():
            if not name.startswith("__pad__."):
                assert b.begin % 64 == 0, name
        for name, qt in synth.qts.items():
            # the four buffers, each rounded up to 64 bytes, are what the allocator charged
            span = sum(-(-pf.buffers[f"{name}.{s}"].nbytes // 64) * 64 for s in ("codes", "map", "offset", "scale"))
            assert span == qt.nbytes()
            ends = [pf.buffers[f"{name}.{s}"] for s in ("codes", "map", "offset", "scale")]
            assert all(a.end <= b.begin for a, b in zip(ends, ends[1:]))
        with safe_open(str(synth.path), "np") as f:  # the safetensors library opens it
            assert f.metadata()["format"] == "cvxq-packed"
            for key in f.keys():
                assert np.array_equal(f.get_tensor(key), pf.raw(key)), key


def test_reader_imports_no_torch(synth):
    code = ("import sys; from cvxq_export.formats.packed.container import read_packed; "
            f"pf = read_packed({str(synth.path)!r}); w = pf.weight('d_proj.weight'); pf.checksum('d_proj.weight'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_writer_refuses_over_budget_and_leaves_nothing(synth, tmp_path):
    path = tmp_path / "small.cvxq.safetensors"
    with pytest.raises(CvxqError, match="over the budget of 1,000 bytes"):
        write_packed(path, synth.qts, {}, plan_json={"budget_bytes": 1000}, config={})
    assert not path.exists() and not list(tmp_path.iterdir())


def test_writer_refuses_float16_overflow(synth, tmp_path):
    with pytest.raises(CvxqError, match="float16 range"):
        write_packed(tmp_path / "x", {}, {"big": np.array([1e6], np.float32)}, plan_json=None, config={})


def _zero_bit_tensor_of_every_half():
    """256 x 256 one-weight units at zero bits whose offsets are every float16
    bit pattern (NaNs and infinities, which the format refuses, replaced by zero):
    exercises the fp16 -> fp32 conversion, subnormals included."""
    import torch

    from cvxq_export.model import WeightRef
    from cvxq_export.native import NativeTensor

    h = np.arange(65536, dtype=np.uint16).view(np.float16).copy()
    h[~np.isfinite(h)] = 0
    offset = torch.from_numpy(h)
    ref = WeightRef("halves.weight", "halves", 256, 256, "linear")
    return NativeTensor(ref, 1, 1, np.zeros(65536, np.uint8), [torch.zeros(65536, 1, dtype=torch.uint8)], offset,
                        torch.zeros(65536, dtype=torch.float16), offset.float().reshape(256, 256))


# --------------------------------------------------------------------------- C decoder


@pytest.fixture(scope="session")
def decoder(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler (cc/gcc/clang) on PATH: cannot build the packed C reference decoder")
    src = packed.decoder_source()
    assert src.is_file()
    d = tmp_path_factory.mktemp("decoder")
    plain = d / "packed_decoder"
    proc = subprocess.run([cc, "-std=c99", "-O2", "-Wall", "-Wextra", "-pedantic", "-ffp-contract=off", "-o", str(plain),
                           str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr, proc.stderr
    # prefer a sanitizer build for the tests: any out-of-bounds access fails loudly
    asan = d / "packed_decoder_asan"
    proc = subprocess.run([cc, "-std=c99", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                           "-fno-omit-frame-pointer", "-o", str(asan), str(src)], capture_output=True, text=True)
    if proc.returncode == 0 and subprocess.run([str(asan)], capture_output=True, env=_san_env()).returncode == 2:
        return asan
    return plain


def _san_env():
    return {**os.environ, "ASAN_OPTIONS": "detect_leaks=0:exitcode=99", "UBSAN_OPTIONS": "halt_on_error=1:exitcode=98"}


def run_decoder(decoder, *args):
    return subprocess.run([str(decoder), *map(str, args)], capture_output=True, text=True, env=_san_env(), timeout=120)


def test_c_decoder_matches_python_bit_for_bit(synth, decoder, tmp_path):
    listing = run_decoder(decoder, synth.path)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.split("\n")[0] == "a_proj.weight 7 13"
    with read_packed(synth.path) as pf:
        for name, qt in synth.qts.items():
            raw = tmp_path / f"{name}.f32"
            proc = run_decoder(decoder, synth.path, name, raw)
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.strip() == weight_checksum(qt.dequant.numpy()) == pf.checksum(name), name
            decoded = np.fromfile(raw, dtype="<f4").reshape(qt.ref.rows, qt.ref.cols)
            assert same_bits(decoded, qt.dequant.numpy()), name
    proc = run_decoder(decoder, synth.path, "no.such.weight")
    assert proc.returncode == 1 and "no quantized tensor named no.such.weight" in proc.stderr


def test_every_float16_value_decodes_exactly(decoder, tmp_path):
    qt = _zero_bit_tensor_of_every_half()
    path = tmp_path / "halves.cvxq.safetensors"
    write_packed(path, {"halves.weight": qt}, {}, plan_json=None, config={})
    with read_packed(path) as pf:
        assert same_bits(pf.weight("halves.weight"), qt.dequant.numpy())
    raw = tmp_path / "halves.f32"
    proc = run_decoder(decoder, path, "halves.weight", raw)
    assert proc.returncode == 0, proc.stderr
    assert same_bits(np.fromfile(raw, "<f4").reshape(256, 256), qt.dequant.numpy())
    assert proc.stdout.strip() == weight_checksum(qt.dequant.numpy())


def test_checksum_definition():
    w = np.array([[1.0, -2.5], [0.0, 3.0]], np.float32)

    def fnv(h, data):
        for byte in data:
            h = ((h ^ byte) * 0x100000001B3) % 2**64
        return h

    rows = [fnv(0xCBF29CE484222325, w[r].astype("<f4").tobytes()) for r in range(2)]
    want = fnv(0xCBF29CE484222325, b"".join(h.to_bytes(8, "little") for h in rows))
    assert weight_checksum(w) == f"{want:016x}"


# --------------------------------------------------------------------------- malformed files


def _split(path: Path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header: dict | str, data: bytes, seal: bool = True) -> bytes:
    """A file from an edited header; ``seal`` recomputes the header checksum so the edit
    reaches the check it targets (unsealed, every edit is a header crc32 mismatch)."""
    text = header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))
    h = text.encode()
    h += b" " * ((-(8 + len(h))) % 64)
    if seal and h.count(b'"header_crc32":"') == 1:
        h = packed.seal_header(h)
    return len(h).to_bytes(8, "little") + h + data


def _mutate_header(fn):
    def apply(path: Path) -> bytes:
        header, data = _split(path)
        out = fn(header, data)
        return _join(*out) if isinstance(out, tuple) else _join(header, data)
    return apply


def _meta_json(header, key, fn):
    m = json.loads(header["__metadata__"][key])
    fn(m)
    header["__metadata__"][key] = json.dumps(m)


def _set_map_byte(value: int, fix_crc: bool):
    def fn(header, data):
        b, e = header["d_proj.weight.map"]["data_offsets"]
        data = bytearray(data)
        data[b + 5] = value
        if fix_crc:
            _meta_json(header, "crc32", lambda c: c.__setitem__("d_proj.weight.map", f"{zlib.crc32(bytes(data[b:e])):08x}"))
        return header, bytes(data)
    return _mutate_header(fn)


def _set_value(buffer: str, value: bytes):
    """The first value of ``buffer`` replaced, its crc32 recomputed: a well-formed, hostile file."""
    def fn(header, data):
        b, e = header[buffer]["data_offsets"]
        data = bytearray(data)
        data[b : b + len(value)] = value
        _meta_json(header, "crc32", lambda c: c.__setitem__(buffer, f"{zlib.crc32(bytes(data[b:e])):08x}"))
        return header, bytes(data)
    return _mutate_header(fn)


def _overlap(header, data):
    header["d_proj.weight.map"]["data_offsets"] = [header["d_proj.weight.codes"]["data_offsets"][0],
                                                   header["d_proj.weight.codes"]["data_offsets"][0] + 264]


def _shift(header, data):
    b, e = header["d_proj.weight.offset"]["data_offsets"]
    header["d_proj.weight.offset"]["data_offsets"] = [b + 2, e + 2]


def _past_end(header, data):
    b, _ = header["d_proj.weight.offset"]["data_offsets"]
    header["d_proj.weight.offset"]["data_offsets"] = [b, len(data) + 64]
    header["d_proj.weight.offset"]["shape"] = [(len(data) + 64 - b) // 2]


def _huge_buffer(header, data):
    header["d_proj.weight.codes"]["shape"] = [2**62]


def _huge_tensor(header, data):
    _meta_json(header, "tensors", lambda t: t["d_proj.weight"].__setitem__("shape", [2**40, 2**40]))


def _huge_rows(header, data):
    _meta_json(header, "tensors", lambda t: t["d_proj.weight"].__setitem__("shape", [64 * 2**30, 33]))


def _version(header, data):
    header["__metadata__"]["version"] = "3"


def _format(header, data):
    header["__metadata__"]["format"] = "gguf"


def _drop(name):
    return lambda header, data: header.pop(name)


def _drop_meta(key):
    return lambda header, data: header["__metadata__"].pop(key)


def _dup_key(path: Path) -> bytes:
    header, data = _split(path)
    text = json.dumps(header, separators=(",", ":"))
    entry = '"d_proj.weight.map":' + json.dumps(header["d_proj.weight.map"], separators=(",", ":"))
    assert entry in text
    return _join(text.replace(entry, entry + "," + entry, 1), data)


def _pad_nonzero(header, data):
    b, _ = header["__pad__.0"]["data_offsets"]
    data = bytearray(data)
    data[b] = 1
    return header, bytes(data)


def _garbage_json(seal: bool):
    def apply(path: Path) -> bytes:
        raw = bytearray(path.read_bytes())
        raw[20:40] = b"@" * 20
        n = int.from_bytes(raw[:8], "little")
        if seal:
            raw[8 : 8 + n] = packed.seal_header(bytes(raw[8 : 8 + n]))
        return bytes(raw)
    return apply


def _edit_plan(header, data):
    header["__metadata__"]["plan"] = header["__metadata__"]["plan"].replace("synthetic", "synthetiC")


def _unsealed(fn):
    def apply(path: Path) -> bytes:
        header, data = _split(path)
        fn(header, data)
        return _join(header, data, seal=False)
    return apply


def _second_crc_field(header, data):
    # a key whose escaped text contains the field: the checksum field is no longer unique
    header["__metadata__"]['x"header_crc32'] = "00000000"


def _trailing_bytes(path: Path) -> bytes:
    return path.read_bytes() + b"\0" * 64


def _length(value: int):
    return lambda path: value.to_bytes(8, "little") + path.read_bytes()[8:]


def _truncate(fraction_or_cut):
    def apply(path: Path) -> bytes:
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        cut = {"in-length": 5, "after-length": 8, "in-json": 8 + n // 2, "before-data": 8 + n - 1, "at-data": 8 + n,
               "in-data": 8 + n + (len(raw) - 8 - n) // 2, "last-byte": len(raw) - 1, "empty": 0}[fraction_or_cut]
        return raw[:cut]
    return apply


# name -> (mutation, message fragment of the Python reader, C decoder must fail too)
MALFORMED = {
    "truncated-empty": (_truncate("empty"), "fewer than the 8-byte header length", True),
    "truncated-in-length": (_truncate("in-length"), "fewer than the 8-byte header length", True),
    "truncated-after-length": (_truncate("after-length"), "runs past the end", True),
    "truncated-in-json": (_truncate("in-json"), "runs past the end", True),
    "truncated-before-data": (_truncate("before-data"), "runs past the end", True),
    "truncated-at-data": (_truncate("at-data"), "run past the end of the data section", True),
    "truncated-in-data": (_truncate("in-data"), "run past the end of the data section", True),
    "truncated-last-byte": (_truncate("last-byte"), "run past the end of the data section", True),
    "header-length-huge": (_length(2**40), "exceeds the limit", True),
    "header-length-max": (_length(2**64 - 1), "exceeds the limit", True),
    "header-length-tiny": (_length(1), "too small", True),
    "garbage-json": (_garbage_json(seal=False), "header crc32", True),
    "garbage-json-resealed": (_garbage_json(seal=True), "not valid JSON", True),
    "edited-plan": (_unsealed(_edit_plan), "header crc32", True),
    "no-header-checksum": (_unsealed(_drop_meta("header_crc32")), "no single header_crc32", True),
    "two-header-checksums": (_mutate_header(_second_crc_field), "header_crc32", True),
    "bytes-after-last-buffer": (_trailing_bytes, "after its last buffer", True),
    "unknown-version": (_mutate_header(_version), "version '3'", True),
    "wrong-format": (_mutate_header(_format), "is not a cvxq-packed file", True),
    "offset-past-end": (_mutate_header(_past_end), "run past the end of the data section", True),
    "overlapping-buffers": (_mutate_header(_overlap), "overlap", True),
    "misaligned-buffer": (_mutate_header(_shift), "not on a 64-byte boundary", True),
    "huge-buffer-shape": (_mutate_header(_huge_buffer), "but data_offsets span", True),
    "huge-tensor-shape": (_mutate_header(_huge_tensor), "weights per tensor", True),
    "huge-row-count": (_mutate_header(_huge_rows), "weights per tensor", True),
    "bad-map-byte": (_set_map_byte(0x09, fix_crc=True), "map byte 0x09", True),
    "bad-map-kind": (_set_map_byte(0x23, fix_crc=True), "map byte 0x23", True),
    "corrupted-map-crc": (_set_map_byte(0x02, fix_crc=False), "crc32", True),
    "infinite-scale": (_set_value("d_proj.weight.scale", b"\x00\x7c"), "scale holds an infinite or NaN", True),
    "nan-offset": (_set_value("d_proj.weight.offset", b"\x01\x7e"), "offset holds an infinite or NaN", True),
    "nan-level": (_set_value("__levels__.b3", b"\x00\x00\xc0\x7f"), "infinite or NaN level", True),
    "missing-scale": (_mutate_header(_drop("d_proj.weight.scale")), "d_proj.weight.scale is missing", True),
    "missing-levels": (_mutate_header(_drop("__levels__.b3")), "no __levels__.b3", True),
    "duplicate-key": (_dup_key, "duplicate key", True),
    "nonzero-padding": (_mutate_header(_pad_nonzero), "padding bytes are not zero", False),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files_fail_clearly(synth, decoder, tmp_path, case):
    mutate, fragment, c_too = MALFORMED[case]
    bad = tmp_path / f"{case}.cvxq.safetensors"
    bad.write_bytes(mutate(synth.path))
    with pytest.raises(CvxqError) as err:
        with read_packed(bad) as pf:
            pf.weight("d_proj.weight")
    assert fragment in err.value.problem, err.value.problem
    assert str(bad) in err.value.problem and err.value.fix
    if c_too:
        proc = run_decoder(decoder, bad, "d_proj.weight")
        assert proc.returncode == 1, (proc.returncode, proc.stderr)
        assert proc.stderr.startswith("packed_decoder: error: ") and "Sanitizer" not in proc.stderr, proc.stderr
        assert proc.stdout == ""


def test_truncation_at_every_byte_of_a_small_file(tmp_path, decoder):
    """Every prefix of a file is refused, by both readers, without a crash."""
    import torch

    from cvxq_export.model import WeightRef
    from cvxq_export.native import NativeTensor

    ref = WeightRef("w", "", 2, 3, "linear")
    qt = NativeTensor(ref, 2, 1, np.array([3, 0x12, 0], np.uint8),
                      # code groups in OPTIONS order: (0 bits), (2 bits, companded), (3 bits, uniform)
                      [torch.zeros(1, 2, dtype=torch.uint8), torch.tensor([[1, 3]], dtype=torch.uint8),
                       torch.tensor([[5, 0]], dtype=torch.uint8)],
                      torch.tensor([0.5, -1, 2], dtype=torch.float16), torch.tensor([0.25, 0.5, 0], dtype=torch.float16),
                      torch.zeros(2, 3))
    path = tmp_path / "small.cvxq.safetensors"
    write_packed(path, {"w": qt}, {}, plan_json=None, config={})
    raw = path.read_bytes()
    cut_file = tmp_path / "cut"
    step = max(1, len(raw) // 97)
    for cut in list(range(0, 80)) + list(range(80, len(raw), step)):
        cut_file.write_bytes(raw[:cut])
        with pytest.raises(CvxqError):
            read_packed(cut_file)
        if cut % 7 == 0 or cut < 16:
            proc = run_decoder(decoder, cut_file, "w")
            assert proc.returncode == 1 and "Sanitizer" not in proc.stderr, (cut, proc.stderr)


def test_missing_file_and_wrong_kind(tmp_path):
    with pytest.raises(CvxqError, match="does not exist"):
        read_packed(tmp_path / "nope.safetensors")
    from safetensors.numpy import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": np.zeros(3, np.float32)}, str(other))
    with pytest.raises(CvxqError, match="not a cvxq-packed file"):
        read_packed(other)


# --------------------------------------------------------------------------- real (tiny) models


def _load_and_calibrate(model_dir):
    from cvxq_export.calibrate import CalibrationSettings, calibrate
    from cvxq_export.model import load_model
    from cvxq_export.textdata import calibration_windows

    loaded = load_model(str(model_dir))
    settings = CalibrationSettings(n_windows=3, seq_len=32, n_pcs=8, pca_windows=3)
    windows = calibration_windows(loaded.tokenizer, None, settings.n_windows, settings.seq_len, settings.seed)
    return loaded, calibrate(loaded, windows.ids, settings, progress=False)


def _reference_model(model_dir, qtensors, sens):
    """apply_quantized, then every other parameter rounded to float16 (what the file stores)."""
    import torch

    from cvxq_export.model import load_model
    from cvxq_export.pipeline import apply_quantized

    ref = load_model(str(model_dir))
    corrected = apply_quantized(ref, {n: _rebind(qt, ref) for n, qt in qtensors.items()}, sens)
    quantized = set(qtensors) | {a for qt in qtensors.values() for a in qt.ref.also}
    with torch.no_grad():
        for name, p in ref.model.named_parameters():
            if name not in quantized:
                p.copy_(p.half().float())
    return ref, corrected


def _rebind(qt, loaded):
    from dataclasses import replace

    return replace(qt, ref=next(r for r in loaded.weights if r.name == qt.ref.name))


def _check_model_roundtrip(model_dir, budget, tmp_path, decoder=None):
    import torch

    from cvxq_export.formats.packed.container import export_packed, load_packed_into_model, plan_packed
    from cvxq_export.model import load_model
    from cvxq_export.pipeline import quantize_plan

    loaded, sens = _load_and_calibrate(model_dir)
    plan = plan_packed(loaded, sens, budget, progress=False)
    qtensors = quantize_plan(loaded, sens, plan, progress=False)
    info = export_packed(loaded, sens, plan, tmp_path, progress=False, qtensors=qtensors)
    path = tmp_path / packed.FILE_NAME
    size = path.stat().st_size
    assert size == info["file_bytes"] <= plan.total_bytes <= plan.budget_bytes == budget
    assert info["verified"] and (tmp_path / "config.json").is_file() and (tmp_path / "tokenizer.json").is_file()

    reference, corrected = _reference_model(model_dir, qtensors, sens)
    assert sorted(corrected) == info["bias_corrected"]
    target = load_model(str(model_dir))
    load_packed_into_model(path, target)
    ids = torch.tensor([[1, 5, 9, 23, 42, 7, 99, 3, 250, 17]])
    with torch.no_grad():
        want, got = reference.model(input_ids=ids).logits, target.model(input_ids=ids).logits
    assert torch.equal(want, got)
    with read_packed(path) as pf:
        assert pf.plan().total_bytes == plan.total_bytes
        assert all(np.array_equal(pf.plan().tensor(t.name).unit_map, t.unit_map) for t in plan.tensors)
        if decoder is not None:
            for name in pf.tensors:
                proc = run_decoder(decoder, path, name)
                assert proc.returncode == 0, proc.stderr
                assert proc.stdout.strip() == weight_checksum(qtensors[name].dequant.numpy()), name
    return plan, info


def test_tiny_llama_logits_equal_apply_quantized(tiny_llama_dir, tmp_path, decoder):
    plan, info = _check_model_roundtrip(tiny_llama_dir, 60_000, tmp_path, decoder)
    assert plan.format == "packed" and info["bias_corrected"] == []


def test_tiny_opt_with_bias_correction(tiny_opt_dir, tmp_path):
    plan, info = _check_model_roundtrip(tiny_opt_dir, 80_000, tmp_path)
    assert info["bias_corrected"] and info["biases"] == len(info["bias_corrected"])


def test_file_fits_budget_from_smallest_to_largest(tiny_llama_dir, tmp_path):
    """The header reserve makes the file fit at every budget, the tightest included."""
    from cvxq_export.errors import InfeasibleBudget
    from cvxq_export.formats.packed.container import export_packed, plan_packed
    from cvxq_export.native import Geometry, build_menu
    from cvxq_export.pipeline import select_weights

    loaded, sens = _load_and_calibrate(tiny_llama_dir)
    menu = build_menu(loaded, sens, select_weights(loaded, "all"), Geometry(), progress=False)
    with pytest.raises(InfeasibleBudget) as err:
        plan_packed(loaded, sens, 1000, progress=False, menu=menu)
    lo, hi = err.value.min_bytes, err.value.max_bytes
    for i, budget in enumerate((lo, lo + 777, (lo + hi) // 2, hi)):
        plan = plan_packed(loaded, sens, budget, progress=False, menu=menu)
        info = export_packed(loaded, sens, plan, tmp_path / str(i), progress=False, save_tokenizer=False)
        size = (tmp_path / str(i) / packed.FILE_NAME).stat().st_size
        assert size <= plan.total_bytes <= budget, (budget, size, plan.total_bytes)
        # the reserve is an upper bound, not a large one
        assert plan.total_bytes - size < 4 * info["header_bytes"] + 3000


def test_load_into_wrong_model_fails(tiny_llama_dir, tiny_opt_dir, tmp_path):
    from cvxq_export.formats.packed.container import export_packed, load_packed_into_model, plan_packed
    from cvxq_export.model import load_model

    loaded, sens = _load_and_calibrate(tiny_llama_dir)
    plan = plan_packed(loaded, sens, 60_000, progress=False)
    export_packed(loaded, sens, plan, tmp_path, progress=False, save_tokenizer=False)
    with pytest.raises(CvxqError, match="has no parameter|shape"):
        load_packed_into_model(tmp_path / packed.FILE_NAME, load_model(str(tiny_opt_dir)))


# --------------------------------------------------------------------------- CLI


def test_cli_fit_format_packed_end_to_end(capsys, tmp_path, tiny_llama_dir):
    from cvxq_export.cli import main
    from cvxq_export.textdata import read_text

    (tmp_path / "eval.txt").write_text(read_text(None)[0])
    out = tmp_path / "packed-out"
    code = main(["fit", str(tiny_llama_dir), "--budget", "60kB", "--format", "packed", "-o", str(out),
                 "--eval-text", str(tmp_path / "eval.txt"), "--eval-windows", "2", "--json", *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "not implemented" not in captured.err
    result = json.loads(captured.out)["formats"]["packed"]
    path = out / packed.FILE_NAME
    assert path.stat().st_size <= 60_000
    assert result["info"]["verified"] is True and result["file_bytes"] == path.stat().st_size
    quantized = result["evaluation"]["eval"]["quantized"]
    assert np.isfinite(quantized["perplexity"]) and quantized["kl"] >= 0
    for name in ("config.json", "tokenizer.json", "plan.json", "report.md", "report.json"):
        assert (out / name).is_file(), name
    with read_packed(path) as pf:
        assert pf.plan_json["budget_bytes"] == 60_000 and pf.config["model_type"] == "llama"
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out)).encode("the model")
    # re-export from the saved plan: same bytes
    code = main(["fit", str(tiny_llama_dir), "--plan", str(out / "plan.json"), "--format", "packed", "-o", str(out),
                 "--json", *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["formats"]["packed"]["file_bytes"] == result["file_bytes"]


def test_cli_plan_format_packed_only_plans(capsys, tmp_path, tiny_llama_dir):
    from cvxq_export.cli import main

    out = tmp_path / "plan-only"
    code = main(["plan", str(tiny_llama_dir), "--budget", "60kB", "--format", "packed", "-o", str(out), "--json", *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (out / "plan.json").is_file() and not (out / packed.FILE_NAME).exists()
    assert json.loads(captured.out)["formats"]["packed"]["plan"]["format"] == "packed"


# --------------------------------------------------------------------------- compressed container (*.cvxqz)


import struct  # noqa: E402

from cvxq_export.formats.packed import compressed as pz  # noqa: E402


def _need(module: str):
    return pytest.importorskip(module, reason=f"{module} is not installed (pip install 'cvxq-export[analysis]')")


@pytest.mark.parametrize("codec", ["zstd-3", "lz4", "stored"])
@pytest.mark.parametrize("lazy", [False, True])
def test_compressed_roundtrip_bit_exact_through_read_packed(synth, tmp_path, codec, lazy):
    if codec != "stored":
        _need("zstandard" if codec.startswith("zstd") else "lz4")
    dst = tmp_path / "synthetic.cvxq.safetensors.cvxqz"
    info = packed.write_compressed_packed(synth.path, dst, codec=codec, chunk_size=1024)
    assert info["verified"] and info["raw_bytes"] == synth.path.stat().st_size
    assert dst.read_bytes()[:8] == pz.MAGIC and info["n_chunks"] == -(-info["raw_bytes"] // 1024)
    with read_packed(synth.path) as plain, read_packed(dst, lazy=lazy) as comp:
        assert comp.compressed and not plain.compressed
        assert comp.stored_bytes == dst.stat().st_size and comp.file_bytes == plain.file_bytes
        assert set(comp.tensors) == set(plain.tensors) and comp.unquantized_names == plain.unquantized_names
        for name in plain.tensors:
            assert same_bits(comp.weight(name), plain.weight(name)), name
            assert same_bits(comp.weight(name), synth.qts[name].dequant.numpy()), name
        for name in plain.unquantized_names:
            assert np.array_equal(comp.unquantized(name), plain.unquantized(name))
        assert np.array_equal(comp.bias("b_proj.weight"), plain.bias("b_proj.weight"))
        assert comp.config == plain.config and comp.plan_json == plain.plan_json
        comp.verify_all()
    # the decoded payload is the original file, byte for byte
    with pz.ChunkedContainer.open(dst) as c:
        out = bytearray(c.raw_size)
        c.read_into(out)
    assert bytes(out) == synth.path.read_bytes()


def test_compressed_seek_to_one_tensor_reads_only_its_chunks(synth, tmp_path):
    _need("zstandard")
    dst = tmp_path / "seek.cvxqz"
    chunk = 256
    packed.write_compressed_packed(synth.path, dst, codec="zstd-3", chunk_size=chunk)
    name = "d_proj.weight"
    with read_packed(dst, lazy=True) as pf:
        c = pf.container
        at_open = set(c.decoded)
        assert at_open <= set(c.chunk_range(0, pf.header_bytes))  # opening decodes the header only
        c.decoded.clear()
        w = pf.weight(name)
        allowed = set(c.chunk_range(0, pf.header_bytes))
        for buf in pf.buffers.values():
            if buf.name.startswith(f"{name}.") or buf.name.startswith(packed.LEVELS_PREFIX):
                allowed |= set(c.chunk_range(buf.begin, buf.end))
        touched = set(c.decoded)
        assert touched and touched <= allowed, sorted(touched - allowed)
        assert len(touched) < len(c.chunks) / 2  # a seek, not a read of the file
    assert same_bits(w, synth.qts[name].dequant.numpy())


def _container_parts(path: Path):
    raw = path.read_bytes()
    head = list(struct.unpack_from("<8sBBHIQQII", raw, 0))
    n = head[4]
    index = [list(struct.unpack_from("<QIIII", raw, 40 + 24 * i)) for i in range(n)]
    return raw, head, index, raw[40 + 24 * n:]


def _container_bytes(head, index, body: bytes, *, fix_crcs: bool = True) -> bytes:
    import zlib

    idx = b"".join(struct.pack("<QIIII", *e) for e in index)
    if fix_crcs:
        head = list(head)
        head[7] = zlib.crc32(idx)
    h = struct.pack("<8sBBHIQQII", *head)
    if fix_crcs:
        h = h[:36] + struct.pack("<I", zlib.crc32(h[:36]))
    return h + idx + body


def _edit(fn, fix_crcs: bool = True):
    def apply(path: Path) -> bytes:
        raw, head, index, body = _container_parts(path)
        out = fn(head, index, body)
        if isinstance(out, bytes):
            return out
        head, index, body = out
        return _container_bytes(head, index, body, fix_crcs=fix_crcs)
    return apply


def _set_head(i, value):
    def fn(head, index, body):
        head[i] = value
        return head, index, body
    return fn


def _set_entry(chunk, field, value):
    def fn(head, index, body):
        index[chunk][field] = value
        return head, index, body
    return fn


def _flip_body_byte(head, index, body):
    b = bytearray(body)
    b[len(b) // 2] ^= 0xFF
    return head, index, bytes(b)


COMPRESSED_CASES = {
    "empty file": (lambda p: b"", "fewer than the 8-byte header"),
    "magic only": (lambda p: p.read_bytes()[:8], "fewer than the 40-byte header"),
    "header only": (lambda p: p.read_bytes()[:40], "needs"),
    "truncated in the index": (lambda p: p.read_bytes()[:60], "truncated"),
    "truncated in the last chunk": (lambda p: p.read_bytes()[:-3], "runs past the end"),
    "trailing garbage": (lambda p: p.read_bytes() + b"junk", "follow the last chunk"),
    "header bit flip": (lambda p: p.read_bytes()[:20] + bytes([p.read_bytes()[20] ^ 1]) + p.read_bytes()[21:],
                        "header's CRC-32"),
    "index bit flip": (_edit(_set_entry(1, 2, 7), fix_crcs=False), "index's CRC-32"),
    "unknown codec": (_edit(_set_head(1, 9)), "unknown codec id"),
    "giant raw size": (_edit(_set_head(5, 1 << 62)), "cannot hold"),
    "giant chunk count and raw size": (_edit(_set_head(4, 0xFFFFFFFF)), "cannot hold"),
    "giant chunk size": (_edit(_set_head(6, 1 << 40)), "chunk size"),
    "offset into the index": (_edit(_set_entry(0, 0, 8)), "chunks lie back to back"),
    "offset past the end": (_edit(_set_entry(1, 0, 1 << 40)), "chunks lie back to back"),
    "giant compressed size": (_edit(_set_entry(0, 1, 0xFFFFFFF0)), "impossible compressed size"),
    "raw size mismatch": (_edit(_set_entry(0, 2, 100)), "claims 100 raw bytes"),
    "reserved field": (_edit(_set_entry(0, 4, 1)), "reserved"),
    "corrupted chunk data": (_edit(_flip_body_byte), "chunk"),
    "wrong chunk crc": (_edit(_set_entry(0, 3, 12345)), "CRC-32 of the decoded bytes"),
}


@pytest.mark.parametrize("case", sorted(COMPRESSED_CASES))
@pytest.mark.parametrize("lazy", [False, True])
def test_malformed_compressed_files_fail_clearly(synth, tmp_path, case, lazy):
    _need("zstandard")
    good = tmp_path / "good.cvxqz"
    packed.write_compressed_packed(synth.path, good, codec="zstd-3", chunk_size=512)
    make, expect = COMPRESSED_CASES[case]
    bad = tmp_path / "bad.cvxqz"
    bad.write_bytes(make(good))
    with pytest.raises(CvxqError) as err:
        with read_packed(bad, lazy=lazy) as pf:
            for name in pf.tensors:  # lazy: a damaged chunk shows when a tensor is read
                pf.weight(name)
            pf.verify_all()
    text = str(err.value)
    assert expect in text and "fix:" in text, text


def test_compressed_zstd_frame_claiming_more_than_its_chunk_is_refused(tmp_path):
    """A frame whose header declares more bytes than the index allows is refused before zstd allocates them."""
    zstd = _need("zstandard")
    path = tmp_path / "bomb.cvxqz"
    pz.write_container(bytes(1000), path, "zstd-3", chunk_size=1000)
    raw, head, index, body = _container_parts(path)
    bomb = zstd.ZstdCompressor(level=3).compress(bytes(1 << 24))  # 16 MiB of zeros, a few hundred bytes
    index[0][1] = len(bomb)
    with pytest.raises(CvxqError, match="declares 16,777,216 bytes"):
        c = pz.ChunkedContainer(__import__("io").BytesIO(_container_bytes(head, index, bomb)), "bomb")
        c.chunk(0)


def test_compressed_writer_refuses_bad_input(synth, tmp_path):
    with pytest.raises(CvxqError, match="zstd or lz4"):
        packed.write_compressed_packed(synth.path, tmp_path / "x.cvxqz", codec="brotli-5")
    with pytest.raises(CvxqError, match="chunk size"):
        packed.write_compressed_packed(synth.path, tmp_path / "x.cvxqz", codec="stored", chunk_size=0)
    not_packed = tmp_path / "blob.bin"
    not_packed.write_bytes(bytes(100))
    with pytest.raises(CvxqError):
        packed.write_compressed_packed(not_packed, tmp_path / "y.cvxqz", codec="stored")
    assert not (tmp_path / "x.cvxqz").exists() and not (tmp_path / "y.cvxqz").exists()
    good = packed.write_compressed_packed(synth.path, tmp_path / "z.cvxqz", codec="stored")
    with pytest.raises(CvxqError, match="already a compressed container"):
        packed.write_compressed_packed(good["path"], tmp_path / "zz.cvxqz", codec="stored")


def test_cli_analyze_write_compressed(capsys, synth, tmp_path):
    from cvxq_export.cli import main

    _need("zstandard")
    src = tmp_path / "model.cvxq.safetensors"
    shutil.copy(synth.path, src)
    code = main(["analyze", str(src), "--device", "raspberry-pi-5-4gb", "--codec", "zstd-3", "--no-tensors",
                 "--write-compressed", "zstd-3", "--json", "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    dst = Path(result["compressed"]["path"])
    assert dst == pz.compressed_name(src) and dst.is_file()
    with read_packed(dst) as comp, read_packed(src) as plain:
        for name in plain.tensors:
            assert same_bits(comp.weight(name), plain.weight(name))
    # not a packed file: refused before the analysis runs
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"\0" * 4096)
    code = main(["analyze", str(blob), "--write-compressed", "-q"])
    assert code == 2 and "fix:" in capsys.readouterr().err


def test_lazy_open_of_an_uncompressed_file_checks_each_tensor_on_access(synth, tmp_path):
    """lazy=True: the header is checked at open; a damaged tensor fails (clearly) when it is read, not before,
    and the others still read bit-exact."""
    data = bytearray(synth.path.read_bytes())
    with read_packed(synth.path) as pf:
        victim = pf.buffers["c_proj.weight.offset"]
    data[victim.begin] ^= 0x01  # one flipped bit in one tensor's offsets
    bad = tmp_path / "bad.cvxq.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(CvxqError, match="c_proj.weight.offset: crc32"):
        read_packed(bad)  # eager: refused at open
    with read_packed(bad, lazy=True) as pf:
        assert same_bits(pf.weight("a_proj.weight"), synth.qts["a_proj.weight"].dequant.numpy())
        with pytest.raises(CvxqError, match="c_proj.weight.offset: crc32"):
            pf.weight("c_proj.weight")
        with pytest.raises(CvxqError, match="crc32"):
            pf.verify_all()
    with read_packed(synth.path, lazy=True) as pf:
        pf.verify_all()
        for name, qt in synth.qts.items():
            assert same_bits(pf.weight(name), qt.dequant.numpy())


def test_error_feedback_lowers_layer_output_error_and_stays_bit_exact(tiny_llama_dir, tmp_path, decoder):
    """GPTQ-style feedback across columns: same plan, same bytes, the file reads back
    bit-exact (NumPy and C readers), and the layers' output error E||(W - Q) x||^2 on
    the calibration inputs goes down in total."""
    from cvxq_export.calibrate import CalibrationSettings
    from cvxq_export.formats.packed.container import export_packed, plan_packed
    from cvxq_export.pipeline import input_hessians, quantize_plan

    loaded, sens = _load_and_calibrate(tiny_llama_dir)
    hessians = input_hessians(loaded, None, CalibrationSettings(n_windows=3, seq_len=32, n_pcs=8), progress=False)
    plan = plan_packed(loaded, sens, 60_000, progress=False)
    plain = quantize_plan(loaded, sens, plan, progress=False)
    fed = quantize_plan(loaded, sens, plan, progress=False, hessians=hessians)
    assert set(fed) == set(hessians) == set(plain)

    def output_error(qtensors) -> float:
        total = 0.0
        for name, qt in qtensors.items():
            d = loaded.weight_tensor(qt.ref).detach().float().numpy() - qt.dequant.numpy()  # [rows, cols]
            total += float(np.einsum("ij,jk,ik->", d, hessians[name], d))
        return total

    assert output_error(fed) < 0.9 * output_error(plain)
    info = export_packed(loaded, sens, plan, tmp_path, progress=False, qtensors=fed, save_tokenizer=False)
    assert info["verified"] and info["file_bytes"] <= plan.budget_bytes
    with read_packed(tmp_path / packed.FILE_NAME) as pf:
        for name, qt in fed.items():
            assert same_bits(pf.weight(name), qt.dequant.numpy()), name
            proc = run_decoder(decoder, tmp_path / packed.FILE_NAME, name)
            assert proc.returncode == 0 and proc.stdout.strip() == weight_checksum(qt.dequant.numpy()), name
