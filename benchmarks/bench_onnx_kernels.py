"""What each ONNX weight option costs ONNX Runtime per decode step, in isolation.

For SmolLM2-135M's matrix shapes, one fused MatMulNBits per (bits, block, zero
point) option at one token (M = 1, 2 threads, accuracy level 4), plus what the
fp16-offset kind adds on top (block sums, their product with the offsets, one
more addend), plus ORT's cost per node (a chain of tiny Adds). Why: the ONNX
planner's decode-time limit (``fit --decode-speed R``: at least R x the decode speed
of ORT's RTN file of about the same size) needs what each option costs; this table
says which choices cost what in isolation (``bench_onnx_inmodel.py`` fits the costs
the planner uses over whole models).

Each graph chains R copies of the op on one [1, 1, K] activation (so they run
back to back, like a model's layers) and is timed over many runs; figures are
microseconds per copy, best of ``--rounds`` (least disturbed by other load). Per
option a line ``us = call_us + weights * ns_per_weight / 1000`` is fitted over the
shapes; ``--write-table`` writes those lines where the planner reads them
(``cvxq_export/formats/onnx/speed.py``).

    python benchmarks/bench_onnx_kernels.py --json docs/results/onnx/kernel_costs.json \\
        --write-table cvxq_export/formats/onnx/decode_costs.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

import protocol  # benchmarks/protocol.py

DEFAULT_JSON = protocol.result_path("onnx", "kernel_costs.json")
SHAPES = {"k_proj / v_proj": (576, 192), "q_proj / o_proj": (576, 576), "q+k+v fused": (576, 960),
          "down_proj": (1536, 576), "gate+up fused": (576, 3072), "lm_head (tied embedding)": (576, 49152)}
REPEAT = 30  # copies per graph: one per SmolLM2 layer (4 for the head: one per token, and 28M weights each)


def _session(nodes, inits, k: int, threads: int):
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x0", 1, [1, 1, k])],
                              [helper.make_tensor_value_info(nodes[-1].output[0], 1, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _time(session, k: int, rounds: int, runs: int, repeat: int = REPEAT) -> float:
    """Best-of-rounds microseconds per chained copy."""
    x = np.random.default_rng(0).standard_normal((1, 1, k)).astype(np.float32)
    for _ in range(10):
        session.run(None, {"x0": x})
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(runs):
            session.run(None, {"x0": x})
        best = min(best, (time.perf_counter() - t) / runs / repeat * 1e6)
    return best


def matmulnbits_chain(k: int, n: int, bits: int, block: int, zero_points: bool, offset: bool, repeat: int = REPEAT):
    """REPEAT x (x [1,1,K] @ W [K,N] -> [1,1,N], projected back to K by a slice so the
    chain continues); offset adds Reshape+ReduceSum, MatMul by [K/b, N] fp32, Add."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(1)
    blocks = -(-k // block)  # a partial last block is padded (MatMulNBits allows K % block != 0)
    blob = block * bits // 8
    inits, nodes = [], []
    for i in range(repeat):
        w = f"w{i}"
        inits += [numpy_helper.from_array(rng.integers(0, 256, (n, blocks, blob), dtype=np.uint8), f"{w}.q"),
                  numpy_helper.from_array((rng.random(n * blocks, dtype=np.float32) * 1e-3), f"{w}.s")]
        ins = ["x%d" % i, f"{w}.q", f"{w}.s"]
        if zero_points:
            per = 8 // bits
            inits.append(numpy_helper.from_array(rng.integers(0, 256, n * -(-blocks // per), dtype=np.uint8), f"{w}.z"))
            ins.append(f"{w}.z")
        y = f"y{i}"
        nodes.append(helper.make_node("MatMulNBits", ins, [y], domain="com.microsoft", K=k, N=n, bits=bits,
                                      block_size=block, accuracy_level=4))
        if offset:
            inits.append(numpy_helper.from_array(rng.standard_normal((blocks, n)).astype(np.float32) * 1e-2, f"{w}.o"))
            shape = numpy_helper.from_array(np.array([0, 0, blocks, block], np.int64), f"{w}.shape")
            axes = numpy_helper.from_array(np.array([-1], np.int64), f"{w}.axes")
            inits += [shape, axes]
            nodes += [helper.make_node("Reshape", [f"x{i}", f"{w}.shape"], [f"r{i}"]),
                      helper.make_node("ReduceSum", [f"r{i}", f"{w}.axes"], [f"bs{i}"], keepdims=0),
                      helper.make_node("MatMul", [f"bs{i}", f"{w}.o"], [f"c{i}"]),
                      helper.make_node("Add", [y, f"c{i}"], [f"yo{i}"])]
            y = f"yo{i}"
        # back to width K for the next copy: take / tile columns (cheap next to the product)
        nodes.append(_to_width(y, f"x{i + 1}", n, k, inits, i))
    return nodes, inits


def _to_width(src: str, dst: str, n: int, k: int, inits: list, i: int):
    from onnx import helper, numpy_helper

    idx = numpy_helper.from_array((np.arange(k) % n).astype(np.int64), f"idx{i}")
    inits.append(idx)
    return helper.make_node("Gather", [src, f"idx{i}"], [dst], axis=-1)


def node_overhead_chain(k: int):
    from onnx import helper

    return [helper.make_node("Add", [f"x{i}", f"x{i}"], [f"x{i + 1}"]) for i in range(REPEAT)], []


def fit(rows: list[dict]) -> dict[str, dict]:
    """Per option, least squares ``us = call_us + weights * ns_per_weight / 1000`` over the shapes."""
    out = {}
    for name in dict.fromkeys(r["option"] for r in rows):
        pts = [(r["k"] * r["n"], r["us"]) for r in rows if r["option"] == name]
        w = np.array([p[0] for p in pts], float)
        us = np.array([p[1] for p in pts], float)
        a = np.stack([np.ones_like(w), w / 1000.0], 1)
        (call, per), *_ = np.linalg.lstsq(a, us, rcond=None)
        out[name] = {"call_us": max(float(call), 0.0), "ns_per_weight": max(float(per), 0.0),
                     "max_relative_residual": float(np.max(np.abs(a @ [call, per] - us) / us))}
    return out


def main() -> None:
    from cvxq_export.formats.onnx.qdq import OPTIONS, offered

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=30, help="session runs per round")
    ap.add_argument("--json", default=str(DEFAULT_JSON), help=f"result file (default {protocol.shown(DEFAULT_JSON)})")
    ap.add_argument("--write-table", default=None,
                    help="also write the fitted table the planner reads (cvxq_export/formats/onnx/decode_costs.json)")
    args = ap.parse_args()
    rows = []
    base = _time(_session(*node_overhead_chain(576), 576, args.threads), 576, args.rounds, args.runs)
    gather = _time(_session(*_gather_chain(576), 576, args.threads), 576, args.rounds, args.runs)
    print(f"one tiny node (Add on [1,1,576]): {base:.2f} us; the chain's Gather back to width K: {gather:.2f} us")
    options = [o for o in OPTIONS if o.kind != "zero" and offered(o)]
    for label, (k, n) in SHAPES.items():
        for o in options:
            if o.kind == "offset" and k % o.block:
                continue  # the menu offers a block only where it divides the column group
            repeat = REPEAT if k * n < 4_000_000 else 4
            nodes, inits = matmulnbits_chain(k, n, o.bits, o.block, o.kind != "sym", o.kind == "offset", repeat)
            us = _time(_session(nodes, inits, k, args.threads), k, args.rounds, args.runs, repeat) - gather
            rows.append({"shape": label, "k": k, "n": n, "option": o.name, "bits": o.bits, "block": o.block,
                         "kind": o.kind, "us": us, "ns_per_weight": us * 1e3 / (k * n)})
            print(f"{label:16s} {k:5d} x {n:5d}  {o.name:18s} {us:8.2f} us  {rows[-1]['ns_per_weight']:.4f} ns/weight",
                  flush=True)
    fitted = fit(rows)
    print("\n| option | call us | ns / weight | worst residual |\n|---|---:|---:|---:|")
    for name, f in fitted.items():
        print(f"| {name} | {f['call_us']:.1f} | {f['ns_per_weight']:.4f} | {f['max_relative_residual']:.0%} |")
    meta = {"threads": args.threads, "rounds": args.rounds, "repeat": REPEAT, "node_us": base, "gather_us": gather,
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "onnxruntime": __import__("onnxruntime").__version__}
    if args.json:
        protocol.write_results(args.json, {**meta, "fitted": fitted, "rows": rows})
    if args.write_table:
        keep = {}
        if Path(args.write_table).is_file():  # measured on a whole model, not here: kept across refits
            old = json.loads(Path(args.write_table).read_text())
            keep = {k: old[k] for k in ("graph_us_per_layer", "graph_us_note") if k in old}
        table = {"_about": "decode us per fused MatMulNBits call at one token: call_us + weights * ns_per_weight / 1000; "
                           "written by benchmarks/bench_onnx_kernels.py --write-table", **meta,
                 "options": {name: {k: round(v, 6) for k, v in f.items() if k != "max_relative_residual"}
                             for name, f in fitted.items()}, **keep}
        Path(args.write_table).write_text(json.dumps(table, indent=1) + "\n")


def _gather_chain(k: int):
    inits: list = []
    nodes = [_to_width(f"x{i}", f"x{i + 1}", k, k, inits, i) for i in range(REPEAT)]
    return nodes, inits


if __name__ == "__main__":
    main()
