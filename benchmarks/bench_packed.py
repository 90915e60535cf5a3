"""The packed format on SmolLM2-135M at the GGUF benchmark's file budgets.

Same protocol as the GGUF benchmark: calibrate on valid.txt (64 x 512, cached),
perplexity on the first 20 windows of 512 tokens of test.txt (PyTorch, the
weights as read back from the packed file), the budget is the file on disk.

    python benchmarks/bench_packed.py [--budgets 74.0,82.9,93.5,105.5] [--json docs/bench_packed.json]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from cvxq_export.calibrate import CalibrationSettings
from cvxq_export.evaluate import evaluate
from cvxq_export.formats.packed import export_packed, load_packed_into_model, plan_packed
from cvxq_export.model import load_model
from cvxq_export.native import build_menu
from cvxq_export.pipeline import calibrate_cached, input_hessians, select_weights
from cvxq_export.textdata import evaluation_windows

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext-2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="74.0,82.9,93.5,105.5")
    ap.add_argument("--eval-windows", type=int, default=20)
    ap.add_argument("--out", default="/tmp/cvxq-bench-packed")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-error-feedback", action="store_true", help="round each unit on its own (the ablation)")
    args = ap.parse_args()
    loaded = load_model(None)
    settings = CalibrationSettings(n_windows=64, seq_len=512)
    sens = calibrate_cached(loaded, str(DATA / "valid.txt"), settings).sens
    # what `fit --format packed` does by default: input second moments for error feedback
    hessians = None if args.no_error_feedback else input_hessians(loaded, str(DATA / "valid.txt"), settings)
    windows = evaluation_windows(loaded.tokenizer, str(DATA / "test.txt"), args.eval_windows, 512).ids
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
        ppl = evaluate(loaded.model, windows, desc=f"eval packed {mb} MB")
        summary = plan.summary()
        rows.append({"budget_mb": mb, "file_bytes": os.path.getsize(info["path"]), "perplexity": ppl.perplexity,
                     "bits_per_weight": summary["bits_per_weight"], "error_feedback": hessians is not None,
                     "export_s": export_s})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| budget | file bytes | perplexity (PyTorch, weights from the file) | bits/weight |\n|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['budget_mb']} MB | {r['file_bytes']:,} | {r['perplexity']:.2f} | {r['bits_per_weight']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"menu_s": menu_s, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
