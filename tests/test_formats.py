"""The format interface: the registry, one fit over several formats, the re-plan cache."""
import json

import pytest

from cvxq_export.cli import main
from cvxq_export.errors import CvxqError
from cvxq_export.formats.registry import REGISTRY, get_format, parse_formats

FAST = ["--windows", "3", "--seq-len", "32", "--n-pcs", "8", "-q"]


def test_registry_names_every_format_and_checks_names():
    assert set(REGISTRY) == {"gguf", "onnx", "packed"}
    for name in REGISTRY:
        fmt = get_format(name)
        assert fmt.name == name and fmt.file_name
        for method in ("check_supported", "size_range", "menu_key", "build_menu", "plan", "write", "evaluate", "curve"):
            assert callable(getattr(fmt, method)), (name, method)
    assert parse_formats(" gguf, ONNX ,gguf") == ["gguf", "onnx"]
    with pytest.raises(CvxqError, match="unknown format"):
        parse_formats("gguf,tflite")
    with pytest.raises(CvxqError, match="names no format"):
        parse_formats(" , ")


def test_import_stays_light():
    import subprocess
    import sys

    code = ("import sys, cvxq_export, cvxq_export.formats.registry, cvxq_export.formats.base; "
            "print(sorted(m for m in ('torch', 'onnx', 'gguf', 'llama_cpp') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_one_fit_writes_every_format_from_one_calibration(capsys, tmp_path, tiny_llama_dir):
    pytest.importorskip("onnx", reason="needs the onnx extra: pip install '.[onnx]'")
    out = tmp_path / "multi"
    code = main(["fit", str(tiny_llama_dir), "--budget", "110kB", "--format", "packed,onnx", "-o", str(out),
                 "--no-analysis", "--json", *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert set(result["formats"]) == {"packed", "onnx"}
    assert captured.err.count("sensitivities:") == 1  # one calibration for both
    for name, made in result["formats"].items():
        assert made["directory"] == str(out / name)
        assert (out / name / "plan.json").is_file()
        assert made["file_bytes"] <= 110_000 and made["plan"]["dual_bound"] <= made["plan"]["distortion"]
        for stage in ("menu_s", "plan_s", "write_s"):
            assert result["timings"][name][stage] >= 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["formats"]) == {"packed", "onnx"}
    assert {"size_distortion_packed", "size_distortion_onnx"} <= set(report["plots"])
    from cvxq_export.plan import Plan

    onnx_plan = Plan.load(out / "onnx" / "plan.json")  # ONNX plans count in the bit-depth histogram too
    assert sum(report["formats"]["onnx"]["bits"]["weights_at_depth"]) == sum(t.rows * t.cols for t in onnx_plan.tensors)
    md = (out / "report.md").read_text()
    assert "## packed" in md and "## onnx" in md and "of the best one" in md
    # ONNX, written after packed, started from the original weights (restored from the
    # on-disk snapshot, which is gone): the same file as an ONNX-only fit
    assert not list(out.glob(".weights-*"))
    alone = tmp_path / "alone"
    assert main(["fit", str(tiny_llama_dir), "--budget", "110kB", "--format", "onnx", "-o", str(alone),
                 "--no-analysis", *FAST]) == 0
    capsys.readouterr()
    assert (alone / "model.onnx").read_bytes() == (out / "onnx" / "model.onnx").read_bytes()
    # the ONNX file runs in ONNX Runtime from the command line
    code = main(["run", str(out / "onnx" / "model.onnx"), "the river", "--max-new-tokens", "4", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["runtime"] == "ONNX Runtime"


def test_each_format_refuses_what_it_cannot_write_before_calibrating(capsys, tmp_path, tiny_opt_dir):
    code = main(["fit", str(tiny_opt_dir), "--budget", "150kB", "--format", "onnx", "-o", str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "fix:" in err and "sensitivities:" not in err


def test_plan_reuse_must_match_the_format(capsys, tmp_path, tiny_llama_dir):
    out = tmp_path / "p"
    assert main(["plan", str(tiny_llama_dir), "--budget", "70kB", "--format", "packed", "-o", str(out), *FAST]) == 0
    capsys.readouterr()
    code = main(["fit", str(tiny_llama_dir), "--plan", str(out / "plan.json"), "--format", "onnx",
                 "-o", str(tmp_path / "q"), *FAST])
    assert code == 2 and "is a packed plan" in capsys.readouterr().err


def test_input_moments_are_cached_and_shared(tiny_llama_dir):
    import numpy as np

    from cvxq_export.calibrate import CalibrationSettings
    from cvxq_export.model import load_model
    from cvxq_export.pipeline import input_hessians_cached

    loaded = load_model(str(tiny_llama_dir))
    settings = CalibrationSettings(n_windows=3, seq_len=32)
    first, cached = input_hessians_cached(loaded, None, settings, progress=False)
    assert not cached
    again, cached = input_hessians_cached(loaded, None, settings, progress=False)
    assert cached and set(again) == set(first)
    for name in first:
        assert np.array_equal(first[name], again[name])
    q, k = (next(n for n in again if n.endswith(f"layers.0.self_attn.{p}_proj.weight")) for p in "qk")
    assert np.array_equal(again[q], again[k])  # q and k read the same input


def test_error_feedback_turns_off_when_the_moments_cannot_fit(tiny_llama_dir, monkeypatch, tmp_path, capsys):
    """A model whose input second moments exceed half the free memory (an 8B Llama needs
    ~66 GB) is written without error feedback, and the log says why, instead of running
    out of memory."""
    import cvxq_export.pipeline as pipeline
    from cvxq_export.cli import main

    monkeypatch.setenv("CVXQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(pipeline, "moment_sum_bytes", lambda loaded: 1 << 50)  # 1 PB
    out = tmp_path / "out"
    assert main(["fit", str(tiny_llama_dir), "--budget", "110kB", "--format", "packed", "-o", str(out),
                 "--no-analysis", "--windows", "3", "--seq-len", "32", "--n-pcs", "8", "-q"]) == 0
    err = capsys.readouterr().err
    assert "error feedback: off: the input second moments of this model take" in err
    report = json.loads((out / "report.json").read_text())
    assert report["packed"]["error_feedback"] == []
