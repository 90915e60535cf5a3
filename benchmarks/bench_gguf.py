"""CVXQ-allocated GGUF files in llama.cpp at several file budgets (SmolLM2-135M).

Protocol (issue 3): calibrate on valid.txt (64 x 512, cached), perplexity in
llama.cpp (llama-cpp-python) on the first 20 windows of 512 tokens of
test.txt, each window from an empty cache; the budget is the .gguf file on disk.

    python benchmarks/bench_gguf.py [--budgets 65,70,74.0,...] [--json docs/bench_gguf.json]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from cvxq_export.calibrate import CalibrationSettings
from cvxq_export.cli import DEFAULT_DECODE_SPEED
from cvxq_export.errors import InfeasibleBudget
from cvxq_export.formats.gguf_target import build_menu, input_means, plan_gguf, read_back_check, tensor_inputs, write_gguf
from cvxq_export.formats.llama_eval import llama_generate, llama_perplexity
from cvxq_export.model import load_model
from cvxq_export.pipeline import calibrate_cached, input_hessians
from cvxq_export.textdata import evaluation_windows

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext-2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="65,70,74.0,77.6,82.9,88.2,93.5,98.4,105.5,120,140",
                    help="file budgets in MB (10^6 bytes)")
    ap.add_argument("--eval-windows", type=int, default=20)
    ap.add_argument("--out", default="/tmp/cvxq-bench-gguf")
    ap.add_argument("--json", default=None)
    ap.add_argument("--merge", action="store_true", help="keep rows of other budgets already in --json")
    ap.add_argument("--no-error-feedback", action="store_true", help="round each block on its own (the ablation)")
    ap.add_argument("--decode-speed", type=float, default=DEFAULT_DECODE_SPEED["gguf"],
                    help="what `fit --decode-speed` does: modeled llama.cpp time within 1/R of the fastest type mix "
                         "of the same size (0: no limit, the plans before the speed model)")
    ap.add_argument("--bias-correction", action="store_true", help="what `fit --bias-correction` does")
    args = ap.parse_args()
    loaded = load_model(None)
    t0 = time.perf_counter()
    settings = CalibrationSettings(n_windows=64, seq_len=512)
    outcome = calibrate_cached(loaded, str(DATA / "valid.txt"), settings)
    t_h = time.perf_counter()
    # what `fit --format gguf` does by default: input second moments for error feedback
    hessians = None if args.no_error_feedback else input_hessians(loaded, str(DATA / "valid.txt"), settings)
    hessian_s = time.perf_counter() - t_h
    windows = evaluation_windows(loaded.tokenizer, str(DATA / "test.txt"), args.eval_windows, 512).ids
    t_menu = time.perf_counter()
    gmenu = build_menu(tensor_inputs(loaded, outcome.sens, loaded.weights))
    menu_s = time.perf_counter() - t_menu
    rows = []
    for mb in [float(b) for b in args.budgets.split(",")]:
        budget = int(mb * 1e6)
        out = Path(args.out) / f"b{mb}"
        out.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        try:
            plan, planned_menu = plan_gguf(loaded, outcome.sens, budget, gmenu=gmenu, speed=args.decode_speed or None,
                                           bias_correction=args.bias_correction)
        except InfeasibleBudget as exc:
            print(f"{mb} MB: {exc}", flush=True)
            rows.append({"budget_mb": mb, "infeasible": str(exc)})
            continue
        res = write_gguf(loaded, plan, planned_menu, out / "model.gguf", hessians=hessians,
                         input_means=input_means(loaded, outcome.sens) if args.bias_correction else None)
        readback = read_back_check(res, planned_menu)
        write_s = time.perf_counter() - t
        ppl = llama_perplexity(str(res.path), windows)
        _, tps = llama_generate(str(res.path), "The history of the city", 64)
        types: dict[str, int] = {}
        for tp in plan.tensors:
            types[tp.option] = types.get(tp.option, 0) + 1
        emb = plan.tensors[0].option
        rows.append({"budget_mb": mb, "file_bytes": os.path.getsize(res.path), "perplexity": ppl.perplexity,
                     "types": types, "embedding": emb, "plan_write_s": write_s, "decode_tok_s": tps,
                     "uses_q4_1_source_grid": "Q4_1" in types, "readback_bit_exact": readback,
                     "error_feedback": hessians is not None, "decode_speed": args.decode_speed,
                     "bias_tensors": len(res.biases),
                     "plan_notes": plan.notes})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| budget | file bytes | llama.cpp ppl | types (tensor count) | embedding | decode tok/s |\n|---:|---:|---:|---|---|---:|")
    for r in rows:
        if "infeasible" in r:
            print(f"| {r['budget_mb']} MB | infeasible | | {r['infeasible'].splitlines()[0]} | | |")
            continue
        print(f"| {r['budget_mb']} MB | {r['file_bytes']:,} | {r['perplexity']:.2f} | {r['types']} | {r['embedding']} | {r['decode_tok_s']:.0f} |")
    print(f"\nmenu {menu_s:.0f} s; input second moments {hessian_s:.0f} s; "
          f"calibration {'cached' if outcome.cached else f'{outcome.sens.seconds:.0f} s'}")
    if args.json:
        if args.merge and Path(args.json).is_file():
            done = {r["budget_mb"] for r in rows}
            rows += [r for r in json.loads(Path(args.json).read_text())["rows"] if r["budget_mb"] not in done]
            rows.sort(key=lambda r: r["budget_mb"])
        Path(args.json).write_text(json.dumps({"menu_s": menu_s, "hessian_s": hessian_s, "rows": rows,
                                               "total_s": time.perf_counter() - t0}, indent=1))


if __name__ == "__main__":
    main()
