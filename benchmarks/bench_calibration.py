"""Calibration time: our calibrate() next to llama.cpp's forward passes over the same tokens.

CVXQ calibration (``cvxq_export.calibrate.calibrate``) on the default model
(SmolLM2-135M-Instruct) with the default settings: 64 seeded windows x 512
tokens of the built-in sample text, 128 principal output directions, one
random-sign backward pass per window (plus the forward passes over the first
8 windows that find those directions).

The reference is what llama.cpp's ``imatrix`` does over the same tokens: one
forward pass per window from an empty cache, through ``llama-cpp-python``,
on the same GGUF file (``llm.reset(); llm.eval(window_ids)``). The imatrix
tool runs exactly these forward passes and, on top of them, accumulates each
matrix's squared input activations in a callback, so the time measured here
is a lower bound on the imatrix's time. Model loading is excluded on both
sides, and both use the same number of threads (``--threads``, default: all
cores).

llama.cpp runs in a child process, because on some machines its default
kernels crash the process: the CPU lists AMX, but the process may not use it
(llama.cpp's AMX matrix product faults on its first tile instruction). Then
the child is rerun with llama.cpp's extra weight buffer types (the AMX and
repacked layouts) off, and the JSON says so. SmolLM2's linear weights are
Q4_1, for which llama.cpp's CPU backend has AMX kernels but no repacked
ones, so there this costs only what AMX would have saved.

    python benchmarks/bench_calibration.py [--windows 64] [--seq-len 512] [--text FILE]
        [--json docs/results/engine/calibration_time.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import protocol  # benchmarks/protocol.py

DEFAULT_JSON = protocol.result_path("engine", "calibration_time.json")


def open_llama(model_path: str, seq_len: int, threads: int, extra_buffers: bool):
    import llama_cpp
    import llama_cpp.llama as llama_module

    if extra_buffers:
        return llama_cpp.Llama(model_path=model_path, n_ctx=seq_len, n_batch=seq_len, n_threads=threads,
                               logits_all=False, verbose=False)
    # llama_cpp.Llama has no argument for this model parameter: hand it
    # default parameters with the extra buffer types off while it loads.
    default_params = llama_module.llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(model_path=model_path, n_ctx=seq_len, n_batch=seq_len, n_threads=threads,
                               logits_all=False, verbose=False)
    finally:
        llama_module.llama_cpp.llama_model_default_params = default_params


def llama_worker(ids_file: str, model_path: str, threads: int, extra_buffers: bool) -> None:
    """Child process: one forward pass per window from an empty cache; prints the seconds as JSON."""
    windows = np.load(ids_file)  # [n, T] token ids
    llm = open_llama(model_path, int(windows.shape[1]), threads, extra_buffers)
    llm.reset()
    llm.eval([int(t) for t in windows[0][:16]])  # warm-up (first-call allocations), not timed
    start = time.perf_counter()
    for row in tqdm(windows, desc="llama.cpp forward", unit="window"):
        llm.reset()
        llm.eval([int(t) for t in row])
    print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


def time_llama_forward(windows: np.ndarray, model_path: str, threads: int) -> tuple[float, bool]:
    """Seconds for llama.cpp's forward passes over ``windows``, and whether its
    default (extra) buffer types were used.

    A child that crashes (AMX kernels the process may not use) is rerun
    without the extra buffer types."""
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = str(Path(tmp) / "windows.npy")
        np.save(ids_file, windows)
        for extra_buffers in (True, False):
            cmd = [sys.executable, __file__, "--llama-worker", ids_file, "--model-file", model_path, "--threads", str(threads)]
            child = subprocess.run(cmd + ([] if extra_buffers else ["--no-extra-buffers"]), stdout=subprocess.PIPE, text=True)
            if child.returncode == 0:
                return float(json.loads(child.stdout.strip().splitlines()[-1])["seconds"]), extra_buffers
            print(f"llama.cpp exited with status {child.returncode} with its default buffer types "
                  "(AMX kernels this process may not use); rerunning without them", flush=True)
    raise SystemExit("llama.cpp failed with and without its extra buffer types")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=protocol.CALIBRATION_WINDOWS, help="calibration windows (default 64)")
    ap.add_argument("--seq-len", type=int, default=protocol.SEQ_LEN, help="tokens per window (default 512)")
    ap.add_argument("--text", default=None, help="calibration text file (default: the built-in sample)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads for both PyTorch and llama.cpp (default: all cores)")
    ap.add_argument("--json", default=str(DEFAULT_JSON), help=f"result file (default {protocol.shown(DEFAULT_JSON)})")
    # the llama.cpp child process's own options
    ap.add_argument("--llama-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-extra-buffers", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.llama_worker:
        llama_worker(args.llama_worker, args.model_file, args.threads, not args.no_extra_buffers)
        return

    import torch

    from cvxq_export.calibrate import CalibrationSettings, calibrate
    from cvxq_export.model import default_model_path
    from cvxq_export.textdata import calibration_windows

    torch.set_num_threads(args.threads)
    model_path = str(default_model_path())
    loaded = protocol.load_default_model()
    settings = CalibrationSettings(n_windows=args.windows, seq_len=args.seq_len, pca_windows=min(8, args.windows))
    windows = calibration_windows(loaded.tokenizer, args.text, settings.n_windows, settings.seq_len, settings.seed)
    print(f"{len(windows)} windows x {windows.seq_len} tokens of {windows.source}; {args.threads} threads; "
          f"load average {protocol.load_average()}", flush=True)

    load_before = protocol.load_average()
    llama_s, extra_buffers = time_llama_forward(windows.ids, model_path, args.threads)

    sens = calibrate(loaded, windows.ids, settings, progress=True)
    ours_s = sens.seconds
    load_after = protocol.load_average()

    ratio = ours_s / llama_s
    n = len(windows)
    rows = [("llama.cpp forward passes (imatrix lower bound)", llama_s), ("cvxq calibrate()", ours_s)]
    print()
    print(f"{'':48s} {'seconds':>9s} {'s/window':>9s}")
    for label, seconds in rows:
        print(f"{label:48s} {seconds:9.1f} {seconds / n:9.2f}")
    print(f"{'ratio calibrate / llama.cpp forward':48s} {ratio:9.2f}")

    result = {
        "model": loaded.source.display,
        "model_file": Path(model_path).name,
        "windows": n,
        "seq_len": windows.seq_len,
        "text": windows.source,
        "settings": {"n_pcs": settings.n_pcs, "pca_windows": settings.pca_windows, "probes": settings.probes,
                     "row_group": settings.row_group, "seed": settings.seed},
        "llama_cpp_extra_buffer_types": extra_buffers,
        "llama_cpp_forward_s": round(llama_s, 2),
        "calibrate_s": round(ours_s, 2),
        "ratio": round(ratio, 3),
    }
    protocol.write_results(args.json, result, machine_extra={
        "threads": args.threads, "torch": torch.__version__, "llama_cpp_python": __import__("llama_cpp").__version__,
        "load_average_before": load_before, "load_average_after": load_after})


if __name__ == "__main__":
    main()
