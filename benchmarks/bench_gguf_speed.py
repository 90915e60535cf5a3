"""Prefill and decode speed in llama.cpp: our GGUF files against llama.cpp presets
of the same size (run on an otherwise idle machine; 2 threads).

    python benchmarks/bench_gguf_speed.py OURS.gguf:PRESET.gguf [...] [--json docs/bench_gguf_speed.json]

Files of a pair are timed alternately (A B A B ...) so drift in machine load
hits both alike; each figure is the median over ``--rounds`` runs of
``--repeats`` (prompt of 64 tokens, 128 greedy tokens).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from speed_pairs import print_pairs, time_pairs  # benchmarks/speed_pairs.py

from cvxq_export.formats.llama_eval import llama_speed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", nargs="+", help="OURS.gguf:OTHER.gguf")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    prompt = list(range(1000, 1064))  # 64 ordinary token ids; speed does not depend on the text
    rows = time_pairs(args.pairs, args.rounds,
                      lambda p: llama_speed(p, prompt, 128, threads=args.threads, repeats=1))
    print_pairs(rows, "llama.cpp preset")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "rounds": args.rounds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
