"""The GGUF header reader: what gguf-py reads, in milliseconds, and a clear error (never a
huge allocation or a hang) for a damaged or hostile header."""
import struct
import time

import pytest

from cvxq_export.errors import CvxqError
from cvxq_export.gguf_header import read_gguf_header


def _header_file(path, arch="llama"):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "ü"])
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, 32), np.float32))
    writer.add_tensor("output_norm.weight", np.ones(32, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_reads_what_gguf_py_reads(tmp_path):
    import gguf

    path = _header_file(tmp_path / "m.gguf")
    header = read_gguf_header(path)
    reader = gguf.GGUFReader(str(path))
    assert header.architecture == "llama" and header.arch_values()["block_count"] == 2
    assert header.values["tokenizer.ggml.model"] == "gpt2" and "tokenizer.ggml.tokens" not in header.values
    assert [t.name for t in header.tensors] == [t.name for t in reader.tensors]
    assert header.parameters == sum(int(t.n_elements) for t in reader.tensors) == 4 * 32 + 32


@pytest.mark.parametrize("cut", [0, 3, 10, 30, 60, 100])
def test_truncated_header_is_a_clear_error(tmp_path, cut):
    data = _header_file(tmp_path / "m.gguf").read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(CvxqError):
        read_gguf_header(bad)


def test_hostile_counts_are_refused_at_once(tmp_path):
    # claims 2^60 tensors and 2^60 metadata pairs in a 24-byte file
    bad = tmp_path / "hostile.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1 << 60, 1 << 60))
    t = time.perf_counter()
    with pytest.raises(CvxqError, match="cannot fit in the file"):
        read_gguf_header(bad)
    assert time.perf_counter() - t < 0.5
    # a string claiming 2^62 bytes
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 62) + b"x" * 16)
    with pytest.raises(CvxqError, match="cannot fit in the file"):
        read_gguf_header(bad)
