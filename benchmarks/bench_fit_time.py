"""How long ``fit`` takes on the default model, stage by stage, and how long a new budget takes
once the calibration and the menus are cached.

1. A full fit of every format from an empty cache (calibration, menus, plans, files written and
   read back; no evaluation, no analysis).
2. Per format, a second fit at another budget from the cache: the re-plan (menu from the cache,
   plan) and the write, with and without error feedback.

Targets on 2 cores: re-plan and write from a cached calibration <= 30 s per format; the full fit
<= 5 minutes. The stage times come from ``fit``'s own timings (``timings.json`` next to its report).

    python benchmarks/bench_fit_time.py                      # -> docs/results/engine/fit_time.json
    python benchmarks/bench_fit_time.py --formats gguf --budgets 82.9,74
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import protocol


def one_fit(fmt_list, budget_mb: float, out: Path, *, feedback: bool, cache: Path) -> dict:
    from cvxq_export import api
    from cvxq_export.formats.base import FitOptions

    os.environ["CVXQ_CACHE_DIR"] = str(cache)
    t0 = time.perf_counter()
    result = api.fit(None, budget=int(budget_mb * 1e6), formats=fmt_list, output=out, force=True,
                     calibration=str(protocol.CALIBRATION_TEXT), settings=protocol.calibration_settings(),
                     options=FitOptions(error_feedback=feedback, progress=False), analysis=False,
                     log=lambda m: None)
    wall = time.perf_counter() - t0
    return {"formats": fmt_list, "budget_mb": budget_mb, "error_feedback": feedback, "wall_s": wall,
            "timings": result.timings,
            "files": {n: {"bytes": f.file_bytes, "menu_cached": f.menu_cached} for n, f in result.formats.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="gguf,onnx,packed")
    ap.add_argument("--budgets", default="90,82.9", help="MB: the full fit's budget, then the re-plan's")
    ap.add_argument("--cache", default=None, help="cache folder (default: a fresh temporary one: a cold start)")
    ap.add_argument("--json", default=str(protocol.result_path("engine", "fit_time.json")))
    args = ap.parse_args()
    protocol.require_data()
    formats = [f for f in args.formats.split(",") if f]
    first, second = (float(b) for b in args.budgets.split(","))
    cache = Path(args.cache or tempfile.mkdtemp(prefix="cvxq-fit-time-cache-"))
    work = Path(tempfile.mkdtemp(prefix="cvxq-fit-time-"))
    rows = {"full_fit": one_fit(formats, first, work / "full", feedback=True, cache=cache)}
    print(f"full fit ({', '.join(formats)}, {first} MB, cold cache): {rows['full_fit']['wall_s']:.0f} s")
    for name in formats:
        for feedback in (True, False):
            key = f"replan_{name}_{'feedback' if feedback else 'no_feedback'}"
            rows[key] = one_fit([name], second, work / key, feedback=feedback, cache=cache)
            t = rows[key]["timings"]
            print(f"{name} at {second} MB from the cache, error feedback {'on' if feedback else 'off'}: "
                  f"{rows[key]['wall_s']:.0f} s (menu {t[name].get('menu_s', 0):.1f} s, plan {t[name].get('plan_s', 0):.1f} s, "
                  f"write {t[name].get('write_s', 0):.1f} s, input moments {t.get('input_moments_s', 0):.1f} s)")
    protocol.write_results(args.json, {"rows": rows})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
