"""Bad arguments and files get one error line and a fix, exit status 2, before any
model is loaded (each case here returns in well under a second)."""
import json

import pytest

from cvxq_export.cli import main

GOOD_PROFILE = dict(name="board", ram_bytes=4 << 30, os_reserved_bytes=1 << 30, storage_read_mb_s=100.0,
                    decode_mb_s=200.0, runtime_overhead_bytes=1 << 27, default_format="gguf", default_context=2048,
                    kv_cache_dtype="f16")


def _toml(d: dict) -> str:
    def value(v):
        return json.dumps(v) if isinstance(v, str) else repr(v)  # repr(inf) is TOML's inf
    return "\n".join(f"{k} = {value(v)}" for k, v in d.items()) + "\n"


def _profile(tmp_path, **changes) -> str:
    d = {**GOOD_PROFILE, **changes}
    d = {k: v for k, v in d.items() if v is not None}
    path = tmp_path / "board.toml"
    path.write_text(_toml(d))
    return str(path)


ARG_CASES = [
    (["--seed", "-1"], "--seed -1 is out of range"),
    (["--windows", "1000000000"], "--windows 1000000000 is beyond"),
    (["--seq-len", "100000000"], "--seq-len 100000000 is beyond"),
    (["--context", "-5"], "--context must be positive"),
    (["--decode-speed", "nan"], "not a ratio between 0 and 1"),
    (["--decode-speed", "inf"], "not a ratio between 0 and 1"),
    (["--decode-speed", "1.5"], "not a ratio between 0 and 1"),
    (["--decode-speed", "-1"], "not a ratio between 0 and 1"),
    (["--max-row-group", "0"], "--max-row-group must be positive"),
    (["--format", ""], "names no format"),
]


@pytest.mark.parametrize("args,message", ARG_CASES, ids=[" ".join(a) for a, _ in ARG_CASES])
def test_bad_arguments(capsys, tmp_path, args, message):
    code = main(["fit", "--budget", "90MB", "-o", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "fix:" in err and "Traceback" not in err, err


def test_unwritable_output(capsys):
    code = main(["fit", "--budget", "90MB", "-o", "/proc/no-such-dir/out"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write into output directory" in err


@pytest.mark.parametrize("plan", [[1, 2], {"format": "gguf"}, {"format": "gguf", "budget_bytes": -1, "tensors": [{}]}, "x"])
def test_plan_json_schema(capsys, tmp_path, plan):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    code = main(["fit", "--plan", str(path), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "is not a cvxq-export plan" in err, err


PROFILE_CASES = [
    (dict(ram_bytes=float("inf")), "ram_bytes = inf"),
    (dict(ram_bytes=1e300), "ram_bytes = 1e+300"),
    (dict(default_context=0), "default_context = 0"),
    (dict(storage_read_mb_s=0.0), "storage_read_mb_s = 0.0"),
    (dict(default_format="tflite"), "default_format = 'tflite'"),
    (dict(os_reserved_bytes=8 << 30), "os_reserved_bytes"),
    (dict(kv_cache_dtype=None, decode_mb_s=None), "kv_cache_dtype is missing; decode_mb_s is missing"),
]


@pytest.mark.parametrize("changes,message", PROFILE_CASES, ids=[m for _, m in PROFILE_CASES])
def test_device_profile_schema(capsys, tmp_path, changes, message):
    code = main(["fit", "--device", _profile(tmp_path, **changes), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "fix:" in err and "Traceback" not in err, err
    for part in message.split("; "):
        assert part in err, err


def test_device_profile_not_utf8(capsys, tmp_path):
    path = tmp_path / "board.toml"
    path.write_bytes(b'name = "b\xff\xfe"\n')
    code = main(["fit", "--device", str(path), "-o", str(tmp_path / "o")])
    assert code == 2 and "is not UTF-8 text" in capsys.readouterr().err


def test_a_weight_with_nan_is_refused_at_load(tmp_path, tiny_llama_dir):
    """A damaged weight (NaN or inf) is named at load time, not found later as a non-finite
    distortion or perplexity."""
    import shutil

    from safetensors.torch import load_file, save_file

    from cvxq_export.errors import CvxqError
    from cvxq_export.model import load_model

    bad = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, bad)
    weights = load_file(bad / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name][3, 5] = float("inf")
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CvxqError, match=f"weight {name} holds NaN or infinite values"):
        load_model(str(bad))


def test_perplexity_of_a_broken_model_is_infinite_not_an_overflow():
    import math

    from cvxq_export.evaluate import perplexity_from_nll

    assert perplexity_from_nll(1e4) == math.inf and perplexity_from_nll(0.0) == 1.0


@pytest.mark.parametrize("value", [3e38, 1e30])
def test_weights_that_overflow_are_a_clear_error(capsys, tmp_path, tiny_llama_dir, value):
    """Finite but absurd weights (a damaged file) make calibration or the menu overflow: a
    one-line error, not a traceback from deep inside the allocator."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, bad)
    weights = load_file(bad / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"][0, :8] = value
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    code = main(["plan", str(bad), "--budget", "110kB", "--format", "packed", "-o", str(tmp_path / "o"),
                 "--windows", "2", "--seq-len", "16", "--n-pcs", "4", "-q", "--no-cache"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and ("non-finite" in err or "NaN or infinite" in err), err
