"""Compressibility and load-latency analysis (cvxq_export.analysis): fast tests, no real models."""
from __future__ import annotations

import argparse
import json
import math
import struct
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

from cvxq_export.analysis.codecs import CODECS, Codec, get_codec, measure, measure_chunks
from cvxq_export.analysis.entropy import bits_alphabet, byte_entropy, code_entropy, entropy_from_counts
from cvxq_export.analysis.latency import Candidate, device_speeds, load_times, recommend
from cvxq_export.errors import CvxqError

KiB, MiB = 1 << 10, 1 << 20


def need(codec_name: str) -> Codec:
    """The codec, or skip the test naming the missing package."""
    codec = get_codec(codec_name)
    reason = codec.skip_reason()
    if reason:
        pytest.skip(reason)
    return codec


def laplace_bytes(n: int, scale: float = 6.0, seed: int = 0) -> bytes:
    """Bytes like int8 quantized weights: compressible to roughly 60-65 %."""
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(rng.laplace(0.0, scale, n)), -127, 127).astype(np.int8).view(np.uint8).tobytes()


# --------------------------------------------------------------------------- entropy


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_uniform_over_2k_symbols_is_k_bits(k):
    codes = np.tile(np.arange(2**k), 1000)
    e = code_entropy(codes, bits_alphabet(k))
    assert e.bits_per_symbol == pytest.approx(k, abs=1e-12)
    assert e.raw_bits_per_symbol == k and e.efficiency == pytest.approx(1.0)
    assert e.bound_bytes == math.ceil(len(codes) * k / 8) == e.raw_bytes


def test_uniform_bytes_and_constant():
    assert byte_entropy(np.tile(np.arange(256, dtype=np.uint8), 64)).bits_per_symbol == pytest.approx(8.0)
    const = byte_entropy(b"\x07" * 10_000)
    assert const.bits_per_symbol == 0.0 and const.bound_bytes == 0 and const.distinct_symbols == 1
    assert code_entropy(np.full(100, 3), 16).bits_per_symbol == 0.0
    empty = byte_entropy(b"")
    assert empty.bits_per_symbol == 0.0 and empty.n_symbols == 0


def test_two_symbol_source_matches_formula():
    n = 4000
    codes = np.zeros(n, dtype=np.int64)
    codes[: n // 4] = 1  # p(1) = 0.25 exactly
    h = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))  # 0.8113 bits
    e = code_entropy(codes, 2)
    assert e.bits_per_symbol == pytest.approx(h, rel=1e-12)
    assert e.bound_bytes == math.ceil(n * h / 8)
    assert entropy_from_counts([3000, 1000]) == pytest.approx(h, rel=1e-12)
    # the same distribution as bytes
    assert byte_entropy(codes.astype(np.uint8)).bits_per_symbol == pytest.approx(h, rel=1e-12)


def test_random_bytes_have_8_bits_and_bad_codes_are_refused():
    rng = np.random.default_rng(1)
    assert byte_entropy(rng.integers(0, 256, 1 << 20, dtype=np.uint8)).bits_per_symbol > 7.999
    with pytest.raises(ValueError, match="outside the alphabet"):
        code_entropy(np.array([0, 16]), 16)
    with pytest.raises(ValueError):
        code_entropy(np.array([0.5]), 2)


# --------------------------------------------------------------------------- codecs


def test_registry_names():
    assert list(CODECS) == ["zstd-1", "zstd-3", "zstd-9", "zstd-19", "lz4", "brotli-5", "brotli-11", "ans"]
    with pytest.raises(ValueError, match="unknown codec"):
        get_codec("zip")


def test_missing_package_gives_clear_skip_reason():
    fake = Codec("fake", "zstd", "cvxq_no_such_module_xyz", "no-such-package")
    reason = fake.skip_reason()
    assert reason and "no-such-package" in reason and "pip install" in reason and not fake.available
    with pytest.raises(ImportError, match="no-such-package"):
        measure(b"abc", fake)


