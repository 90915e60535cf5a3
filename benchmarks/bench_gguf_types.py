"""What each ggml type costs llama.cpp per token, decode and prefill, inside the whole model.

Why: the GGUF planner's speed limit (``fit --decode-speed``) needs what each type
costs: the plans that weigh only bytes and distortion prefill at 0.58x (82.9 MB) and
0.40x (93.5 MB) the speed of llama.cpp's file of the same size (docs/benchmarks.md).
Measured here: the slow ones are
Q4_1 / Q5_0 / Q5_1 / Q8_0 / F16 on the linears (up to 2.7x in prefill; Q4_1 is
SmolLM2's source grid, which the allocator favours without a speed limit) and the
IQ2 / IQ3 types on ffn_down (decode), while Q4_0, IQ4_NL and Q4_K are the fast ones
(llama.cpp's CPU backend repacks those for its matrix kernels). This benchmark writes
SmolLM2-shaped GGUF files in which one group of tensors takes one type and everything
else Q4_0:

* ``linear:T``  every linear matrix at T (32-element block types, legal on every row);
* ``down:T``    only ``ffn_down`` at T (the 256-element types: only its 1536-wide rows take them);
* ``head:T``    the tied token embedding / output head at T;

and the all-Q4_0 base. Codes are the real weights' first rows quantized by libggml
and tiled down the tensor (speed does not depend on the values; quantizing 134 M
weights per type in the IQ types would take minutes each). All files are timed in
alternating rounds in llama.cpp through ``llama-cpp-python`` (2 threads): a 64-token
prompt (prefill) and ``--decode`` greedy tokens; each file's figure per round is
divided by the base file's in the same round (machine state moves whole runs by
up to 1.3x here), medians over rounds.

Per type and group the extra microseconds per token per weight over Q4_0 follow:
``(step(file) / step(base) - 1) * step(base) / weights(group)``, for decode and for
prefill (per prompt token). ``--write-table`` writes them where the GGUF planner
reads them (``cvxq_export/formats/gguf/speed_costs.json``).

    python benchmarks/bench_gguf_types.py --json docs/results/gguf/type_speed_table.json \\
        --write-table cvxq_export/formats/gguf/speed_costs.json
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import protocol  # benchmarks/protocol.py
from cvxq_export.formats.gguf import ggml_quant
from cvxq_export.formats.gguf.target import (FLOAT_TYPES, add_metadata, gguf_skeleton, add_tensor_data,
                                             legal_types, tensor_inputs)
from cvxq_export.formats.gguf.llama_eval import timed_greedy_run

DEFAULT_JSON = protocol.result_path("gguf", "type_speed_table.json")
BASE = "Q4_0"
TILE_ROWS = 64  # rows quantized per tensor, then tiled


def _tiled(type_name: str, w: np.ndarray) -> np.ndarray:
    """``w`` [rows, cols] -> [rows, row_bytes] uint8: its first TILE_ROWS rows quantized, repeated."""
    imp = np.ones(w.shape[1], np.float32) if ggml_quant.requires_importance(type_name) else None
    tile = ggml_quant.quantize_rows(type_name, w[:TILE_ROWS], imp)
    reps = -(-w.shape[0] // TILE_ROWS)
    return np.ascontiguousarray(np.tile(tile, (reps, 1))[:w.shape[0]])


def write_model(loaded, inputs, types: dict[str, str], path: Path) -> None:
    import gguf

    skeleton = gguf_skeleton(loaded)
    writer = gguf.GGUFWriter(str(path), skeleton.arch)
    add_metadata(writer, skeleton, {})
    for name, arr in skeleton.float_tensors.items():
        writer.add_tensor(name, arr.astype(np.float32))
    for t in inputs:
        type_name = types[t.ref.name]
        add_tensor_data(writer, t, type_name, None if type_name in FLOAT_TYPES else _tiled(type_name, t.weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def group_of(t) -> str:
    if t.ref.kind == "embedding":
        return "head"
    return "down" if t.gguf_name.endswith("ffn_down.weight") else "linear"


def jobs_for(inputs, types: list[str]) -> dict[str, dict[str, str]]:
    """File key -> tensor types, for every (group, type) the rows allow."""
    base = {t.ref.name: BASE for t in inputs}
    jobs = {f"base:{BASE}": base}
    for ty in types:
        if ty == BASE:
            continue
        for group in ("linear", "down", "head"):
            members = [t for t in inputs if group_of(t) == group or (group == "linear" and group_of(t) == "down")]
            if not all(ty in legal_types(t.ref.cols) for t in members):
                continue
            if group == "down" and all(ty in legal_types(t.ref.cols) for t in inputs if group_of(t) == "linear"):
                continue  # a 32-element type: its "linear" file already covers ffn_down
            jobs[f"{group}:{ty}"] = {**base, **{t.ref.name: ty for t in members}}
    return jobs


def one_run(llm, prompt: list[int], n_decode: int) -> tuple[float, float]:
    """(prefill us per prompt token, decode us per token) for one prompt + greedy tokens."""
    prefill_s, decode_s = timed_greedy_run(llm, prompt, n_decode)
    return prefill_s / len(prompt) * 1e6, decode_s / n_decode * 1e6


def time_files(paths: dict[str, Path], rounds: int, n_decode: int, threads: int) -> dict[str, dict]:
    from cvxq_export.formats.gguf.llama_eval import open_llama

    prompt = list(range(1000, 1064))  # 64 ordinary token ids
    llms = {k: open_llama(p, n_ctx=256, n_batch=64, verbose=False, n_threads=threads,
                     n_threads_batch=threads, n_gpu_layers=0) for k, p in tqdm(paths.items(), desc="load", unit="file")}
    for llm in llms.values():
        one_run(llm, prompt, 4)  # warm-up
    per = {k: {"prefill": [], "decode": []} for k in paths}
    for _ in tqdm(range(rounds), desc="rounds", unit="round"):
        for k, llm in llms.items():
            p, d = one_run(llm, prompt, n_decode)
            per[k]["prefill"].append(p)
            per[k]["decode"].append(d)
    del llms
    return per


def derive(per: dict[str, dict], inputs) -> dict:
    base_key = f"base:{BASE}"
    weights = {g: sum(t.ref.rows * t.ref.cols for t in inputs if group_of(t) == g) for g in ("linear", "down", "head")}
    weights["linear"] += weights["down"]  # a "linear" file sets ffn_down too
    out = {"base": {}, "extra_ns_per_weight": {}}
    for phase in ("decode", "prefill"):
        b = np.array(per[base_key][phase])
        out["base"][f"{phase}_us"] = float(min(b))
        for key, r in per.items():
            if key == base_key:
                continue
            group, ty = key.split(":")
            ratio = float(np.median(np.array(r[phase]) / b))
            extra = (ratio - 1.0) * float(min(b)) / weights[group] * 1000.0  # ns per weight over Q4_0
            out["extra_ns_per_weight"].setdefault(group, {}).setdefault(ty, {})[phase] = round(extra, 6)
            out.setdefault("ratios", {}).setdefault(key, {})[phase] = round(ratio, 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--decode", type=int, default=32, help="greedy tokens per round")
    ap.add_argument("--types", default=None, help="comma-separated ggml types (default: the GGUF menu's)")
    ap.add_argument("--json", default=str(DEFAULT_JSON), help=f"result file (default {protocol.shown(DEFAULT_JSON)})")
    ap.add_argument("--write-table", default=None,
                    help="also write the table the GGUF planner reads (cvxq_export/formats/gguf/speed_costs.json)")
    args = ap.parse_args()

    from cvxq_export.formats.gguf.target import CANDIDATE_TYPES

    loaded = protocol.load_default_model()
    inputs = tensor_inputs(loaded, None, loaded.weights)
    types = args.types.split(",") if args.types else list(CANDIDATE_TYPES)
    jobs = jobs_for(inputs, types)
    with tempfile.TemporaryDirectory(prefix="cvxq-ggml-types-") as tmp:
        paths = {}
        for key, tmap in tqdm(jobs.items(), desc="write", unit="file"):
            paths[key] = Path(tmp) / f"{key.replace(':', '_')}.gguf"
            write_model(loaded, inputs, tmap, paths[key])
        per = time_files(paths, args.rounds, args.decode, args.threads)
    derived = derive(per, inputs)
    for key, r in sorted(derived["ratios"].items(), key=lambda kv: kv[1]["decode"]):
        print(f"{key:16s} decode x{r['decode']:.3f}  prefill x{r['prefill']:.3f}")
    meta = {"about": "extra us per token per weight over Q4_0, measured in whole SmolLM2-shaped GGUF files in "
                     "llama.cpp (benchmarks/bench_gguf_types.py)", "threads": args.threads, "rounds": args.rounds,
            "decode_tokens": args.decode, "prompt_tokens": 64, "base_type": BASE, "machine": platform.machine()}
    if args.json:
        protocol.write_results(args.json, {**meta, **derived, "runs": per})
    if args.write_table:
        Path(args.write_table).write_text(json.dumps({**meta, "base": derived["base"],
                                                      "extra_ns_per_weight": derived["extra_ns_per_weight"]},
                                                     indent=1) + "\n")


if __name__ == "__main__":
    main()
