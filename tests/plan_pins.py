"""Pinned SmolLM2 plans: every format's allocation at a few budgets, as digests.

A refactor must not change what the allocator chooses. ``python tests/plan_pins.py``
writes ``tests/data/smollm2_plan_pins.json``; ``tests/test_plan_pins.py`` recomputes
the same plans and compares them tensor by tensor. Calibration is short (8 windows x
256 tokens of the built-in sample, 32 output directions) so the check runs in CI.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

PINS = Path(__file__).resolve().parent / "data" / "smollm2_plan_pins.json"
SETTINGS = {"n_windows": 8, "seq_len": 256, "seed": 0, "n_pcs": 32, "pca_windows": 4}
# (format, budget in bytes, --decode-speed or None for the format's default)
CASES = [("gguf", 74_000_000, None), ("gguf", 93_500_000, None), ("onnx", 90_000_000, None),
         ("packed", 74_000_000, None), ("packed", 90_000_000, None)]


def plan_digest(plan) -> dict:
    """What the allocator chose, per tensor: option name, bytes and distortion (6 significant
    digits). A per-unit map is summarised by its bytes and distortion rather than hashed:
    units whose options tie to the last bits (equal cost, distortion equal to float
    rounding) may swap between BLAS builds or thread counts, which is no change of plan."""
    tensors = {t.name: f"{t.option}:{t.bytes}:{t.distortion:.6g}" for t in plan.tensors}
    return {"total_bytes": int(plan.total_bytes), "tensors": tensors}


def compute(cases=CASES, progress: bool = False) -> dict[str, dict]:
    from cvxq_export.api import plan_formats  # noqa: PLC0415 - heavy

    return plan_formats(None, cases, calibration=dict(SETTINGS), progress=progress, digest=plan_digest)


def main() -> int:
    pins = compute(progress=True)
    PINS.write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n")
    print(f"wrote {PINS}: {', '.join(pins)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
