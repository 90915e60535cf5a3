"""Fit the default model (SmolLM2-135M-Instruct) into a byte budget from Python and
write a GGUF file llama.cpp runs; then run it.

    python examples/fit_python_api.py [--budget 80MB] [--format gguf] [-o out/]

The same verb the command line calls (`cvxq-export fit`): one calibration (cached),
one menu per format (cached), a plan under the budget, the file written, read back
and checked in its runtime, and report.md next to it.
"""
import argparse

from cvxq_export import api
from cvxq_export.calibrate import CalibrationSettings
from cvxq_export.formats.base import FitOptions

ap = argparse.ArgumentParser()
ap.add_argument("--budget", default="80MB")
ap.add_argument("--format", default="gguf", help="gguf, onnx or packed (comma-separated for several)")
ap.add_argument("-o", "--output", default="out-example")
ap.add_argument("--windows", type=int, default=16, help="calibration windows (the CLI's default is 64)")
args = ap.parse_args()

result = api.fit(None, budget=args.budget, formats=args.format.split(","), output=args.output,
                 settings=CalibrationSettings(n_windows=args.windows, seq_len=512),
                 options=FitOptions(progress=True), force=True)
for name, made in result.formats.items():
    gap = made.plan["gap"]
    print(f"{name}: {made.file} {made.file_bytes:,} bytes (budget {made.plan['budget_bytes']:,}), "
          f"{made.plan['bits_per_weight']:.2f} bits/weight, within {100 * gap:.2f} % of the best plan of its menu")
print(f"report: {result.report}")

if "gguf" in result.formats:  # run the file in llama.cpp
    from cvxq_export.formats.gguf.llama_eval import llama_generate

    text, tokens_per_s = llama_generate(result.formats["gguf"].file, "The capital of France is", 24)
    print(f"llama.cpp: The capital of France is{text} ({tokens_per_s:.0f} tokens/s)")
