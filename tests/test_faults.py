"""kill -9 in the middle of a fit: no file is ever half-written under its final name, and the
rerun writes the very same files and the same report (timings apart). A tiny model is fitted to every format in a child process
that is killed at seeded random moments; every model file it left must equal the one a
complete run writes, byte for byte, and so must everything the rerun writes."""
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="the GGUF writer checks its file in llama.cpp: pip install 'cvxq-export[llama]'")
pytest.importorskip("onnxruntime", reason="the ONNX writer checks its file in ONNX Runtime: pip install 'cvxq-export[onnx]'")

FORMAT_DIRS = ("gguf", "onnx", "packed")  # what the formats write
KILLS = 4


def _fit(model: Path, out: Path, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "CVXQ_CACHE_DIR": str(cache)}
    argv = [sys.executable, "-m", "cvxq_export.cli", "fit", str(model), "--budget", "125kB", "--format",
            "gguf,onnx,packed", "-o", str(out), "--windows", "3", "--seq-len", "32", "--n-pcs", "8", "-q",
            "--no-analysis"]
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _reproducible(f: Path) -> bytes:
    """What must not change between runs: a file's bytes; report.md's up to its Timings
    section (stage times differ from run to run and are kept apart in timings.json)."""
    data = f.read_bytes()
    return data.split(b"\n## Timings\n")[0] if f.name == "report.md" else data


def _files(out: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file the formats wrote, and of the report."""
    found = {}
    report = [f for f in out.glob("*") if f.suffix in (".json", ".md", ".png") and f.name != "timings.json"]
    for d in FORMAT_DIRS:
        report += sorted((out / d).rglob("*")) if (out / d).is_dir() else []
    for f in report:
        if f.is_file():
            found[str(f.relative_to(out))] = hashlib.sha256(_reproducible(f)).hexdigest()
    return found


def test_kill_at_random_moments_leaves_no_partial_file(tmp_path):
    from tiny_models import build_tiny

    model = build_tiny("llama", tmp_path / "model")  # a byte-level BPE tokenizer, as GGUF needs
    ref = _fit(model, tmp_path / "ref", tmp_path / "ref-cache")
    t0 = time.perf_counter()
    _, err = ref.communicate(timeout=600)
    duration = time.perf_counter() - t0
    assert ref.returncode == 0, err.decode()[-2000:]
    want = _files(tmp_path / "ref")
    assert {p.split("/")[0] for p in want if "/" in p} == set(FORMAT_DIRS) and "report.json" in want

    rng = np.random.default_rng(0)
    for i, moment in enumerate(sorted(rng.uniform(0.1, 0.95, KILLS) * duration)):
        out, cache = tmp_path / f"killed{i}", tmp_path / f"cache{i}"
        proc = _fit(model, out, cache)
        time.sleep(moment)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        left = _files(out)
        partial = {p for p, h in left.items() if want.get(p) != h and not Path(p).name.startswith(".")}
        assert not partial, f"killed at {moment:.1f} s: {sorted(partial)} differ from a complete run's"
        rerun = _fit(model, out, cache)  # same output folder and cache: what was left must not matter
        _, err = rerun.communicate(timeout=600)
        assert rerun.returncode == 0, f"rerun after a kill at {moment:.1f} s: {err.decode()[-2000:]}"
        got = {p: h for p, h in _files(out).items() if not Path(p).name.startswith(".")}
        assert got == want, f"rerun after a kill at {moment:.1f} s wrote different files"
