"""The packed format on SmolLM2-135M at the GGUF benchmark's file budgets.

Protocol (benchmarks/protocol.py): calibrate on valid.txt (64 x 512, cached),
perplexity on the first 20 windows of 512 tokens of test.txt (PyTorch, the
weights as read back from the packed file), the budget is the file on disk.

    python benchmarks/bench_packed.py [--budgets 74.0,82.9,93.5,105.5] [--json FILE]

The result goes to docs/results/packed/perplexity_vs_budget.json unless --json says
otherwise (perplexity_no_error_feedback.json with --no-error-feedback).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import protocol  # benchmarks/protocol.py
from cvxq_export.formats.packed.container import export_packed, load_packed_into_model, plan_packed
from cvxq_export.native import build_menu
from cvxq_export.pipeline import select_weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="74.0,82.9,93.5,105.5")
    ap.add_argument("--eval-windows", type=int, default=protocol.EVAL_WINDOWS)
    ap.add_argument("--out", default="/tmp/cvxq-bench-packed", help="where the packed files go (one folder per budget)")
    ap.add_argument("--json", default=None,
                    help="result file (default docs/results/packed/perplexity_vs_budget.json; with --no-error-feedback "
                         "docs/results/packed/perplexity_no_error_feedback.json)")
    ap.add_argument("--no-error-feedback", action="store_true", help="round each unit on its own (the ablation)")
    args = ap.parse_args()
    args.json = args.json or str(protocol.result_path(
        "packed", "perplexity_no_error_feedback.json" if args.no_error_feedback else "perplexity_vs_budget.json"))
    protocol.require_data()
    loaded = protocol.load_default_model()
    sens = protocol.calibrate(loaded).sens
    # what `fit --format packed` does by default: input second moments for error feedback
    hessians = None if args.no_error_feedback else protocol.input_moments(loaded)
    windows = protocol.evaluation_ids(loaded.tokenizer, args.eval_windows)
    t = time.perf_counter()
    menu = build_menu(loaded, sens, select_weights(loaded, "all"))
    menu_s = time.perf_counter() - t
    # loading a packed file overwrites the weights in place; every budget starts from the originals
    original = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    rows = []
    for mb in [float(b) for b in args.budgets.split(",")]:
        loaded.model.load_state_dict(original)
        out = Path(args.out) / f"b{mb}"
        out.mkdir(parents=True, exist_ok=True)
        plan = plan_packed(loaded, sens, int(mb * 1e6), menu=menu)
        t = time.perf_counter()
        info = export_packed(loaded, sens, plan, out, save_tokenizer=False, hessians=hessians)
        export_s = time.perf_counter() - t
        load_packed_into_model(info["path"], loaded)
        ppl = protocol.torch_perplexity(loaded.model, windows, desc=f"eval packed {mb} MB")
        summary = plan.summary()
        rows.append({"budget_mb": mb, "file_bytes": os.path.getsize(info["path"]), "perplexity": ppl.perplexity,
                     "bits_per_weight": summary["bits_per_weight"], "error_feedback": hessians is not None,
                     "export_s": export_s})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| budget | file bytes | perplexity (PyTorch, weights from the file) | bits/weight |\n|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['budget_mb']} MB | {r['file_bytes']:,} | {r['perplexity']:.2f} | {r['bits_per_weight']:.3f} |")
    if args.json:
        protocol.write_results(args.json, {"menu_s": menu_s, "rows": rows})


if __name__ == "__main__":
    main()
