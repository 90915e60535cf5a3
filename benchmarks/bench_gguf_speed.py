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
import os
from pathlib import Path

import numpy as np

from cvxq_export.formats.llama_eval import llama_speed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", nargs="+", help="OURS.gguf:OTHER.gguf")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    prompt = list(range(1000, 1064))  # 64 ordinary token ids; speed does not depend on the text
    rows = []
    for pair in args.pairs:
        a, b = pair.split(":")
        runs: dict[str, list[dict]] = {a: [], b: []}
        for _ in range(args.rounds):
            for path in (a, b):
                runs[path].append(llama_speed(path, prompt, 128, threads=args.threads, repeats=1))
        row = {}
        for path, label in ((a, "ours"), (b, "other")):
            row[label] = {"path": path, "file_bytes": os.path.getsize(path),
                          "prefill_tok_s": float(np.median([r["prefill_tok_s"] for r in runs[path]])),
                          "decode_tok_s": float(np.median([r["decode_tok_s"] for r in runs[path]]))}
        row["decode_ratio"] = row["ours"]["decode_tok_s"] / row["other"]["decode_tok_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| ours | bytes | decode tok/s | prefill tok/s | llama.cpp preset | bytes | decode tok/s | prefill tok/s | decode ratio |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        o, t = r["ours"], r["other"]
        print(f"| {Path(o['path']).parent.name}/{Path(o['path']).name} | {o['file_bytes']:,} | {o['decode_tok_s']:.1f} | "
              f"{o['prefill_tok_s']:.0f} | {Path(t['path']).name} | {t['file_bytes']:,} | {t['decode_tok_s']:.1f} | "
              f"{t['prefill_tok_s']:.0f} | {r['decode_ratio']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "rounds": args.rounds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
