"""The short fuzz campaign (fuzz/fuzz.py): mutated packed, GGUF and ONNX files and hostile
command lines give no traceback, crash, hang, allocation above the declared bound or silently
accepted corruption. The long campaign runs on demand (docs/benchmarks.md, Robustness)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="the GGUF cases load files in llama.cpp: pip install 'cvxq-export[llama]'")
pytest.importorskip("onnxruntime", reason="the ONNX cases run ONNX Runtime: pip install 'cvxq-export[onnx]'")

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler for the C decoder")
def test_short_fuzz_campaign_finds_nothing(tmp_path):
    out = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, str(ROOT / "fuzz" / "fuzz.py"), "--campaign", "short", "-q", "--out", str(out)],
                          capture_output=True, text=True, timeout=1200)
    summary = json.loads(out.read_text())
    assert summary["failure_count"] == 0, proc.stdout[-4000:]
    assert proc.returncode == 0, proc.stderr[-2000:]
    outcomes = summary["outcomes"]
    for key in ("packed/python", "packed/c", "gguf/cli", "onnx/cli", "args/cli"):
        target = key.split("/")[0]
        assert sum(outcomes[key].values()) == summary["cases"][target], key
        assert outcomes[key].get("refused", 0) > 0, f"{key}: nothing was refused, so nothing was tested"
    # edited but well-formed packed files (checksums recomputed) do reach the decoder
    assert outcomes["packed/python"].get("accepted-changed", 0) > 0
    assert outcomes["packed/c"].get("accepted-same", 0) > 0
