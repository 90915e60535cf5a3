"""GGUF export on a tiny random Llama: size, read-back, llama.cpp vs PyTorch."""
import json
import os

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: pip install 'cvxq-export[llama]'")

from cvxq_export.cli import main  # noqa: E402

FAST = ["--windows", "2", "--seq-len", "64", "--n-pcs", "8", "-q"]


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory):
    from cvxq_export.textdata import read_text

    p = tmp_path_factory.mktemp("txt") / "eval.txt"
    p.write_text(read_text(None)[0])
    return str(p)


@pytest.mark.parametrize("budget_mb", [4.0, 5.5, 8.0])
def test_gguf_export_budgets(capsys, tmp_path, tiny_gguf, eval_text, budget_mb):
    out = tmp_path / "g"
    code = main(["fit", str(tiny_gguf), "--format", "gguf", "--budget", f"{budget_mb}MB", "-o", str(out),
                 "--eval-text", eval_text, "--eval-windows", "2", "--json", *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    info = json.loads(captured.out)["gguf"]
    size = os.path.getsize(out / "model.gguf")
    assert size == info["file_bytes"] <= budget_mb * 1e6
    assert info["readback_tensors_bit_exact"] == 15  # 7 linears x 2 layers + the tied embedding
    assert info["eval"]["within_0.5_percent"], info["eval"]
    assert not list(out.glob(".*.tmp"))


def test_llama_cpp_logits_match_pytorch(tmp_path, tiny_gguf, eval_text):
    import torch
    from llama_cpp import Llama

    from cvxq_export.calibrate import CalibrationSettings
    from cvxq_export.formats.gguf_target import export_gguf
    from cvxq_export.model import load_model
    from cvxq_export.pipeline import calibrate_cached

    loaded = load_model(str(tiny_gguf))
    sens = calibrate_cached(loaded, None, CalibrationSettings(n_windows=2, seq_len=64, n_pcs=8)).sens
    info = export_gguf(loaded, sens, 5_000_000, tmp_path, progress=False)
    ids = loaded.tokenizer("The river delta forms where a slow river meets a calm sea.", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = loaded.model(input_ids=torch.tensor([ids])).logits[0].numpy()
    llm = Llama(model_path=info["path"], n_ctx=64, logits_all=True, verbose=False)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    assert np.abs(got - ref).max() < 2e-2 * np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).mean() > 0.9


def test_gguf_infeasible_budget(capsys, tmp_path, tiny_gguf):
    code = main(["fit", str(tiny_gguf), "--format", "gguf", "--budget", "100kB", "-o", str(tmp_path / "x"), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "smallest achievable size" in err and "choose a budget between" in err


def test_eval_any_gguf(capsys, tiny_gguf, eval_text):
    """`cvxq-export eval FILE.gguf` compares llama.cpp with PyTorch and generates text."""
    code = main(["eval", str(tiny_gguf), "--eval-text", eval_text, "--eval-windows", "2", "--seq-len", "64", "--json", "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["llama_cpp"]["within_0.5_percent"], result
    assert result["llama_cpp"]["decode_tokens_per_s"] > 0
