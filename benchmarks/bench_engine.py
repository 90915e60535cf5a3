"""CVXQ (native menu) vs round-to-nearest at equal bytes on SmolLM2-135M.

Protocol (benchmarks/protocol.py): calibrate on ../shared/data/wikitext-2/valid.txt
(64 windows x 512 tokens), evaluate perplexity on the first 20 windows of 512
tokens of test.txt, each from an empty cache, in PyTorch with dequantized
weights. Only the transformer blocks' linear layers are quantized; the tied
embedding/head stays as loaded. RTN: asymmetric min/max per 64 consecutive
inputs of a row with fp16 scale and minimum (not the source's 32-block grid,
so it cannot reproduce SmolLM2's Q4_1 weights). CVXQ gets exactly the bytes
RTN uses for the same tensors (its own scales, offsets and bit-depth map
included).

    python benchmarks/bench_engine.py [--windows 64] [--eval-windows 20] [--json docs/results/engine/cvxq_vs_rtn.json]
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

import protocol  # benchmarks/protocol.py
from cvxq_export.native import build_menu, tensor_padding_allowance
from cvxq_export.pipeline import apply_quantized, fixed_bytes, plan_native, quantize_plan, select_weights
from cvxq_export.quantizers import rtn_bytes, rtn_groupwise

DEFAULT_JSON = protocol.result_path("engine", "cvxq_vs_rtn.json")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=protocol.CALIBRATION_WINDOWS)
    ap.add_argument("--eval-windows", type=int, default=protocol.EVAL_WINDOWS)
    ap.add_argument("--rtn-bits", default="2,3,4")
    ap.add_argument("--rtn-group", type=int, default=64)
    ap.add_argument("--json", default=str(DEFAULT_JSON), help=f"result file (default {protocol.shown(DEFAULT_JSON)})")
    args = ap.parse_args()
    protocol.require_data()

    torch.manual_seed(0)
    loaded = protocol.load_default_model()
    eval_ids = protocol.evaluation_ids(loaded.tokenizer, args.eval_windows)
    t0 = time.perf_counter()
    outcome = protocol.calibrate(loaded, protocol.calibration_settings(args.windows))
    cal_s = time.perf_counter() - t0
    rss_cal = peak_rss_mb()
    print(f"calibration: {outcome.sens.seconds:.0f} s ({'cached' if outcome.cached else 'fresh'}), peak RSS {rss_cal:.0f} MB", flush=True)

    refs = select_weights(loaded, "blocks")
    originals = {r.name: loaded.weight_tensor(r).detach().clone() for r in refs}

    def restore() -> None:
        with torch.no_grad():
            for r in refs:
                loaded.model.get_parameter(r.name).copy_(originals[r.name])

    rows = []
    base = protocol.torch_perplexity(loaded.model, eval_ids, desc="eval fp")
    rows.append({"method": "original (dequantized Q4_1 source)", "bytes": None, "bpw": None, "perplexity": base.perplexity})
    print(f"original: ppl {base.perplexity:.3f}", flush=True)
    t_menu = time.perf_counter()
    menu = build_menu(loaded, outcome.sens, refs)
    menu_s = time.perf_counter() - t_menu
    n_weights = sum(r.numel for r in refs)
    # Budget = unquantized tensors + RTN's bytes: CVXQ's quantized tensors, with
    # their real buffer padding, get at most what RTN used.
    unquantized = fixed_bytes(loaded, refs) - tensor_padding_allowance() * len(refs)
    for bits in [int(b) for b in args.rtn_bits.split(",")]:
        rtn_total = sum(rtn_bytes(r.numel, bits, args.rtn_group) for r in refs)
        with torch.no_grad():
            for r in refs:
                loaded.model.get_parameter(r.name).copy_(rtn_groupwise(originals[r.name].float(), bits, args.rtn_group))
        rtn = protocol.torch_perplexity(loaded.model, eval_ids, desc=f"eval rtn{bits}")
        restore()
        rows.append({"method": f"RTN {bits}-bit g{args.rtn_group}", "bytes": rtn_total, "bpw": 8 * rtn_total / n_weights,
                     "perplexity": rtn.perplexity})
        plan, _ = plan_native(loaded, outcome.sens, unquantized + rtn_total, scope="blocks", menu=menu)
        assert plan.quantized_bytes <= rtn_total
        q = quantize_plan(loaded, outcome.sens, plan)
        apply_quantized(loaded, q, outcome.sens)
        cv = protocol.torch_perplexity(loaded.model, eval_ids, desc=f"eval cvxq@{bits}")
        restore()
        rows.append({"method": f"CVXQ native @ RTN {bits}-bit bytes", "bytes": plan.quantized_bytes,
                     "bpw": 8 * plan.quantized_bytes / n_weights, "perplexity": cv.perplexity, "lambda": plan.lam})
        print(f"{bits}-bit: RTN {rtn.perplexity:.3f} ({rtn_total} B)  CVXQ {cv.perplexity:.3f} ({plan.quantized_bytes} B)", flush=True)

    result = {"calibration_s": outcome.sens.seconds, "calibration_cached": outcome.cached, "calibration_wall_s": cal_s,
              "peak_rss_after_calibration_mb": rss_cal, "menu_s": menu_s, "peak_rss_mb": peak_rss_mb(),
              "eval_windows": args.eval_windows, "rows": rows}
    print("\n| method | bytes (block linears) | bits/weight | perplexity |\n|---|---:|---:|---:|")
    for r in rows:
        b = f"{r['bytes']:,}" if r["bytes"] else "-"
        bpw = f"{r['bpw']:.3f}" if r["bpw"] else "-"
        print(f"| {r['method']} | {b} | {bpw} | {r['perplexity']:.2f} |")
    print(f"\ncalibration {outcome.sens.seconds:.0f} s, menu {menu_s:.0f} s, peak RSS {peak_rss_mb():.0f} MB")
    if args.json:
        protocol.write_results(args.json, result)


if __name__ == "__main__":
    main()
