"""Prefill and decode speed in llama.cpp: our GGUF files against llama.cpp presets
of the same size (run on an otherwise idle machine; 2 threads).

    python benchmarks/bench_gguf_speed.py OURS.gguf:PRESET.gguf [...] [--json docs/results/gguf/decode_speed_vs_presets.json]

Files of a pair are timed alternately (A B A B ...) so drift in machine load
hits both alike; each figure is the median over ``--rounds`` runs of
``--repeats`` (prompt of 64 tokens, 128 greedy tokens).
"""
from __future__ import annotations

import argparse

import protocol  # benchmarks/protocol.py
from speed_pairs import print_pairs, time_pairs  # benchmarks/speed_pairs.py

from cvxq_export.formats.gguf.llama_eval import llama_speed

DEFAULT_JSON = protocol.result_path("gguf", "decode_speed_vs_presets.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", nargs="+", help="OURS.gguf:OTHER.gguf")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(DEFAULT_JSON), help=f"result file (default {protocol.shown(DEFAULT_JSON)})")
    args = ap.parse_args()
    prompt = list(range(1000, 1064))  # 64 ordinary token ids; speed does not depend on the text
    rows = time_pairs(args.pairs, args.rounds,
                      lambda p: llama_speed(p, prompt, 128, threads=args.threads, repeats=1))
    print_pairs(rows, "llama.cpp preset")
    if args.json:
        protocol.write_results(args.json, {"threads": args.threads, "rounds": args.rounds, "rows": rows})


if __name__ == "__main__":
    main()
