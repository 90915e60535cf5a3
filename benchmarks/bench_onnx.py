"""CVXQ-allocated ONNX (QDQ -> MatMulNBits) vs ONNX Runtime's own RTN quantizer (SmolLM2-135M).

Protocol (benchmarks/protocol.py): calibrate on valid.txt (64 x 512, cached);
perplexity in ONNX Runtime (CPU provider) on the first 20 windows of 512 tokens of
test.txt, each window from an empty cache; prefill and decode tokens/s with 2 threads.
The budget is model.onnx on disk (weights inside, no external data).

Baseline: the same decoder graph exported with fp32 weights (head untied),
then ``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer``
(RTN, asymmetric, MatMul along K and the embedding through
GatherBlockQuantized, accuracy level 4).

    python benchmarks/bench_onnx.py [--budgets 90,108.8] [--rtn-blocks 32,128] [--merge] [--json FILE]

The result goes to docs/results/onnx/perplexity_vs_budget.json unless --json says
otherwise (perplexity_no_error_feedback.json with --no-error-feedback); --merge keeps
the rows of other methods already there.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

import protocol  # benchmarks/protocol.py
from cvxq_export.formats.onnx.qdq import build_menu
from cvxq_export.formats.onnx.target import OrtDecoder, export_onnx, write_float_onnx
from cvxq_export.formats.registry import get_format

PROMPT = "The history of the city"


def speed(path: Path, windows: np.ndarray, tokenizer, threads: int = 2, n_decode: int = 64) -> dict:
    """Prefill tokens/s (one 512-token window, median of 3) and greedy decode tokens/s."""
    dec = OrtDecoder(path, threads=threads)
    dec.forward(windows[0][None, :16])  # warm-up
    times = []
    for row in windows[:3]:
        t = time.perf_counter()
        dec.forward(row[None])
        times.append(time.perf_counter() - t)
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    _, decode = dec.greedy(prompt, n_decode)
    return {"prefill_tok_s": windows.shape[1] / statistics.median(times), "decode_tok_s": decode}


def rtn_baseline(float_path: Path, out: Path, block: int, symmetric: bool = False, suffix: str = "") -> Path:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    import onnx

    q = MatMulNBitsQuantizer(onnx.load(str(float_path)), bits=4, block_size=block, is_symmetric=symmetric,
                             accuracy_level=4, op_types_to_quantize=("MatMul", "Gather"),
                             quant_axes=(("MatMul", 0), ("Gather", 1)))
    q.process()
    path = out / f"rtn_b{block}{'_sym' if symmetric else ''}{suffix}.onnx"
    q.model.save_model_to_file(str(path), use_external_data_format=False)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="90,108.8", help="file budgets in MB (10^6 bytes)")
    ap.add_argument("--rtn-blocks", default="32,128", help="block sizes of ORT's RTN baseline ('' to skip)")
    ap.add_argument("--eval-windows", type=int, default=protocol.EVAL_WINDOWS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-fp32", action="store_true", help="skip the fp32 export's perplexity")
    ap.add_argument("--out", default="/tmp/cvxq-bench-onnx", help="where the ONNX files go")
    ap.add_argument("--json", default=None,
                    help="result file (default docs/results/onnx/perplexity_vs_budget.json; with --no-error-feedback "
                         "docs/results/onnx/perplexity_no_error_feedback.json)")
    ap.add_argument("--merge", action="store_true", help="keep rows of other methods already in --json")
    ap.add_argument("--rtn-symmetric", action="store_true", help="also ORT's RTN with symmetric blocks")
    ap.add_argument("--rtn-exports", default="plain",
                    help="fp32 exports ORT's RTN starts from: plain (one MatMul per matrix, as torch.onnx.export "
                         "writes), fused (q/k/v and gate/up as one MatMul each, as our graphs fuse them), or both")
    ap.add_argument("--decode-speed", type=float, default=get_format("onnx").default_decode_speed,
                    help="as fit --decode-speed: modeled decode speed >= R x ORT's RTN file of the same size (0: off)")
    ap.add_argument("--no-error-feedback", action="store_true", help="round each block on its own (the ablation)")
    args = ap.parse_args()
    args.json = args.json or str(protocol.result_path(
        "onnx", "perplexity_no_error_feedback.json" if args.no_error_feedback else "perplexity_vs_budget.json"))
    protocol.require_data()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    loaded = protocol.load_default_model()
    outcome = protocol.calibrate(loaded)
    windows = protocol.evaluation_ids(loaded.tokenizer, args.eval_windows)
    budgets = [float(b) for b in args.budgets.split(",") if b]
    # what `fit --format onnx` does by default: input second moments for error feedback
    hessians = None if args.no_error_feedback or not budgets else protocol.input_moments(loaded)
    t = time.perf_counter()
    qmenu = build_menu(loaded, outcome.sens, loaded.weights) if budgets else None
    menu_s = time.perf_counter() - t
    print(f"menu {menu_s:.0f} s", flush=True)
    rows: list[dict] = []

    def save() -> None:  # after every row: a long run that stops half-way keeps what it measured
        if not args.json:
            return
        kept = []
        if args.merge and Path(args.json).is_file():
            done = {r["method"] for r in rows}
            kept = [r for r in json.loads(Path(args.json).read_text())["rows"] if r["method"] not in done]
        protocol.write_results(args.json, {"menu_s": menu_s, "rows": kept + rows, "total_s": time.perf_counter() - t0})

    # rows of a non-default --decode-speed say so, so --merge keeps them beside the default plans
    default_speed = get_format("onnx").default_decode_speed
    speed_label = "" if args.decode_speed == default_speed else f", --decode-speed {args.decode_speed:g}"
    float_path = out / "fp32.onnx"
    write_float_onnx(loaded, float_path)  # from the original weights, before any export changes them
    for mb in budgets:
        budget = int(mb * 1e6)
        model = loaded if not rows else protocol.load_default_model()  # export_onnx leaves the model holding its weights
        t = time.perf_counter()
        info = export_onnx(model, outcome.sens, budget, out / f"cvxq_{mb}", eval_windows=windows, qmenu=qmenu,
                           hessians=hessians, decode_speed=args.decode_speed or None)
        export_s = time.perf_counter() - t
        v = info["verify"]
        row = {"method": f"CVXQ {mb} MB" + speed_label, "decode_speed_floor": args.decode_speed, "plan_notes": info["plan"].get("notes"),
               "path": info["path"], "budget_bytes": budget, "file_bytes": info["file_bytes"],
               "perplexity": v["eval"]["onnxruntime_perplexity"], "torch_perplexity": v["eval"]["torch_perplexity"],
               "exact_perplexity": v["eval"]["onnxruntime_exact_perplexity"],
               "ppl_relative_difference": v["eval"]["relative_difference"], "greedy_identical": v["greedy_identical"],
               "greedy_identical_default": v["greedy_identical_default"],
               "fusion": v["fusion"], "options_by_weights": info["options_by_weights"],
               "embedding": info["embedding_option"], "splits": info["splits"],
               "source_grid_note": info["source_grid_note"], "lossless_weights": info["lossless_weights"],
               "export_verify_s": export_s, "error_feedback": hessians is not None, **speed(Path(info["path"]), windows, loaded.tokenizer, args.threads)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()
        del model
        gc.collect()
    if not args.no_fp32:
        ppl = protocol.onnxruntime_perplexity(float_path, windows, threads=args.threads, desc="eval fp32 onnx")
        rows.append({"method": "fp32 export (head untied)", "file_bytes": os.path.getsize(float_path),
                     "perplexity": ppl.perplexity, **speed(float_path, windows, loaded.tokenizer, args.threads)})
        print(json.dumps(rows[-1]), flush=True)
        save()
    variants = [(int(b), False) for b in args.rtn_blocks.split(",") if b]
    if args.rtn_symmetric:
        variants += [(b, True) for b, _ in list(variants)]
    exports = [(float_path, "", "")] if "plain" in args.rtn_exports else []
    if "fused" in args.rtn_exports:
        fused_path = out / "fp32_fused.onnx"
        write_float_onnx(protocol.load_default_model(), fused_path, fuse=True)
        exports.append((fused_path, "_fused", ", fused q/k/v + gate/up export"))
    for (source, suffix, label), (block, symmetric) in [(e, v) for e in exports for v in variants]:
        t = time.perf_counter()
        path = rtn_baseline(source, out, block, symmetric, suffix)
        q_s = time.perf_counter() - t
        ppl = protocol.onnxruntime_perplexity(path, windows, threads=args.threads, desc=f"eval rtn b{block}{suffix}")
        rows.append({"method": f"ORT RTN 4-bit b{block} {'sym' if symmetric else 'asym'}, embedding GBQ{label}",
                     "path": str(path), "file_bytes": os.path.getsize(path), "perplexity": ppl.perplexity,
                     "quantize_s": q_s, **speed(path, windows, loaded.tokenizer, args.threads)})
        print(json.dumps(rows[-1]), flush=True)
        save()
    print("\n| method | file bytes | ORT perplexity | prefill tok/s | decode tok/s |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['file_bytes']:,} | {r['perplexity']:.2f} | {r['prefill_tok_s']:.0f} | "
              f"{r['decode_tok_s']:.1f} |")
    print(f"\nmenu {menu_s:.0f} s; calibration {'cached' if outcome.cached else f'{outcome.sens.seconds:.0f} s'}; "
          f"total {time.perf_counter() - t0:.0f} s")
    save()


if __name__ == "__main__":
    main()
