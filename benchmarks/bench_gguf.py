"""CVXQ-allocated GGUF files in llama.cpp at several file budgets (SmolLM2-135M).

Protocol (benchmarks/protocol.py): calibrate on valid.txt (64 x 512, cached),
perplexity in llama.cpp (llama-cpp-python) on the first 20 windows of 512 tokens
of test.txt, each window from an empty cache; the budget is the .gguf file on disk.

    python benchmarks/bench_gguf.py [--budgets 65,70,74.0,...] [--decode-speed R] [--json FILE]

The result goes to docs/results/gguf/ unless --json says otherwise, named by the
variant: perplexity_vs_budget.json (fit's defaults), perplexity_no_speed_limit.json
(--decode-speed 0), perplexity_decode_speed_<R>.json, perplexity_no_error_feedback.json,
bias_correction.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import protocol  # benchmarks/protocol.py
from cvxq_export.errors import InfeasibleBudget
from cvxq_export.formats.gguf.llama_eval import llama_generate
from cvxq_export.formats.gguf.target import build_menu, input_means, plan_gguf, read_back_check, tensor_inputs, write_gguf
from cvxq_export.formats.registry import get_format

DEFAULT_DECODE_SPEED = get_format("gguf").default_decode_speed


def default_json(args) -> Path:
    """docs/results/gguf/<variant>.json for the options given."""
    if args.no_error_feedback:
        name = "perplexity_no_error_feedback.json"
    elif args.bias_correction:
        name = "bias_correction.json"
    elif not args.decode_speed:
        name = "perplexity_no_speed_limit.json"
    elif args.decode_speed != DEFAULT_DECODE_SPEED:
        name = f"perplexity_decode_speed_{args.decode_speed:g}.json"
    else:
        name = "perplexity_vs_budget.json"
    return protocol.result_path("gguf", name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="65,70,74.0,77.6,82.9,88.2,93.5,98.4,105.5,120,140",
                    help="file budgets in MB (10^6 bytes)")
    ap.add_argument("--eval-windows", type=int, default=protocol.EVAL_WINDOWS)
    ap.add_argument("--out", default="/tmp/cvxq-bench-gguf", help="where the GGUF files go (one folder per budget)")
    ap.add_argument("--json", default=None, help="result file (default: docs/results/gguf/, named by the variant)")
    ap.add_argument("--merge", action="store_true", help="keep rows of other budgets already in --json")
    ap.add_argument("--no-error-feedback", action="store_true", help="round each block on its own (the ablation)")
    ap.add_argument("--decode-speed", type=float, default=DEFAULT_DECODE_SPEED,
                    help="what `fit --decode-speed` does: modeled llama.cpp time within 1/R of the fastest type mix "
                         f"of the same size (default {DEFAULT_DECODE_SPEED:g}; 0: no limit, the most accurate plans)")
    ap.add_argument("--bias-correction", action="store_true", help="what `fit --bias-correction` does")
    args = ap.parse_args()
    args.json = args.json or str(default_json(args))
    protocol.require_data()
    loaded = protocol.load_default_model()
    t0 = time.perf_counter()
    outcome = protocol.calibrate(loaded)
    t_h = time.perf_counter()
    # what `fit --format gguf` does by default: input second moments for error feedback
    hessians = None if args.no_error_feedback else protocol.input_moments(loaded)
    hessian_s = time.perf_counter() - t_h
    windows = protocol.evaluation_ids(loaded.tokenizer, args.eval_windows)
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
        res = write_gguf(loaded, plan, planned_menu.inputs, out / "model.gguf", hessians=hessians,
                         input_means=input_means(loaded, outcome.sens) if args.bias_correction else None)
        readback = read_back_check(res, planned_menu.inputs)
        write_s = time.perf_counter() - t
        ppl = protocol.llama_cpp_perplexity(res.path, windows)
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
        protocol.write_results(args.json, {"menu_s": menu_s, "hessian_s": hessian_s, "rows": rows,
                                           "total_s": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
