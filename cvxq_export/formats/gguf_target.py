"""GGUF for llama.cpp: one ggml type per tensor, chosen by the CVXQ allocator.

Menu per tensor: every block type whose block divides the row, with exact
bytes (gguf-py's size table) and the distortion of the actual libggml
quantization, fed the CVXQ sensitivities as importance and weighted by them.
The file keeps the source GGUF's metadata and tokenizer, applies llama.cpp's
Q/K row permutation, and is written atomically.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..allocate import Menu, allocate
from ..errors import CvxqError, InfeasibleBudget, missing_extra
from ..io import atomic_path
from ..model import LLAMA_FAMILY, LoadedModel, WeightRef
from ..plan import Plan, TensorPlan
from . import ggml_quant

# Block types offered, coarse to fine. 256-blocks only where the row allows.
CANDIDATE_TYPES = ("Q2_K", "Q3_K", "Q4_0", "Q4_1", "IQ4_NL", "IQ4_XS", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "F16")
ALIGNMENT = 32  # GGUF default tensor data alignment
METADATA_SLACK = 8192  # our provenance keys and string growth over the source header


def _gguf():
    try:
        import gguf
    except ImportError:
        raise missing_extra("gguf", "gguf") from None
    return gguf


def legal_types(cols: int) -> list[str]:
    return [t for t in CANDIDATE_TYPES if t == "F16" or cols % ggml_quant.block_size(t) == 0]


def tensor_bytes(type_name: str, rows: int, cols: int) -> int:
    if type_name == "F16":
        return rows * cols * 2
    return rows * ggml_quant.row_bytes(type_name, cols)


def _aligned(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def gguf_name_map(loaded: LoadedModel) -> dict[str, str]:
    """HF parameter name -> GGUF tensor name for our quantizable weights."""
    gguf = _gguf()
    if loaded.model_type not in LLAMA_FAMILY:
        raise CvxqError(f"GGUF export supports the Llama family ({', '.join(sorted(LLAMA_FAMILY))}), not '{loaded.model_type}'",
                        "use --format onnx or packed for this model")
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}.get(
        loaded.model_type, gguf.MODEL_ARCH.LLAMA)
    tmap = gguf.get_tensor_name_map(arch, loaded.config.num_hidden_layers)
    out = {}
    for ref in loaded.weights:
        name = tmap.get_name(ref.name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise CvxqError(f"no GGUF name for tensor {ref.name}", "this architecture's tensor layout is not supported for GGUF")
        out[ref.name] = name
    return out


def permute_for_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotary layout -> llama.cpp's (pairs interleaved within each head).
    w: [rows = n_head * head_dim, cols]; the same reindexing applies to importances."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _head_count(loaded: LoadedModel, gguf_name: str) -> int | None:
    cfg = loaded.config
    if gguf_name.endswith("attn_q.weight"):
        return cfg.num_attention_heads
    if gguf_name.endswith("attn_k.weight"):
        return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return None


@dataclass
class GGUFTensorInput:
    ref: WeightRef
    gguf_name: str
    weight: np.ndarray  # [rows, cols] float32, llama.cpp row order
    importance: np.ndarray  # [rows, cols] float32, same order
    heads: int | None = None  # set for attn_q / attn_k: rows were permuted for llama.cpp


def tensor_inputs(loaded: LoadedModel, sens, refs: list[WeightRef]) -> list[GGUFTensorInput]:
    names = gguf_name_map(loaded)
    out = []
    for ref in refs:
        w = loaded.weight_tensor(ref).detach().float().cpu().numpy()
        imp = sens[ref.name].element_importance(ref.rows, sens.settings.row_group).astype(np.float32)
        heads = _head_count(loaded, names[ref.name])
        if heads:
            w, imp = permute_for_llama_cpp(w, heads), permute_for_llama_cpp(imp, heads)
        out.append(GGUFTensorInput(ref, names[ref.name], np.ascontiguousarray(w), np.ascontiguousarray(imp), heads))
    return out


def quantize_dequantize(type_name: str, t: GGUFTensorInput) -> tuple[np.ndarray | None, np.ndarray]:
    """(raw bytes or None for F16, dequantized [rows, cols] float32)."""
    if type_name == "F16":
        return None, t.weight.astype(np.float16).astype(np.float32)
    raw = ggml_quant.quantize_rows(type_name, t.weight, t.importance)
    return raw, ggml_quant.dequantize_rows(type_name, raw, t.ref.cols)


@dataclass
class GGUFMenu:
    inputs: list[GGUFTensorInput]
    types: list[list[str]]  # per tensor, legal types (menu column order = CANDIDATE_TYPES)
    menu: Menu


def build_menu(inputs: list[GGUFTensorInput], *, progress: bool = True) -> GGUFMenu:
    from tqdm.auto import tqdm

    n, o = len(inputs), len(CANDIDATE_TYPES)
    cost = np.zeros((n, o), dtype=np.int64)
    dist = np.zeros((n, o), dtype=np.float64)
    legal = np.zeros((n, o), dtype=bool)
    types = []
    for i, t in enumerate(tqdm(inputs, desc="gguf menu", unit="tensor", disable=not progress)):
        ok = legal_types(t.ref.cols)
        types.append(ok)
        for j, name in enumerate(CANDIDATE_TYPES):
            if name not in ok:
                continue
            _, deq = quantize_dequantize(name, t)
            legal[i, j] = True
            cost[i, j] = _aligned(tensor_bytes(name, t.ref.rows, t.ref.cols))
            dist[i, j] = float(np.sum(t.importance * (deq - t.weight) ** 2, dtype=np.float64))
    return GGUFMenu(inputs, types, Menu(cost, dist, legal))


def fixed_bytes(loaded: LoadedModel, quantized: set[str]) -> int:
    """Header + metadata (measured on the source GGUF) + F32 tensors we copy."""
    gguf = _gguf()
    src = loaded.source
    if src.kind != "gguf":
        raise CvxqError("GGUF export currently needs a GGUF source model (its metadata and tokenizer are carried over)",
                        "convert the model to GGUF with llama.cpp's convert_hf_to_gguf.py first, or use another --format")
    reader = gguf.GGUFReader(src.path)
    header = reader.data_offset + METADATA_SLACK
    names = set(gguf_name_map(loaded).values())
    other = sum(_aligned(int(t.n_elements) * 4) for t in reader.tensors if t.name not in names)
    return header + other + ALIGNMENT * len(quantized)


def size_range(loaded: LoadedModel) -> tuple[int, int]:
    """Smallest and largest achievable file sizes, from shapes alone (before calibration)."""
    fixed = fixed_bytes(loaded, {r.name for r in loaded.weights})
    lo = sum(min(_aligned(tensor_bytes(t, r.rows, r.cols)) for t in legal_types(r.cols)) for r in loaded.weights)
    hi = sum(max(_aligned(tensor_bytes(t, r.rows, r.cols)) for t in legal_types(r.cols)) for r in loaded.weights)
    return fixed + lo, fixed + hi


def plan_gguf(loaded: LoadedModel, sens, budget: int, *, progress: bool = True,
              gmenu: GGUFMenu | None = None) -> tuple[Plan, GGUFMenu]:
    refs = loaded.weights
    fixed = fixed_bytes(loaded, {r.name for r in refs})
    if gmenu is None:
        gmenu = build_menu(tensor_inputs(loaded, sens, refs), progress=progress)
    alloc = allocate(gmenu.menu, budget, fixed)
    tensors = []
    for i, t in enumerate(gmenu.inputs):
        j = int(alloc.choice[i])
        tensors.append(TensorPlan(t.ref.name, t.ref.rows, t.ref.cols, CANDIDATE_TYPES[j],
                                  bytes=int(gmenu.menu.cost[i, j]), distortion=float(gmenu.menu.distortion[i, j])))
    plan = Plan("gguf", budget, alloc.cost, fixed, alloc.lam, alloc.distortion, alloc.min_cost, alloc.max_cost,
                loaded.source.display, sens.model_fingerprint, tensors, "all")
    return plan, gmenu


def _copy_metadata(reader, writer, extra: dict[str, str | float | int]) -> None:
    gguf = _gguf()
    skip = {"general.architecture", "general.file_type"}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        vtype = field.types[0]
        value = field.contents()
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for key, value in extra.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint64(key, int(value))


@dataclass
class GGUFResult:
    path: Path
    size: int
    dequantized: dict[str, np.ndarray]  # HF name -> [rows, cols] float32 in HF row order


def write_gguf(loaded: LoadedModel, plan: Plan, gmenu: GGUFMenu, path: str | Path, *, progress: bool = True) -> GGUFResult:
    """Write the planned file atomically; return its size and the dequantized weights."""
    from tqdm.auto import tqdm

    gguf = _gguf()
    reader = gguf.GGUFReader(loaded.source.path)
    arch = reader.fields["general.architecture"].contents()
    by_name = {t.ref.name: t for t in gmenu.inputs}
    planned = {t.name: t.option for t in plan.tensors}
    gguf_to_hf = {t.gguf_name: t.ref.name for t in gmenu.inputs}
    dequantized: dict[str, np.ndarray] = {}
    from .. import __version__

    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        _copy_metadata(reader, writer, {
            "general.quantized_by": f"cvxq-export {__version__}",
            "cvxq.budget_bytes": int(plan.budget_bytes),
            "cvxq.lambda": float(plan.lam),
            "cvxq.distortion": float(plan.distortion),
        })
        writer.add_file_type(gguf.LlamaFileType.GUESSED)
        for src_tensor in tqdm(reader.tensors, desc="write gguf", unit="tensor", disable=not progress):
            hf = gguf_to_hf.get(src_tensor.name)
            if hf is None:  # norms etc.: as float32, like the source
                data = gguf.quants.dequantize(src_tensor.data, src_tensor.tensor_type).astype(np.float32)
                writer.add_tensor(src_tensor.name, data.reshape([int(x) for x in reversed(src_tensor.shape)]))
                continue
            t = by_name[hf]
            type_name = planned[hf]
            raw, deq = quantize_dequantize(type_name, t)
            dequantized[hf] = unpermute(deq, t.heads) if t.heads else deq
            if raw is None:
                writer.add_tensor(t.gguf_name, t.weight.astype(np.float16))
            else:
                writer.add_tensor(t.gguf_name, raw, raw_dtype=gguf.GGMLQuantizationType[type_name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    size = os.path.getsize(path)
    if size > plan.budget_bytes:
        raise CvxqError(f"the GGUF file is {size:,} bytes, over the budget {plan.budget_bytes:,}",
                        "this is a bug in the size accounting; please report it")
    return GGUFResult(Path(path), size, dequantized)


def read_back_check(result: GGUFResult, gmenu: GGUFMenu) -> int:
    """gguf-py reads every quantized tensor back to the same values (bit-exact).
    Returns the number of tensors checked."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(result.path))
    names = {t.gguf_name: t for t in gmenu.inputs}
    checked = 0
    for tensor in reader.tensors:
        t = names.get(tensor.name)
        if t is None:
            continue
        deq = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(t.ref.rows, t.ref.cols)
        expected = result.dequantized[t.ref.name]
        got = unpermute(deq, t.heads) if t.heads else deq
        if not np.array_equal(got, expected):
            raise CvxqError(f"GGUF read-back mismatch in {tensor.name}", "this is a bug; please report it")
        checked += 1
    return checked