@pytest.mark.parametrize("name", list(CODECS))
def test_round_trip_and_reproducible_sizes(name):
    codec = need(name)
    data = laplace_bytes(64 * KiB) + bytes(4 * KiB) + b"tail"
    for sample in (data, b"", b"x", bytes(1000)):
        assert codec.decompress(codec.compress(sample)) == sample
    a, b = codec.compress(data), codec.compress(data)
    assert a == b  # deterministic: sizes reproduce across runs
    r1 = measure(data, codec, min_seconds=0.01)
    r2 = measure(data, codec, min_seconds=0.01)
    assert r1.compressed_bytes == r2.compressed_bytes == len(a)
    assert r1.raw_bytes == len(data) and r1.ratio == pytest.approx(len(a) / len(data))
    assert r1.decode_MBps > 0 and r1.name == name


@pytest.mark.parametrize("name", list(CODECS))
def test_random_bytes_do_not_compress_and_zeros_do(name):
    codec = need(name)
    rng = np.random.default_rng(2)
    noise = rng.integers(0, 256, 256 * KiB, dtype=np.uint8).tobytes()
    r = measure(noise, codec, min_seconds=0.01)
    assert 0.99 <= r.ratio <= 1.02, f"{name}: {r.ratio}"
    assert r.gap_to_entropy_bits_per_byte == pytest.approx(8 * r.ratio - byte_entropy(noise).bits_per_symbol)
    assert abs(r.gap_to_entropy_bits_per_byte) < 0.15
    mostly_zero = np.zeros(256 * KiB, dtype=np.uint8)
    idx = rng.choice(len(mostly_zero), len(mostly_zero) // 50, replace=False)
    mostly_zero[idx] = rng.integers(1, 256, len(idx))
    z = measure(mostly_zero.tobytes(), codec, min_seconds=0.01)
    assert z.ratio < 0.3, f"{name}: {z.ratio}"


def test_entropy_coder_is_close_to_the_order0_bound():
    codec = need("ans")
    data = laplace_bytes(256 * KiB, seed=3)
    r = measure(data, codec, min_seconds=0.01)
    # table (<= 521 bytes) + 24-bit ANS quantization: within 0.02 bits/byte of the bound
    assert 0 <= r.gap_to_entropy_bits_per_byte < 0.02
    chunks = [data[i : i + 64 * KiB] for i in range(0, len(data), 64 * KiB)]
    rc = measure_chunks(chunks, codec, min_seconds=0.01, chunk_bytes=64 * KiB)
    assert rc.n_chunks == 4 and rc.compressed_bytes > r.compressed_bytes  # one table per chunk


def test_decode_timing_runs_at_least_min_seconds():
    codec = need("zstd-1")
    t0 = time.perf_counter()
    r = measure(laplace_bytes(64 * KiB), codec)  # default: repeat until >= 0.2 s
    assert time.perf_counter() - t0 >= 0.2 and r.decode_MBps > 1


# --------------------------------------------------------------------------- latency model


def test_load_times_hand_computed():
    # 100 MB file, 50 MB compressed, 100 MB/s storage, 1 MB chunks (100 chunks)
    t = load_times(100_000_000, 50_000_000, 1_000_000, read_MBps=100, decode_MBps=200)
    assert t.n_chunks == 100
    assert t.plain_s == pytest.approx(1.0)
    assert t.serial_s == pytest.approx(0.5 + 0.5)
    assert t.overlapped_s == pytest.approx(0.5 + 0.005)  # max(0.5, 0.5) + min(5 ms read, 5 ms decode)
    fast = load_times(100_000_000, 50_000_000, 1_000_000, read_MBps=100, decode_MBps=1000)
    assert fast.serial_s == pytest.approx(0.6) and fast.overlapped_s == pytest.approx(0.5 + 0.001)
    slow = load_times(100_000_000, 50_000_000, 1_000_000, read_MBps=100, decode_MBps=50)  # decode-bound
    assert slow.serial_s == pytest.approx(2.5) and slow.overlapped_s == pytest.approx(2.0 + 0.005)
    one = load_times(10_000_000, 5_000_000, 64 * MiB, read_MBps=100, decode_MBps=100)  # a single chunk
    assert one.n_chunks == 1 and one.overlapped_s == pytest.approx(one.serial_s) == pytest.approx(0.15)
    with pytest.raises(ValueError):
        load_times(1, 1, 1, 0, 1)


def test_recommend_hand_computed():
    sd = SimpleNamespace(name="sd-card", storage_read_mb_s=50.0, decode_mb_s=800.0)
    nvme = SimpleNamespace(name="nvme", storage_read_mb_s=3000.0, decode_mb_s=800.0)
    cands = [Candidate("zstd-3", 1_000_000, 50_000_000, 500.0), Candidate("lz4", 1_000_000, 80_000_000, 2000.0)]
    recs = recommend(100_000_000, cands, [sd, nvme], cpu_factors={"sd-card": 1.0, "nvme": 1.0})
    a, b = recs
    # sd-card: plain 2 s; zstd-3 max(1.0, 0.2) + min(20 ms, 2 ms) = 1.002 s; lz4 max(1.6, 0.05) + 0.5 ms
    assert a.device == "sd-card" and a.compress and a.codec == "zstd-3" and a.chunk_bytes == 1_000_000
    assert a.plain_s == pytest.approx(2.0) and a.overlapped_s == pytest.approx(1.002)
    assert a.serial_s == pytest.approx(1.2) and a.saving_s == pytest.approx(0.998)
    assert a.saving_fraction == pytest.approx(0.499) and "read-bound" in a.reason
    # nvme: plain 33.3 ms; lz4 max(26.7 ms, 50 ms) + min(0.27 ms, 0.5 ms) = 50.27 ms: slower, keep it plain
    assert b.codec == "lz4" and not b.compress
    assert b.overlapped_s == pytest.approx(0.05 + 80_000_000 / 3000e6 / 100)
    assert b.saving_s < 0 and "uncompressed" in b.reason
    # a CPU factor scales decoding: 0.1 makes zstd-3 decode-bound on the sd card (10 s)
    slow = recommend(100_000_000, cands, [sd], cpu_factors={"sd-card": 0.1})[0]
    assert slow.codec == "lz4" and slow.decode_MBps == pytest.approx(200.0)


def test_device_speeds_from_profiles():
    from cvxq_export.devices import load_device

    pi = load_device("raspberry-pi-5-4gb")
    s = device_speeds(pi, local_zstd_MBps=400.0)
    assert s.read_MBps == pi.storage_read_mb_s and s.cpu_factor == pytest.approx(pi.decode_mb_s / 400.0)
    assert "decode_mb_s" in s.assumption
    bare = device_speeds(SimpleNamespace(name="x", storage_read_mb_s=10.0))
    assert bare.cpu_factor == 1.0 and "assumed" in bare.assumption


# --------------------------------------------------------------------------- chunked container, throttle


def test_chunked_container_layout_and_random_access(tmp_path):
    import zlib

    from cvxq_export.analysis.throttle import MAGIC, ChunkedReader, header_bytes, write_chunked

    data = laplace_bytes(300 * KiB, seed=4)
    for codec in ("stored", "zstd-3", "lz4"):
        if codec != "stored":
            need(codec)
        path = tmp_path / f"{codec}.cvxqz"
        entries = write_chunked(data, path, codec, chunk_size=64 * KiB)
        raw = path.read_bytes()
        assert raw[:8] == MAGIC and len(entries) == 5
        n, size, chunk = struct.unpack_from("<IQQ", raw, 12)
        assert (n, size, chunk) == (5, len(data), 64 * KiB)
        assert entries[0].offset == header_bytes(5) == 40 + 24 * 5
        assert entries[-1].offset + entries[-1].compressed_size == len(raw)
        # the index: offset, compressed size, raw size, CRC-32 of the raw chunk, reserved
        off, csize, rsize, crc, reserved = struct.unpack_from("<QIIII", raw, 40 + 24 * 2)
        assert (off, rsize, reserved) == (entries[2].offset, 64 * KiB, 0)
        assert crc == zlib.crc32(data[2 * 64 * KiB : 3 * 64 * KiB])
        if codec == "stored":
            assert csize == rsize and raw[off : off + csize] == data[2 * 64 * KiB : 3 * 64 * KiB]
        with open(path, "rb") as f:
            r = ChunkedReader(f)
            assert r.chunk(3) == data[3 * 64 * KiB : 4 * 64 * KiB]
            assert r.chunk(4) == data[4 * 64 * KiB :] and r.chunks[4].raw_size == 300 * KiB - 4 * 64 * KiB
            assert r.read_range(70_000, 200_000) == data[70_000:200_000]
            assert set(r.decoded) == {1, 2, 3, 4}  # only the chunks the reads touched
            out = bytearray(len(data))
            r.read_into(out)
            assert bytes(out) == data


def test_throttled_file_never_exceeds_its_speed(tmp_path):
    from cvxq_export.analysis.throttle import ThrottledFile

    path = tmp_path / "f.bin"
    path.write_bytes(bytes(2 * MiB))
    t0 = time.perf_counter()
    with ThrottledFile(path, read_MBps=20) as f:
        got = 0
        while True:
            piece = f.read(300_000)
            if not piece:
                break
            got += len(piece)
            assert got / (time.perf_counter() - t0) <= 20e6 * 1.001
    assert got == 2 * MiB and time.perf_counter() - t0 >= 2 * MiB / 20e6


def test_throttled_load_agrees_with_prediction(tmp_path):
    """~8 MB at 25 MB/s: plain, serial and overlapped loads within 15 % of the model (about 1 s each round).

    Robust on a loaded 2-core machine: the throttle is slow enough that decoding (~600 MB/s here, with
    the CRC) is a small share of every load, each load keeps the fastest of 2 runs, and a round that
    another process disturbed is retried (up to 3 rounds; the model must hold in one whole round).
    """
    from cvxq_export.analysis.throttle import validate

    need("zstd-3")
    data = laplace_bytes(8 * MiB, seed=5)
    rounds = []
    for attempt in range(3):
        results = validate(data, tmp_path / f"r{attempt}", codec="zstd-3", chunk_size=1 * MiB, read_MBps=25.0,
                           repeats=2, min_seconds=0.1)
        rounds.append({r.mode: f"measured {r.measured_s:.3f} s, predicted {r.predicted_s:.3f} s" for r in results})
        if all(abs(r.rel_error) < 0.15 for r in results):
            break
    else:
        pytest.fail(f"no round within 15 %: {rounds}")
    by = {r.mode: r for r in results}
    assert set(by) == {"plain", "serial", "overlapped"}
    assert by["overlapped"].measured_s < by["plain"].measured_s  # compressed to ~64 %: loads faster
    assert by["overlapped"].file_bytes < 0.7 * len(data)
    assert by["plain"].predicted_s == pytest.approx(len(data) / 25e6)
    assert by["serial"].decode_MBps > 25  # the decoder measured here, far faster than the throttle
    json.dumps([r.to_dict() for r in results])


# --------------------------------------------------------------------------- analyze_file


FAST = dict(codecs=["zstd-3", "lz4", "ans"], chunk_sizes=(64 * KiB, 256 * KiB), min_seconds=0.02)


def _devices():
    from cvxq_export.devices import load_device

    return [load_device("raspberry-pi-5-4gb"), load_device("android-8gb")]


@pytest.fixture(scope="module")
def safetensors_file(tmp_path_factory):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(6)
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    save_file({"layer.codes": np.frombuffer(laplace_bytes(192 * KiB, scale=3.0), dtype=np.int8).reshape(192, 1024),
               "layer.weight": rng.standard_normal((128, 256)).astype(np.float32),
               "norm.weight": np.ones(512, dtype=np.float32)}, str(path))
    return path


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize

    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("gg") / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", rng.standard_normal((64, 256)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(256, dtype=np.float32))
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_up.weight"):
        q = quantize((0.02 * rng.standard_normal((128, 256))).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_analyze_safetensors(safetensors_file, tmp_path):
    from cvxq_export.analysis.analyze import analyze_file, plot_load_times, render_markdown

    need("zstd-3")
    r = analyze_file(safetensors_file, _devices(), **FAST)
    assert r.format == "safetensors" and r.file_bytes == safetensors_file.stat().st_size
    assert 0 < r.entropy["bits_per_symbol"] < 8
    tensors = {t["name"]: t for t in r.tensors}
    assert set(tensors) == {"layer.codes", "layer.weight", "norm.weight"}
    codes = tensors["layer.codes"]
    assert codes["dtype"] == "I8" and codes["nbytes"] == 192 * KiB
    assert codes["code_entropy"]["bits"] == 8 and codes["code_entropy"]["bits_per_code"] == pytest.approx(
        codes["entropy_bits_per_byte"])
    assert codes["entropy_bits_per_byte"] < 5 and codes["best_ratio"] < 0.7
    assert tensors["norm.weight"]["entropy_bits_per_byte"] < 2 and tensors["norm.weight"]["best_ratio"] < 0.2
    assert tensors["layer.weight"]["entropy_bits_per_byte"] > 6.5
    assert sum(t["nbytes"] for t in r.tensors) < r.file_bytes
    zstd = next(c for c in r.codecs if c["name"] == "zstd-3")
    assert zstd["ratio"] < 0.9 and zstd["decode_MBps"] > 0 and zstd["raw_bytes"] == r.file_bytes
    assert {row["chunk_bytes"] for row in r.chunk_table} == {64 * KiB, 256 * KiB}
    assert [d["device"] for d in r.devices] == ["raspberry-pi-5-4gb", "android-8gb"]
    pi = r.devices[0]
    assert pi["plain_s"] == pytest.approx(r.file_bytes / 90e6)
    assert pi["overlapped_s"] <= pi["serial_s"] + 1e-12
    d = json.loads(json.dumps(r.to_dict()))
    assert d["format"] == "safetensors" and not d["sampling"]["sampled"]
    md = render_markdown(r)
    assert "raspberry-pi-5-4gb" in md and "| codec |" in md and "`layer.codes`" in md and "Load time per device" in md
    png = plot_load_times(r, tmp_path / "load.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_gguf(gguf_file):
    from cvxq_export.analysis.analyze import analyze_file, render_markdown

    need("zstd-3")
    r = analyze_file(gguf_file, _devices()[:1], **FAST)
    assert r.format == "gguf"
    tensors = {t["name"]: t for t in r.tensors}
    assert set(tensors) == {"token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.0.ffn_up.weight"}
    q = tensors["blk.0.attn_q.weight"]
    assert q["dtype"] == "Q8_0" and q["nbytes"] >= 128 * 256 // 32 * 34
    assert q["code_entropy"]["bits"] == 8 and 5 < q["code_entropy"]["bits_per_code"] <= 8
    assert q["code_entropy"]["codes"] == 128 * 256
    assert tensors["token_embd.weight"]["dtype"] == "F32" and tensors["token_embd.weight"]["code_entropy"] is None
    types = {t["dtype"]: t for t in r.tensor_types}
    assert types["Q8_0"]["tensors"] == 2 and types["F32"]["tensors"] == 2
    assert "Q8_0" in render_markdown(r)


def _tiny_onnx(path):
    """An ONNX file with packed uint4 / int4 / uint2 initializers and a float one."""
    onnx = pytest.importorskip("onnx", reason="onnx not installed: pip install 'cvxq-export[onnx]'")
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes not installed: pip install 'cvxq-export[onnx]'")
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    arrays = {"u4": rng.integers(0, 16, (64, 48)).astype(ml_dtypes.uint4),
              "i4": rng.integers(-8, 8, (33, 16)).astype(ml_dtypes.int4),  # odd element count: a half-used last byte
              "u2": rng.integers(0, 2, (40, 9)).astype(ml_dtypes.uint2),  # only 2 of the 4 levels used: 1 bit/code
              "f": rng.standard_normal((10, 7)).astype(np.float32)}
    inits = [numpy_helper.from_array(np.asarray(a), n) for n, a in arrays.items()]
    graph = helper.make_graph([helper.make_node("Identity", ["f"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", 1, [10, 7])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)])
    model.ir_version = 13
    onnx.save(model, str(path))
    return arrays


def test_onnx_directory_locates_initializers_and_codes(tmp_path):
    from cvxq_export.formats.onnx.directory import initializer_codes, is_onnx, read_initializers

    path = tmp_path / "m.onnx"
    arrays = _tiny_onnx(path)
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    assert is_onnx(buf) and not is_onnx(np.frombuffer(b"GGUF\x03\x00", np.uint8))
    inits = {i.name: i for i in read_initializers(buf)}
    assert set(inits) == set(arrays)
    assert [inits[n].type_name for n in ("u4", "i4", "u2", "f")] == ["UINT4", "INT4", "UINT2", "FLOAT"]
    assert bytes(buf[inits["f"].offset:inits["f"].offset + inits["f"].nbytes]) == arrays["f"].tobytes()
    for name, shift in (("u4", 0), ("i4", 8), ("u2", 0)):
        codes, bits = initializer_codes(buf, inits[name])
        np.testing.assert_array_equal(codes, np.asarray(arrays[name]).astype(np.int16).reshape(-1) + shift)
    assert initializer_codes(buf, inits["f"]) is None
    # a truncated file is refused with a clear error, not read past its end
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(path.read_bytes()[: inits["u4"].offset + 10])
    with pytest.raises(CvxqError, match="truncated|ends inside"):
        read_initializers(np.memmap(cut, dtype=np.uint8, mode="r"))


def test_analyze_onnx(tmp_path):
    from cvxq_export.analysis.analyze import analyze_file

    need("zstd-3")
    path = tmp_path / "m.onnx"
    _tiny_onnx(path)
    r = analyze_file(path, _devices()[:1], **FAST)
    assert r.format == "onnx"
    tensors = {t["name"]: t for t in r.tensors}
    assert tensors["u4"]["code_entropy"]["bits"] == 4 and 3.9 < tensors["u4"]["code_entropy"]["bits_per_code"] <= 4
    assert abs(tensors["u2"]["code_entropy"]["bits_per_code"] - 1.0) < 0.05  # half the 2-bit levels unused
    assert tensors["f"]["code_entropy"] is None
    assert sum(t["nbytes"] for t in r.tensors) < r.file_bytes


def test_analyze_random_blob_recommends_plain(tmp_path):
    from cvxq_export.analysis.analyze import analyze_file

    need("zstd-3")
    path = tmp_path / "noise.bin"
    path.write_bytes(np.random.default_rng(8).integers(0, 256, 512 * KiB, dtype=np.uint8).tobytes())
    r = analyze_file(path, _devices(), **FAST)
    assert r.format == "blob" and r.tensors == [] and r.entropy["bits_per_symbol"] > 7.99
    assert all(c["ratio"] > 0.99 for c in r.codecs)
    assert all(not d["compress"] for d in r.devices)


def test_analyze_samples_large_files(tmp_path):
    from cvxq_export.analysis.analyze import analyze_file

    need("zstd-3")
    path = tmp_path / "big.bin"
    path.write_bytes(laplace_bytes(3 * MiB, seed=9))
    r = analyze_file(path, _devices()[:1], codecs=["zstd-3"], chunk_sizes=(64 * KiB,), sample_bytes=512 * KiB,
                     min_seconds=0.02)
    row = r.chunk_table[0]
    assert r.sampling["sampled"] and row["sampled"] and row["sample_bytes"] <= 512 * KiB
    from cvxq_export.formats.packed.compressed import header_bytes

    assert row["compressed_bytes"] == pytest.approx(row["ratio"] * r.file_bytes + header_bytes(48), abs=1)
    assert 0.55 < row["ratio"] < 0.75 and any("sample" in n for n in r.notes)


def test_sampled_estimate_counts_the_metadata_head_once(tmp_path):
    """A safetensors file with a large, very compressible header and incompressible data: the sampled
    estimate must match the whole file compressed chunk by chunk (the head measured in full, not
    weighted like a sample), as the container written from it shows."""
    import os

    from cvxq_export.analysis.analyze import analyze_file
    from cvxq_export.formats.packed.compressed import write_container

    need("zstd-3")
    header = json.dumps({"__metadata__": {"pad": "x" * 600_000},
                         "t": {"dtype": "U8", "shape": [4 * MiB], "data_offsets": [0, 4 * MiB]}}).encode()
    path = tmp_path / "head.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + os.urandom(4 * MiB))
    r = analyze_file(path, _devices()[:1], codecs=["zstd-3"], chunk_sizes=(256 * KiB,), sample_bytes=512 * KiB,
                     min_seconds=0.02, per_tensor=False)
    row = r.chunk_table[0]
    assert row["sampled"] and row["head_bytes"] == 8 + len(header) and row["head_ratio"] < 0.01
    real = write_container(path, tmp_path / "head.cvxqz", "zstd-3", 256 * KiB).file_bytes
    assert row["compressed_bytes"] == pytest.approx(real, rel=0.01)


def test_analyze_errors(tmp_path):
    from cvxq_export.analysis.analyze import analyze_file

    with pytest.raises(CvxqError, match="does not exist"):
        analyze_file(tmp_path / "missing.gguf", [])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 20) + b"{not json at all!!}" + bytes(100))
    with pytest.raises(CvxqError, match="JSON"):
        analyze_file(bad, [], codecs=[], min_seconds=0.01)


# --------------------------------------------------------------------------- CLI function, import weight


def _parse(*argv):
    from cvxq_export.analysis.cli_analyze import add_analyze_parser

    parser = argparse.ArgumentParser(prog="cvxq-export")
    add_analyze_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["analyze", *argv])


def test_cmd_analyze_writes_report_files(safetensors_file, tmp_path, capsys):
    from cvxq_export.analysis.cli_analyze import cmd_analyze

    need("zstd-3")
    out = tmp_path / "report"
    args = _parse(str(safetensors_file), "--device", "raspberry-pi-5-4gb", "--codec", "zstd-3", "--codec", "lz4",
                  "--chunk-size", "64KiB", "--json", "-q", "-o", str(out))
    result = cmd_analyze(args)
    assert capsys.readouterr().out == ""  # --json: stdout is left to the caller
    assert {p.name for p in out.iterdir()} >= {"analysis.md", "analysis.json", "load_times.png"}
    saved = json.loads((out / "analysis.json").read_text())
    assert saved["devices"][0]["device"] == "raspberry-pi-5-4gb" == result["devices"][0]["device"]
    assert result["files"]["plot"].endswith("load_times.png")
    json.dumps(result)


def test_cmd_analyze_errors(tmp_path):
    from cvxq_export.analysis.cli_analyze import cmd_analyze

    with pytest.raises(CvxqError) as exc:
        cmd_analyze(_parse(str(tmp_path / "nope.gguf")))
    assert exc.value.fix
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    with pytest.raises(CvxqError, match="unknown codec"):
        cmd_analyze(_parse(str(f), "--codec", "zip"))
    with pytest.raises(CvxqError, match="unknown device"):
        cmd_analyze(_parse(str(f), "--device", "toaster"))


def test_import_is_lean():
    code = ("import sys, cvxq_export.analysis, cvxq_export.analysis.analyze, cvxq_export.analysis.cli_analyze; "
            "heavy = [m for m in ('torch', 'gguf', 'matplotlib', 'zstandard', 'lz4', 'brotli', 'constriction') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing the analysis package pulled in: {out}"
