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


def test_an_unchanged_file_is_parsed_once_a_changed_one_again(tmp_path):
    path = _header_file(tmp_path / "m.gguf")
    first = read_gguf_header(path)
    assert read_gguf_header(path) is first  # the same file, unchanged: no second parse
    full = read_gguf_header(path, arrays=True)
    assert full is not first and read_gguf_header(path) is full  # the full header serves both
    other = _header_file(tmp_path / "other.gguf", arch="qwen2")
    other.replace(path)  # another file under the same name
    assert read_gguf_header(path).architecture == "qwen2"


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


def test_arrays_and_types_read_like_gguf_py(tmp_path):
    """With arrays=True every metadata value and its type is what gguf-py reads, and
    each tensor's bytes are the ones gguf-py maps."""
    import gguf
    import numpy as np

    path = _header_file(tmp_path / "m.gguf")
    header = read_gguf_header(path, arrays=True)
    reader = gguf.GGUFReader(str(path))
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        assert header.values[key] == f.contents(), key
        item = int(f.types[-1]) if f.types[0] == gguf.GGUFValueType.ARRAY else None
        assert header.types[key] == (int(f.types[0]), item), key
    for info, t in zip(header.tensors, reader.tensors):
        assert np.array_equal(np.asarray(header.tensor_data(path, info)).reshape(-1),
                              np.asarray(t.data).view(np.uint8).reshape(-1))


def _model_file(path, **overrides):
    """A small llama GGUF header with its tensors; ``overrides`` replace hyperparameters
    (None drops one), ``tensors=False`` writes none."""
    import gguf
    import numpy as np

    hp = {"block_count": 2, "context_length": 256, "embedding_length": 32, "feed_forward_length": 64,
          "attention.head_count": 4, "attention.head_count_kv": 2, "attention.layer_norm_rms_epsilon": 1e-5}
    with_tensors = overrides.pop("tensors", True)
    quantized_norm = overrides.pop("quantized_norm", False)
    eos = overrides.pop("eos_token_id", None)
    hp.update(overrides)
    writer = gguf.GGUFWriter(str(path), "llama")
    if eos is not None:
        writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
        writer.add_uint32("tokenizer.ggml.eos_token_id", eos)
    for key, value in hp.items():
        if value is None:
            continue
        if isinstance(value, float):
            writer.add_float32(f"llama.{key}", value)
        else:
            writer.add_uint32(f"llama.{key}", value)
    if with_tensors:
        for layer in range(2):
            writer.add_tensor(f"blk.{layer}.attn_q.weight", np.zeros((32, 32), np.float32))
        writer.add_tensor("token_embd.weight", np.zeros((16, 32), np.float32))
        if quantized_norm:  # 32 weights as one Q4_0 block (18 bytes)
            writer.add_tensor("output_norm.weight", np.zeros(18, np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


BAD_FILES = {
    "block_count 0 (llama.cpp aborts)": ({"block_count": 0}, "block_count"),
    "block_count 2^32-1 (llama.cpp hangs)": ({"block_count": 2**32 - 1}, "block_count"),
    "block_count missing": ({"block_count": None}, "block_count is missing"),
    "epsilon NaN (llama.cpp aborts)": ({"attention.layer_norm_rms_epsilon": float("nan")}, "epsilon"),
    "epsilon negative": ({"attention.layer_norm_rms_epsilon": -1.0}, "epsilon"),
    "no KV heads (division by zero)": ({"attention.head_count_kv": 0}, "head_count_kv"),
    "heads not a multiple of KV heads": ({"attention.head_count": 6, "attention.head_count_kv": 4}, "multiple"),
    "context 0": ({"context_length": 0}, "context_length"),
    "no tensors (random weights)": ({"tensors": False}, "no tensors"),
    "a Q4_0 norm (llama.cpp aborts in its multiply)": ({"quantized_norm": True}, "must be F32, F16 or BF16"),
    "eos token outside the vocabulary (IndexError in transformers)": ({"eos_token_id": 3}, "3-token vocabulary"),
    "rope dimension 0 (division by zero)": ({"rope.dimension_count": 0}, "rope.dimension_count"),
    "rope dimension odd": ({"rope.dimension_count": 7}, "even number"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_damaged_model_headers_are_refused_before_anyone_reads_them(tmp_path, case):
    from cvxq_export.gguf_checks import checked_gguf_header

    overrides, field = BAD_FILES[case]
    path = _model_file(tmp_path / "m.gguf", **dict(overrides))
    with pytest.raises(CvxqError, match=field):
        checked_gguf_header(path)


def test_tensor_past_the_end_and_the_good_file(tmp_path):
    from cvxq_export.gguf_checks import checked_gguf_header

    path = _model_file(tmp_path / "m.gguf")
    assert checked_gguf_header(path).arch_values()["block_count"] == 2
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CvxqError, match="runs past the end"):
        checked_gguf_header(cut)


def test_llama_cpp_never_sees_a_damaged_file(tmp_path):
    """open_llama checks the header first: a block count of zero is a clear error, not an
    abort of the process inside llama.cpp."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: pip install 'cvxq-export[llama]'")
    from cvxq_export.formats.gguf.llama_eval import open_llama

    with pytest.raises(CvxqError, match="block_count"):
        open_llama(_model_file(tmp_path / "m.gguf", block_count=0), verbose=False)
    with pytest.raises(CvxqError, match="llama.cpp cannot load"):  # sane header, but not a whole llama model
        open_llama(_model_file(tmp_path / "n.gguf"), verbose=False)


def test_load_model_checks_a_gguf_before_transformers_reads_it(tmp_path):
    from cvxq_export.model import load_model

    with pytest.raises(CvxqError, match="head_count_kv"):
        load_model(str(_model_file(tmp_path / "m.gguf", **{"attention.head_count_kv": 0})))