def export_gguf(loaded: LoadedModel, sens, budget: int, out_dir: Path, *, eval_windows: np.ndarray | None = None,
                progress: bool = True, plan: Plan | None = None) -> dict:
    """Plan, write, read back, and check in llama.cpp against PyTorch. The
    model's weights are left set to the GGUF's dequantized values."""
    import torch

    from ..evaluate import evaluate

    gmenu = build_menu(tensor_inputs(loaded, sens, loaded.weights), progress=progress)
    if plan is None:
        plan, gmenu = plan_gguf(loaded, sens, budget, progress=progress, gmenu=gmenu)
    plan.save(out_dir / "plan.json")
    result = write_gguf(loaded, plan, gmenu, out_dir / "model.gguf", progress=progress)
    checked = read_back_check(result, gmenu)
    with torch.no_grad():
        for name, w in result.dequantized.items():
            ref = next(r for r in loaded.weights if r.name == name)
            param = loaded.model.get_parameter(name)
            t = torch.from_numpy(w)
            param.copy_((t.t() if ref.transposed else t).to(param.dtype))
    types: dict[str, int] = {}
    for t in plan.tensors:
        types[t.option] = types.get(t.option, 0) + 1
    info = {"path": str(result.path), "file_bytes": result.size, "budget_bytes": budget, "types": types,
            "readback_tensors_bit_exact": checked, "plan": plan.summary(),
            "source_grid_note": ("Q4_1 reproduces SmolLM2's source grid (lossless for Q4_1 tensors)" if "Q4_1" in types else None),
            "bias_correction": "not exported: llama.cpp's llama architecture loads no bias tensors for these projections"}
    if eval_windows is not None:
        from .llama_eval import llama_perplexity

        torch_ppl = evaluate(loaded.model, eval_windows, progress=progress, desc="eval torch (gguf weights)")
        llama_ppl = llama_perplexity(str(result.path), eval_windows, progress=progress)
        rel = abs(llama_ppl.perplexity - torch_ppl.perplexity) / torch_ppl.perplexity
        info["eval"] = {"torch_perplexity": torch_ppl.perplexity, "llama_cpp_perplexity": llama_ppl.perplexity,
                        "relative_difference": rel, "within_0.5_percent": rel <= 0.005}
    return info
