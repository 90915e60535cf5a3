import json
import subprocess
import sys

import numpy as np
import pytest

from cvxq_export.cli import main
from cvxq_export.plan import Plan

FAST = ["--windows", "3", "--seq-len", "32", "--n-pcs", "8", "-q"]


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_runs():
    proc = subprocess.run([sys.executable, "-m", "cvxq_export.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "fit" in proc.stdout and "devices" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "cvxq_export.cli", "fit", "--help"], capture_output=True, text=True)
    assert "--budget" in proc.stdout and "--device" in proc.stdout and "--calibration" in proc.stdout


@pytest.mark.parametrize("budget", ["-5MB", "ninety", "0", "5XB", "nan"])
def test_bad_budget(capsys, tmp_path, tiny_llama_dir, budget):
    code, _, err = run(capsys, "fit", str(tiny_llama_dir), "--budget", budget, "-o", str(tmp_path / "o"))
    assert code == 2 and "error:" in err and "fix:" in err and "Traceback" not in err


def test_missing_model(capsys, tmp_path):
    code, _, err = run(capsys, "fit", str(tmp_path / "nope"), "--budget", "1MB", "-o", str(tmp_path / "o"))
    assert code == 2 and "does not exist" in err


def test_unknown_device_lists_known(capsys, tmp_path, tiny_llama_dir):
    code, _, err = run(capsys, "fit", str(tiny_llama_dir), "--device", "toaster", "-o", str(tmp_path / "o"))
    assert code == 2 and "unknown device 'toaster'" in err and "raspberry-pi-5-4gb" in err


def test_foreign_output_dir_refused(capsys, tmp_path, tiny_llama_dir):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    code, _, err = run(capsys, "fit", str(tiny_llama_dir), "--budget", "1MB", "-o", str(out))
    assert code == 2 and "--force" in err
    assert (out / "thesis.tex").read_text() == "precious"


def test_calibration_text_too_short(capsys, tmp_path, tiny_llama_dir):
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    code, _, err = run(capsys, "fit", str(tiny_llama_dir), "--budget", "60kB", "--format", "packed", "--calibration", str(short),
                       "-o", str(tmp_path / "o"), *FAST)
    assert code == 2 and "fewer than one window" in err


def test_infeasible_budget_states_range(capsys, tmp_path, tiny_llama_dir):
    code, _, err = run(capsys, "fit", str(tiny_llama_dir), "--budget", "1kB", "--format", "packed", "-o", str(tmp_path / "o"), *FAST)
    assert code == 2 and "smallest achievable size" in err and "choose a budget between" in err
    code, _, err = run(capsys, "fit", str(tiny_llama_dir), "--budget", "1GB", "--format", "packed", "-o", str(tmp_path / "o2"), *FAST)
    assert code == 2 and "largest achievable size" in err


def test_unknown_architecture(capsys, tmp_path):
    d = tmp_path / "weird"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "not-a-model"}))
    code, _, err = run(capsys, "fit", str(d), "--budget", "1MB", "-o", str(tmp_path / "o"))
    assert code == 2 and "error:" in err and "Traceback" not in err


def test_fit_end_to_end_and_plan_reuse(capsys, tmp_path, tiny_llama_dir):
    out = tmp_path / "fit"
    sample = str(tmp_path / "eval.txt")
    from cvxq_export.textdata import read_text

    (tmp_path / "eval.txt").write_text(read_text(None)[0])
    code, stdout, err = run(capsys, "fit", str(tiny_llama_dir), "--budget", "60kB", "--format", "packed", "-o", str(out),
                            "--eval-text", sample, "--eval-windows", "4", "--json", *FAST)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["formats"]["packed"]["file"] == str(out / "model.cvxq.safetensors")
    plan = Plan.load(out / "plan.json")
    assert plan.total_bytes <= 60_000 and plan.budget_bytes == 60_000
    # the budget is used, up to the worst-case alignment allowance per tensor the allocator reserves
    from cvxq_export.native import tensor_padding_allowance

    assert plan.total_bytes >= 60_000 - tensor_padding_allowance() * len(plan.tensors) - 2_000  # + the file header
    assert (out / "report.md").is_file() and (out / "report.json").is_file()
    q = result["formats"]["packed"]["evaluation"]["eval"]["quantized"]
    assert q["kl"] >= 0 and np.isfinite(q["perplexity"])
    # a second run reuses the cached sensitivities and the saved plan
    code, stdout, err = run(capsys, "fit", str(tiny_llama_dir), "--plan", str(out / "plan.json"), "-o", str(out),
                            "--json", *FAST)
    assert code == 0, err
    again = json.loads(stdout)
    assert again["calibration_cached"] is True
    assert again["formats"]["packed"]["plan"]["total_bytes"] == plan.total_bytes
    # the menu was cached next to the sensitivities by the first run: a new budget re-plans without rebuilding it
    code, stdout, err = run(capsys, "plan", str(tiny_llama_dir), "--budget", "70kB", "--format", "packed",
                            "-o", str(tmp_path / "p70"), "--json", *FAST)
    assert code == 0, err
    assert json.loads(stdout)["formats"]["packed"]["menu_cached"] is True


