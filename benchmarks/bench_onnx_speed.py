"""Prefill and decode speed in ONNX Runtime: our ONNX files against ORT's own
quantizer's files of about the same size (2 threads, CPU provider, ORT's default
accuracy level 4 for MatMulNBits).

    python benchmarks/bench_onnx_speed.py OURS.onnx:OTHER.onnx [...] [--json docs/results/onnx/speed_pairs.json]

Files of a pair are timed alternately (A B A B ...) so drift in machine load hits
both alike. Each round opens a session, warms it up, times one prefill of 512
tokens and ``--decode`` greedy decode steps with the KV cache, each step on its
own; a round's decode speed is 1 / the median step (a burst of other load moves
a few steps, not the median); figures are medians over ``--rounds``.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import protocol  # benchmarks/protocol.py
from speed_pairs import print_pairs, time_pairs  # benchmarks/speed_pairs.py

from cvxq_export.formats.onnx.target import OrtDecoder

DEFAULT_JSON = protocol.result_path("onnx", "speed_pairs.json")


def one_round(path: str, threads: int, prefill: int, decode: int) -> dict:
    dec = OrtDecoder(path, threads=threads)
    ids = np.arange(1000, 1000 + prefill, dtype=np.int64)[None]  # ordinary token ids; speed does not depend on text
    dec.forward(ids[:, :16])  # warm-up
    t = time.perf_counter()
    dec.forward(ids)
    prefill_s = time.perf_counter() - t
    logits, past = dec.forward(ids[:, :64])
    steps = []
    for _ in range(decode):
        token = np.array([[int(logits[0, -1].argmax())]])
        t = time.perf_counter()
        logits, past = dec.forward(token, past)
        steps.append(time.perf_counter() - t)
    return {"prefill_tok_s": prefill / prefill_s, "decode_tok_s": 1.0 / float(np.median(steps))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", nargs="+", help="OURS.onnx:OTHER.onnx")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--json", default=str(DEFAULT_JSON), help=f"result file (default {protocol.shown(DEFAULT_JSON)})")
    args = ap.parse_args()
    rows = time_pairs(args.pairs, args.rounds, lambda p: one_round(p, args.threads, args.prefill, args.decode))
    print_pairs(rows, "ORT quantizer")
    if args.json:
        protocol.write_results(args.json, {"threads": args.threads, "rounds": args.rounds, "rows": rows})


if __name__ == "__main__":
    main()
