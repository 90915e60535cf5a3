"""Shared by the speed benchmarks: time files in pairs, alternately (A B A B ...),
so drift in machine load hits both alike, and print the comparison table."""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Callable


def time_pairs(pairs: list[str], rounds: int, measure: Callable[[str], dict]) -> list[dict]:
    """``pairs`` are "OURS:OTHER"; ``measure(path)`` returns prefill_tok_s and decode_tok_s
    for one round. Each figure is the median over ``rounds``; a ratio is the median of the
    rounds' own ratios."""
    rows = []
    for pair in pairs:
        a, b = pair.split(":")
        runs: dict[str, list[dict]] = {a: [], b: []}
        for _ in range(rounds):
            for path in (a, b):
                runs[path].append(measure(path))
        row = {}
        for path, label in ((a, "ours"), (b, "other")):
            row[label] = {"path": path, "file_bytes": os.path.getsize(path),
                          "prefill_tok_s": statistics.median(r["prefill_tok_s"] for r in runs[path]),
                          "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs[path]),
                          "decode_rounds": [round(r["decode_tok_s"], 2) for r in runs[path]]}
        # the ratio of each round's pair (A then B, a second or two apart), median over rounds:
        # machine state drifts by 10-40 % between rounds here, within a pair by a few %
        for key in ("decode", "prefill"):
            per_round = [ra[f"{key}_tok_s"] / rb[f"{key}_tok_s"] for ra, rb in zip(runs[a], runs[b])]
            row[f"{key}_ratio"] = statistics.median(per_round)
            row[f"{key}_ratio_rounds"] = [round(x, 3) for x in per_round]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def print_pairs(rows: list[dict], other_label: str) -> None:
    print(f"\n| ours | bytes | decode tok/s | prefill tok/s | {other_label} | bytes | decode tok/s | prefill tok/s "
          "| decode ratio |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        o, t = r["ours"], r["other"]
        print(f"| {Path(o['path']).parent.name}/{Path(o['path']).name} | {o['file_bytes']:,} | {o['decode_tok_s']:.1f} | "
              f"{o['prefill_tok_s']:.0f} | {Path(t['path']).name} | {t['file_bytes']:,} | {t['decode_tok_s']:.1f} | "
              f"{t['prefill_tok_s']:.0f} | {r['decode_ratio']:.2f} |")
