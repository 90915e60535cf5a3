import pytest

from cvxq_export.devices import (ModelShape, kv_cache_bytes, list_devices, load_device, model_shape_from_config,
                                 weight_budget)
from cvxq_export.errors import CvxqError
from cvxq_export.sizes import format_size, parse_size


@pytest.mark.parametrize("text,expected", [
    ("90MB", 90_000_000), ("90 mb", 90_000_000), ("1.5GB", 1_500_000_000), ("500MiB", 500 * 2**20),
    ("2GiB", 2 * 2**30), ("123456789", 123456789), ("64kB", 64_000), ("64KiB", 65536), ("1TB", 10**12),
    ("100B", 100),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["-5MB", "0", "ninety", "", "5XB", "nan", "inf", "0.1B"])
def test_parse_size_rejects(text):
    with pytest.raises(CvxqError) as e:
        parse_size(text)
    assert "90MB" in (e.value.fix or "")


def test_format_size():
    assert format_size(512) == "512 B"
    assert format_size(90_000_000) == "90.0 MB"
    assert format_size(1_234_000_000) == "1.23 GB"


def test_profiles_load():
    names = list_devices()
    assert {"raspberry-pi-5-4gb", "raspberry-pi-5-8gb", "jetson-orin-nano-8gb", "android-8gb", "iphone-6gb"} <= set(names)
    for name in names:
        p = load_device(name)
        assert p.ram_bytes > p.os_reserved_bytes > 0
        assert p.storage_read_mb_s > 0 and p.decode_mb_s > 0
        # a format some runtime on the device runs (the packed container has no inference kernels)
        assert p.default_format in ("gguf", "onnx"), f"{name} defaults to {p.default_format}"
        assert p.sources, f"{name} cites no sources"


def test_unknown_device():
    with pytest.raises(CvxqError) as e:
        load_device("toaster")
    assert "iphone-6gb" in e.value.fix


def test_kv_cache_smollm2():
    shape = ModelShape(n_layers=30, n_kv_heads=3, head_dim=64)
    assert kv_cache_bytes(shape, 2048, "f16") == 2 * 30 * 3 * 64 * 2048 * 2
    assert kv_cache_bytes(shape, 2048, "q8_0") == 2 * 30 * 3 * 64 * 2048 * 34 // 32


def test_budget_arithmetic_and_shape_from_config():
    from types import SimpleNamespace

    shape = model_shape_from_config(SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                                    hidden_size=576, head_dim=None))
    assert shape == ModelShape(30, 3, 64)
    gpt2 = model_shape_from_config(SimpleNamespace(n_layer=12, n_head=12, n_embd=768))
    assert gpt2 == ModelShape(12, 12, 64)
    p = load_device("raspberry-pi-5-4gb")
    bd = weight_budget(p, shape, 4096)
    assert bd.weights == p.ram_bytes - p.os_reserved_bytes - kv_cache_bytes(shape, 4096) - p.runtime_overhead_bytes


def test_tiny_device_cannot_hold_cache(tmp_path):
    f = tmp_path / "tiny.toml"
    f.write_text('ram_bytes = 100000000\nos_reserved_bytes = 50000000\nstorage_read_mb_s = 10.0\ndecode_mb_s = 10.0\n'
                 'runtime_overhead_bytes = 1000000\ndefault_format = "gguf"\ndefault_context = 2048\nkv_cache_dtype = "f16"\n')
    with pytest.raises(CvxqError) as e:
        weight_budget(load_device(str(f)), ModelShape(30, 3, 64), 100_000)
    assert "--context" in e.value.fix
    g = tmp_path / "broken.toml"
    g.write_text('ram_bytes = 1\n')
    with pytest.raises(CvxqError) as e:
        load_device(str(g))
    assert "os_reserved_bytes" in e.value.problem
