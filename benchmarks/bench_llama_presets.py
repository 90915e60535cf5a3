"""llama.cpp's own quantizer on SmolLM2-135M, measured here (the GGUF baselines).

Protocol: an F16 GGUF of the model's weights (written by us from the source
GGUF), then ``llama_model_quantize`` (llama.cpp's quantizer, through
llama-cpp-python) with each preset and ``token_embedding_type`` mix.
Perplexity in llama.cpp on the first 20 windows of 512 tokens of test.txt,
each from an empty cache; prefill/decode tokens/s with 2 threads.

"With an importance matrix": llama-cpp-python builds no CLI tools and the
quantize API takes the imatrix as a C++ map, so we reproduce it: the same
per-tensor types llama.cpp's preset chose (read from its output file), each
tensor re-quantized by the same libggml routine with llama.cpp's imatrix
statistic (mean squared input activation per column, over 64 x 512 tokens of
valid.txt) as the importance vector, exactly what ``llama-quantize --imatrix``
passes to ``ggml_quantize_chunk``.

    python benchmarks/bench_llama_presets.py [--json docs/results/gguf/llama_cpp_presets.json]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import time
from pathlib import Path

import numpy as np

import protocol  # benchmarks/protocol.py
from cvxq_export.activations import collect_input_stats
from cvxq_export.formats.gguf import ggml_quant
from cvxq_export.formats.gguf.target import gguf_name_map, write_float_gguf
from cvxq_export.formats.gguf.llama_eval import llama_speed
from cvxq_export.io import atomic_path

DEFAULT_JSON = protocol.result_path("gguf", "llama_cpp_presets.json")
# (preset, token embedding type or None)
PRESETS = [("Q4_K_M", None), ("Q3_K_M", None), ("Q2_K", None), ("Q4_0", None), ("Q4_1", None), ("IQ4_NL", None),
           ("Q3_K_M", "Q5_0"), ("Q2_K", "Q5_0"), ("Q2_K", "Q4_0"), ("Q2_K", "IQ4_NL")]
PROMPT = "The history of the city of London begins with the Roman settlement of Londinium"


def llama_quantize(src: Path, dst: Path, preset: str, embd: str | None) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{preset}")
    params.nthread = 2
    if embd:
        params.token_embedding_type = ggml_quant.type_id(embd)
    with atomic_path(dst) as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize {preset} failed with {rc}")


def requantize_with_imatrix(src: Path, dst: Path, weights: dict[str, np.ndarray], imatrix: dict[str, np.ndarray]) -> None:
    """Same types as ``src``; each block-quantized tensor re-quantized from the
    float weights with the imatrix vector as importance."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    with atomic_path(dst) as tmp:
        writer = gguf.GGUFWriter(str(tmp), reader.fields["general.architecture"].contents())
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
        for t in reader.tensors:
            qtype = gguf.GGMLQuantizationType(t.tensor_type)
            shape = [int(x) for x in reversed(t.shape)]
            if qtype.name in ("F32", "F16", "BF16") or t.name not in imatrix:
                writer.add_tensor(t.name, np.asarray(t.data), raw_shape=shape, raw_dtype=qtype)
                continue
            raw = ggml_quant.quantize_rows(qtype.name, weights[t.name], imatrix[t.name].astype(np.float32))
            writer.add_tensor(t.name, raw, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/cvxq-presets", help="where the GGUF files go")
    ap.add_argument("--eval-windows", type=int, default=protocol.EVAL_WINDOWS)
    ap.add_argument("--json", default=str(DEFAULT_JSON), help=f"result file (default {protocol.shown(DEFAULT_JSON)})")
    ap.add_argument("--only", default=None,
                    help="comma-separated preset tags to run, e.g. 'Q3_K_M+embd-Q5_0,Q2_K+embd-Q4_0' (F16 always)")
    ap.add_argument("--merge", action="store_true", help="keep rows of other presets already in --json")
    args = ap.parse_args()
    only = None if args.only is None else set(args.only.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    protocol.require_data()
    loaded = protocol.load_default_model()
    tok = loaded.tokenizer
    windows = protocol.evaluation_ids(tok, args.eval_windows)
    prompt_ids = [int(i) for i in tok(PROMPT)["input_ids"]]
    f16 = out / "f16.gguf"
    f16_res = write_float_gguf(loaded, f16)
    # llama.cpp quantizes from the F16 values; so do we for the imatrix variants.
    weights = {gguf_name_map(loaded)[r.name]: None for r in loaded.weights}
    from cvxq_export.formats.gguf.target import tensor_inputs

    for t in tensor_inputs(loaded, None, loaded.weights):
        weights[t.gguf_name] = t.weight.astype(np.float16).astype(np.float32)
    t0 = time.perf_counter()
    calib = protocol.calibration_ids(tok)
    stats = collect_input_stats(loaded, calib)
    names = gguf_name_map(loaded)
    imatrix = {names[k]: v.mean_sq for k, v in stats.items()}
    imatrix_s = time.perf_counter() - t0
    rows = []

    def measure(label: str, path: Path, preset: str, embd: str | None, with_imatrix: bool | None) -> None:
        ppl = protocol.llama_cpp_perplexity(path, windows)
        speed = llama_speed(str(path), prompt_ids, 128)
        rows.append({"label": label, "preset": preset, "token_embd": embd, "imatrix": with_imatrix,
                     "file_bytes": os.path.getsize(path), "perplexity": ppl.perplexity, **speed})
        print(json.dumps(rows[-1]), flush=True)

    measure("F16", f16_res.path, "F16", None, None)
    for preset, embd in PRESETS:
        tag = preset + (f"+embd-{embd}" if embd else "")
        if only is not None and tag not in only:
            continue
        plain = out / f"{tag}.gguf"
        llama_quantize(f16, plain, preset, embd)
        measure(tag, plain, preset, embd, False)
        imat = out / f"{tag}-imatrix.gguf"
        requantize_with_imatrix(plain, imat, weights, imatrix)
        measure(tag + " imatrix", imat, preset, embd, True)
    print("\n| llama.cpp file | imatrix | bytes | MB | perplexity | prefill tok/s | decode tok/s |\n|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['label']} | {r['imatrix']} | {r['file_bytes']:,} | {r['file_bytes'] / 1e6:.1f} | {r['perplexity']:.2f} "
              f"| {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} |")
    if args.json:
        if args.merge and Path(args.json).is_file():
            done = {r["label"] for r in rows}
            rows += [r for r in json.loads(Path(args.json).read_text())["rows"] if r["label"] not in done]
            rows.sort(key=lambda r: -r["file_bytes"])
        protocol.write_results(args.json, {"imatrix_s": imatrix_s, "rows": rows})


if __name__ == "__main__":
    main()
