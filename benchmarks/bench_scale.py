"""Calibration at scale: time per token and peak memory against model size.

Each size runs in its own child process, so its peak resident set size
(``ru_maxrss`` of that child, from ``os.wait4``) covers everything the
calibration of that model needed: the runtime, the weights, the statistics,
one window's activations and gradients.

Sizes: ``135m`` is the real default model (SmolLM2-135M-Instruct, loaded from
its GGUF file by ``load_model``); ``0.5b``, ``1.5b`` and ``3b`` are Llama
configurations with random weights (built in the child directly in the chosen
dtype: time and memory do not depend on the weights' values) and SmolLM2's
tokenizer and vocabulary; ``8b`` has Llama-3-8B's shape, its 128256-token
embedding and untied head included (8.03B parameters). Calibration uses the built-in sample text with few,
short windows so that the whole run stays within minutes; the time per token
is ``calibrate()``'s whole time (output directions, forward and backward
passes, statistics) over the tokens it calibrated on.

The goal checked: peak RSS <= 1.3 x the model's bfloat16 bytes + 2 GB, and a
time per token linear in the parameter count (least-squares fit, residuals).

    python benchmarks/bench_scale.py [--sizes 135m,0.5b,1.5b,3b,8b] [--dtype bfloat16]
        [--windows 2] [--seq-len 128] [--json docs/results/engine/scale.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import protocol  # benchmarks/protocol.py

DEFAULT_JSON = protocol.result_path("engine", "scale.json")
GB = 1e9

# Llama-architecture shapes (tied embeddings, grouped-query attention, SmolLM2's 49152-token vocabulary)
SYNTHETIC = {
    "0.5b": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=30, num_attention_heads=16, num_key_value_heads=4),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=30, num_attention_heads=12, num_key_value_heads=2),
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=38, num_attention_heads=16, num_key_value_heads=2),
    # Llama-3-8B's shape: its 128256-row embedding and untied head (SmolLM2's tokenizer uses the first 49152 rows)
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, tie_word_embeddings=False),
}
SIZES = ("135m", *SYNTHETIC)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build(size: str, dtype: str):
    """The model of ``size`` as a LoadedModel, in ``dtype``."""
    import torch

    from cvxq_export.model import LoadedModel, ModelSource, find_weights, load_model

    if size == "135m":
        return load_model(None, dtype=dtype)
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from cvxq_export.model import default_model_path

    gguf = default_model_path()  # only its tokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    shape = {"vocab_size": len(tokenizer), "tie_word_embeddings": True, **SYNTHETIC[size]}
    config = LlamaConfig(max_position_embeddings=2048, rope_theta=10000.0, **shape)
    torch.manual_seed(0)
    # Built directly in the target dtype (no float32 copy first); transformers' own random init.
    model = LlamaForCausalLM._from_config(config, dtype=getattr(torch, dtype)).eval()
    source = ModelSource("hf-dir", "<random>", f"random Llama {size}")
    return LoadedModel(model, tokenizer, source, "llama", find_weights(model))


def worker(args) -> None:
    """Child process: build one model, calibrate it, print one JSON line."""
    import torch

    from cvxq_export import memory
    from cvxq_export.calibrate import CalibrationSettings, calibrate, use_checkpointing
    from cvxq_export.textdata import calibration_windows

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    log(f"[{args.worker}] building the model in {args.dtype}")
    loaded = build(args.worker, args.dtype)
    n_params = sum(p.numel() for p in {id(p): p for p in loaded.model.parameters()}.values())
    build_s = time.perf_counter() - t0
    rss_after_build = memory.peak_rss_bytes()
    log(f"[{args.worker}] {n_params / 1e9:.3f}B parameters, built in {build_s:.0f} s, peak RSS so far "
        f"{rss_after_build / GB:.2f} GB; calibrating {args.windows} x {args.seq_len} tokens")
    settings = CalibrationSettings(n_windows=args.windows, seq_len=args.seq_len, n_pcs=args.n_pcs,
                                   pca_windows=min(args.pca_windows, args.windows))
    windows = calibration_windows(loaded.tokenizer, None, settings.n_windows, settings.seq_len, settings.seed).ids
    checkpointing = use_checkpointing(loaded, settings.seq_len)
    sens = calibrate(loaded, windows, settings, progress=False)
    tokens = int(windows.size)
    auto = memory.choose_dtype("auto", n_params, loaded.config, offload=True)
    result = {
        "size": args.worker, "params": n_params, "dtype": args.dtype, "auto_dtype_here": auto,
        "bf16_bytes": 2 * n_params, "model_bytes": memory.model_bytes(loaded.model),
        "tokens": tokens, "windows": args.windows, "seq_len": args.seq_len, "n_pcs": args.n_pcs,
        "calibrate_s": round(sens.seconds, 2), "s_per_token": sens.seconds / tokens,
        "build_s": round(build_s, 1), "checkpointing": checkpointing,
        "peak_rss_self": memory.peak_rss_bytes(), "peak_rss_after_build": rss_after_build,
    }
    log(f"[{args.worker}] calibrated in {sens.seconds:.1f} s: {1000 * sens.seconds / tokens:.2f} ms/token")
    print("RESULT " + json.dumps(result), flush=True)


def run_size(size: str, args) -> dict:
    """Run one size in a child process; its peak RSS comes from the kernel's accounting of that child."""
    command = [sys.executable, __file__, "--worker", size, "--dtype", args.dtype, "--windows", str(args.windows),
               "--seq-len", str(args.seq_len), "--n-pcs", str(args.n_pcs), "--pca-windows", str(args.pca_windows),
               "--threads", str(args.threads)]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    child = subprocess.Popen(command, stdout=subprocess.PIPE, env=env, text=True)
    out = child.stdout.read()
    _pid, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"size {size}: the child failed with exit code {child.returncode}")
    line = next(l for l in out.splitlines() if l.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    result["peak_rss"] = int(usage.ru_maxrss) * 1024  # Linux: KiB
    result["bound"] = int(1.3 * result["bf16_bytes"] + 2 * GB)
    result["met"] = result["peak_rss"] <= result["bound"]
    return result


def linear_fit(rows: list[dict]) -> dict:
    """Least squares s_per_token = a + b * params, with each size's residual."""
    import numpy as np

    x = np.array([r["params"] for r in rows], dtype=float)
    y = np.array([r["s_per_token"] for r in rows], dtype=float)
    if len(rows) < 2:
        return {}
    b, a = np.polyfit(x, y, 1)
    pred = a + b * x
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum()) or 1.0
    return {"intercept_s": float(a), "s_per_token_per_billion_params": float(b * 1e9), "r2": 1 - ss_res / ss_tot,
            "residuals": {r["size"]: {"s": float(y[i] - pred[i]), "relative": float((y[i] - pred[i]) / y[i])}
                          for i, r in enumerate(rows)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    parser.add_argument("--windows", type=int, default=2, help="calibration windows per size")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per window")
    parser.add_argument("--n-pcs", type=int, default=128, help="principal output directions")
    parser.add_argument("--pca-windows", type=int, default=1, help="windows for the output covariance")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; choose from {', '.join(SIZES)}")
    rows = []
    for size in sizes:
        start = time.perf_counter()
        row = run_size(size, args)
        rows.append(row)
        log(f"{size}: {row['params'] / 1e9:.3f}B {row['dtype']}: {1000 * row['s_per_token']:.2f} ms/token, "
            f"peak RSS {row['peak_rss'] / GB:.2f} GB (bound {row['bound'] / GB:.2f} GB, "
            f"{'met' if row['met'] else 'NOT met'}), {time.perf_counter() - start:.0f} s in all")
    fit = linear_fit(rows)
    if fit:
        log(f"fit: s/token = {fit['intercept_s']:.2e} + {fit['s_per_token_per_billion_params']:.3e} x params/1e9 "
            f"(R^2 {fit['r2']:.4f})")
    protocol.write_results(args.json, {"goal": "peak RSS <= 1.3 x bf16 bytes + 2 GB; s/token linear in params",
                                       "rows": rows, "fit": fit})


if __name__ == "__main__":
    main()
