"""Where llama.cpp's own recipes sit in size and modeled speed (SmolLM2-135M).

llama.cpp's quantizer has a dry run (``llama_model_quantize_params.dry_run``): it
applies a preset's per-tensor type rules (and the fallbacks for rows the 256-element
types do not divide) and logs the type of every tensor without quantizing anything,
in well under a second. This script runs it for every preset, with and without a
``--token-embedding-type`` override, sizes each recipe's file with our own byte
accounting (the same as the GGUF target's budget) and prices it with the GGUF speed
model (``cvxq_export/formats/gguf/speed.py``), so our plans can be placed against
every recipe, not only the few ``bench_llama_presets.py`` quantizes and times.

    python benchmarks/bench_llama_recipes.py [--json docs/results/gguf/llama_cpp_recipes.json]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import re
from pathlib import Path

import protocol  # benchmarks/protocol.py
from cvxq_export.formats.gguf import ggml_quant
from cvxq_export.formats.gguf.speed import PHASES, modeled_us
from cvxq_export.formats.gguf.target import aligned, fixed_bytes, gguf_name_map, tensor_bytes
from cvxq_export.model import default_model_path

DEFAULT_JSON = protocol.result_path("gguf", "llama_cpp_recipes.json")

PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_NL", "IQ4_XS", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_0",
           "Q5_1", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")
EMBEDDING_TYPES = (None, "Q4_0", "IQ4_NL", "Q5_0", "Q8_0")
# one logged line per tensor: "[  3/272]  blk.0.attn_k.weight - [576, 192, 1, 1], type = q4_1, size = ... (q4_0)";
# the "(target)" is missing when the tensor keeps its type
LINE = re.compile(r"\]\s+(\S+)\s+-\s+\[[^\]]*\],\s+type\s+=\s+(\w+).*?(?:\((\w+)\))?\s*$")


def recipe_types(source: Path, preset: str, embedding: str | None) -> dict[str, str]:
    """GGUF tensor name -> ggml type llama.cpp's quantizer would give it (dry run)."""
    import llama_cpp

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def capture(level, text, user):  # noqa: ARG001 (ctypes signature)
        lines.append(text.decode(errors="replace"))

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{preset}")
        params.dry_run = True
        params.allow_requantize = True  # the source is already quantized; the rules do not depend on it
        if embedding:
            params.token_embedding_type = ggml_quant.type_id(embedding)
        rc = llama_cpp.llama_model_quantize(str(source).encode(), b"/dev/null", ctypes.byref(params))
    finally:
        llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize dry run of {preset} failed ({rc})")
    types = {}
    for line in "".join(lines).splitlines():
        m = LINE.search(line)
        if m:
            types[m.group(1)] = (m.group(3) or m.group(2)).upper()
    return types


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=str(DEFAULT_JSON), help=f"result file (default {protocol.shown(DEFAULT_JSON)})")
    args = ap.parse_args()
    source = default_model_path()
    loaded = protocol.load_default_model()
    names = gguf_name_map(loaded)
    refs = {names[r.name]: r for r in loaded.weights}
    fixed = fixed_bytes(loaded)
    rows = []
    for preset in PRESETS:
        for embedding in EMBEDDING_TYPES:
            types = recipe_types(source, preset, embedding)
            missing = [n for n in refs if n not in types]
            if missing:
                raise RuntimeError(f"{preset}: the dry run logged no type for {missing[:3]}")
            chosen = [types[n] for n in refs]
            size = fixed + sum(aligned(tensor_bytes(t, refs[n].rows, refs[n].cols)) for n, t in zip(refs, chosen))
            us = modeled_us(list(refs), [r.rows * r.cols for r in refs.values()], chosen)
            counts: dict[str, int] = {}
            for t in chosen:
                counts[t] = counts.get(t, 0) + 1
            rows.append({"preset": preset, "token_embedding_type": embedding, "file_bytes": size,
                         "embedding": types["token_embd.weight"], "types": counts,
                         **{f"modeled_{ph}_us": us[ph] for ph in PHASES}})
    # an embedding override equal to the preset's own choice gives the same recipe twice
    unique = {}
    for r in sorted(rows, key=lambda r: (r["file_bytes"], r["token_embedding_type"] is not None)):
        unique.setdefault((r["file_bytes"], json.dumps(r["types"], sort_keys=True)), r)
    rows = list(unique.values())
    print("| recipe | file bytes | embedding | modeled decode us | modeled prefill us/token | types |\n|---|---:|---|---:|---:|---|")
    for r in rows:
        label = r["preset"] + (f" + embd {r['token_embedding_type']}" if r["token_embedding_type"] else "")
        print(f"| {label} | {r['file_bytes']:,} | {r['embedding']} | {r['modeled_decode_us']:.0f} | "
              f"{r['modeled_prefill_us']:.0f} | {r['types']} |")
    if args.json:
        protocol.write_results(args.json, {"source": str(source), "rows": rows})


if __name__ == "__main__":
    main()