def test_budget_monotone_quality(capsys, tmp_path, tiny_llama_dir):
    """More bytes, less sensitivity-weighted distortion."""
    dists = []
    for kb in (40, 60, 90):
        code, stdout, err = run(capsys, "plan", str(tiny_llama_dir), "--budget", f"{kb}kB", "--format", "packed",
                                "-o", str(tmp_path / f"p{kb}"), "--json", *FAST)
        assert code == 0, err
        plan = json.loads(stdout)["formats"]["packed"]["plan"]
        dists.append(plan["distortion"])
        # the dual bound certifies the plan: no plan of the menu does better, and this one is close to it
        assert plan["dual_bound"] <= plan["distortion"] and plan["gap"] < 0.05
    assert dists[0] > dists[1] > dists[2]


def test_devices_json(capsys):
    code, stdout, _ = run(capsys, "devices", "--json")
    assert code == 0
    rows = json.loads(stdout)["devices"]
    names = {r["device"] for r in rows}
    assert {"raspberry-pi-5-4gb", "raspberry-pi-5-8gb", "jetson-orin-nano-8gb", "android-8gb", "iphone-6gb"} <= names
    assert all(r["weights"] > 0 for r in rows)


def test_fit_with_device_clamps_to_model(capsys, tmp_path, tiny_llama_dir):
    code, stdout, err = run(capsys, "plan", str(tiny_llama_dir), "--device", "raspberry-pi-5-4gb", "--format", "packed",
                            "-o", str(tmp_path / "d"), "--json", *FAST)
    assert code == 0, err
    assert "exceeds the largest plan" in err
    assert json.loads(stdout)["device_budgets"]["packed"]["device"] == "raspberry-pi-5-4gb"


def test_opt_fit(capsys, tmp_path, tiny_opt_dir):
    code, stdout, err = run(capsys, "plan", str(tiny_opt_dir), "--budget", "90kB", "--format", "packed",
                            "-o", str(tmp_path / "opt"), "--json", *FAST)
    assert code == 0, err


def test_device_budget_charges_each_runtimes_kv_cache(tmp_path, tiny_llama_dir):
    """llama.cpp allocates its KV cache in f16, this project's ONNX graph in float32:
    one device, two budgets, differing by exactly the float32 cache's extra bytes."""
    from cvxq_export.api import fit
    from cvxq_export.calibrate import CalibrationSettings
    from cvxq_export.devices import kv_cache_bytes, load_device, model_shape_from_config
    from cvxq_export.formats.base import FitOptions
    from cvxq_export.model import load_model

    result = fit(str(tiny_llama_dir), device="raspberry-pi-5-4gb", formats=["packed", "onnx"], output=tmp_path / "o",
                 context=100_000, options=FitOptions(progress=False), write=False, log=lambda *_: None,
                 settings=CalibrationSettings(n_windows=2, seq_len=64, n_pcs=8))
    b = result.device_budgets
    assert b["onnx"]["kv_dtype"] == "f32" and b["packed"]["kv_dtype"] == load_device("raspberry-pi-5-4gb").kv_cache_dtype
    shape = model_shape_from_config(load_model(str(tiny_llama_dir)).config)
    extra = kv_cache_bytes(shape, 100_000, "f32") - kv_cache_bytes(shape, 100_000, b["packed"]["kv_dtype"])
    assert b["packed"]["weights"] - b["onnx"]["weights"] == extra > 0
