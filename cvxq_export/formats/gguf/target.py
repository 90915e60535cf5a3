"""GGUF for llama.cpp: one ggml type per tensor, chosen by the CVXQ allocator.

Menu per tensor: every block type whose block divides the row, with exact
bytes (gguf-py's size table) and the distortion of the actual libggml
quantization, fed the CVXQ sensitivities as importance and weighted by them.
The file keeps the source GGUF's metadata and tokenizer, applies llama.cpp's
Q/K row permutation, and is written atomically.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ...allocate import Menu, allocate, cost_range
from ...errors import CvxqError, InfeasibleBudget, missing_extra
from ...io import atomic_path
from ...local_search import fastest_plan, lagrangian_scales, search_two_limits
from ...model import LoadedModel, WeightRef
from ...plan import Plan, TensorPlan
from . import ggml_feedback
from . import ggml_quant
from .layout import layout_for
from .meta import GGUFSkeleton, permute_for_llama_cpp, skeleton_for, unpermute

# Block types offered, coarse to fine. 256-blocks only where the row allows.
# MXFP4 (4.25 bits/weight) and Q2_0 (2.25, 64-blocks) are the only types below
# 4.5 bits/weight whose block divides rows like SmolLM2's 576. Q2_0 is not
# offered by default: llama.cpp's CPU backend runs it several times slower than
# the other types (measured: perplexity windows took ~6x longer), which a user
# fitting a model for speed would not expect. ``build_menu(types=ALL_TYPES)``
# opts in.
CANDIDATE_TYPES = ("Q2_K", "IQ2_S", "IQ3_XXS", "Q3_K", "IQ3_S", "MXFP4", "Q4_0", "Q4_1", "IQ4_NL", "IQ4_XS",
                   "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "F16")
ALL_TYPES = ("Q2_0",) + CANDIDATE_TYPES
FLOAT_TYPES = ("F16", "BF16", "F32")
ALIGNMENT = 32  # GGUF default tensor data alignment
METADATA_SLACK = 64  # safety margin over the measured header (float formatting of provenance values cannot grow it)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise missing_extra("gguf", "gguf") from None
    return gguf


def legal_types(cols: int, types: tuple[str, ...] = CANDIDATE_TYPES) -> list[str]:
    return [t for t in types if t == "F16" or cols % ggml_quant.block_size(t) == 0]


def tensor_bytes(type_name: str, rows: int, cols: int) -> int:
    if type_name == "F16":
        return rows * cols * 2
    return rows * ggml_quant.row_bytes(type_name, cols)


def aligned(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def gguf_name_map(loaded: LoadedModel) -> dict[str, str]:
    """HF parameter name -> GGUF tensor name for our quantizable weights (gguf-py's tables)."""
    return layout_for(loaded).names


def _head_count(loaded: LoadedModel, gguf_name: str) -> int | None:
    """Heads of a Q/K matrix whose rows llama.cpp wants interleaved, else None."""
    return layout_for(loaded).heads(loaded, gguf_name)


# Projections whose optional ``.bias`` tensor llama.cpp's loader accepts, per GGUF
# architecture (probed: a file with each bias loads and the bias changes the logits;
# tests/test_gguf_target.py checks llama.cpp's logits against PyTorch with them). Other
# architectures: only biases the source already has are corrected.
OPTIONAL_BIASES = {"llama": ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
BIAS_BYTES_PER_ROW = 4  # written as float32, like the source's norms


def bias_name(gguf_name: str) -> str:
    return gguf_name[: -len(".weight")] + ".bias"


def new_bias_names(loaded: LoadedModel) -> dict[str, str]:
    """HF weight name -> GGUF bias name, for the weights that have no bias in the source
    but may get one (bias correction) because llama.cpp loads it for this architecture."""
    allowed = OPTIONAL_BIASES.get(layout_for(loaded).arch, ())
    existing = gguf_skeleton(loaded).float_tensors
    out = {}
    for hf_name, gname in gguf_name_map(loaded).items():
        if gname.split(".")[-2] in allowed and bias_name(gname) not in existing:
            out[hf_name] = bias_name(gname)
    return out


def with_bias_bytes(gmenu: "GGUFMenu", capable: set[str]) -> "GGUFMenu":
    """The menu with a float32 bias tensor charged to every lossy option of a tensor in
    ``capable`` (HF names): bias correction writes one exactly there. A lossless option
    (distortion 0: e.g. SmolLM2's Q4_1 source grid) needs none."""
    m = gmenu.menu
    extra = np.array([aligned(t.ref.rows * BIAS_BYTES_PER_ROW) if t.ref.name in capable else 0
                      for t in gmenu.inputs], dtype=np.int64)  # [n_tensors]
    cost = m.cost + np.where(m.legal & (m.distortion > 0), extra[:, None], 0)
    return GGUFMenu(gmenu.inputs, gmenu.types, Menu(cost, m.distortion, m.legal, unit=m.unit), gmenu.columns)


def planned_new_biases(plan: Plan, loaded: LoadedModel) -> dict[str, str]:
    """The new bias tensors a plan paid for (its tensor bytes exceed the type's bytes):
    read from the plan itself, so a reused plan.json writes what it counted."""
    capable = new_bias_names(loaded)
    return {t.name: capable[t.name] for t in plan.tensors
            if t.name in capable and t.bytes > aligned(tensor_bytes(t.option, t.rows, t.cols))}


@dataclass
class GGUFTensorInput:
    ref: WeightRef
    gguf_name: str
    weight: np.ndarray  # [rows, cols] float32, llama.cpp row order
    importance: np.ndarray | None  # [rows, cols] float32, same order (None: unweighted)
    heads: int | None = None  # set for attn_q / attn_k: rows were permuted for llama.cpp


def tensor_inputs(loaded: LoadedModel, sens, refs: list[WeightRef]) -> list[GGUFTensorInput]:
    """Weights (and CVXQ importances, unless ``sens`` is None) in llama.cpp's row order."""
    names = gguf_name_map(loaded)
    out = []
    for ref in refs:
        w = loaded.weight_tensor(ref).detach().float().cpu().numpy()
        imp = None if sens is None else sens[ref.name].element_importance(ref.rows, sens.settings.row_group).astype(np.float32)
        heads = _head_count(loaded, names[ref.name])
        if heads:
            w = permute_for_llama_cpp(w, heads)
            imp = None if imp is None else permute_for_llama_cpp(imp, heads)
        out.append(GGUFTensorInput(ref, names[ref.name], np.ascontiguousarray(w),
                                   None if imp is None else np.ascontiguousarray(imp), heads))
    return out


def quantize_dequantize(type_name: str, t: GGUFTensorInput) -> tuple[np.ndarray | None, np.ndarray]:
    """(raw bytes or None for F16, dequantized [rows, cols] float32)."""
    if type_name == "F16":
        return None, t.weight.astype(np.float16).astype(np.float32)
    raw = ggml_quant.quantize_rows(type_name, t.weight, t.importance)
    # libggml's dequantizer: one C call (the read-back checks gguf-py's NumPy one gives the same values)
    return raw, ggml_quant.dequantize_rows_ggml(type_name, raw, t.ref.cols)


@dataclass
class GGUFMenu:
    inputs: list[GGUFTensorInput]
    types: list[list[str]]  # per tensor, legal types
    menu: Menu
    columns: tuple[str, ...] = CANDIDATE_TYPES  # the type of each menu column


def build_menu(inputs: list[GGUFTensorInput], *, types: tuple[str, ...] = CANDIDATE_TYPES, progress: bool = True,
               distortion: np.ndarray | None = None) -> GGUFMenu:
    """Every tensor at every legal type: exact bytes and the CVXQ-weighted squared error.
    ``distortion`` (``[n_tensors, n_types]``, a cached menu's) skips the quantization."""
    from tqdm.auto import tqdm

    n, o = len(inputs), len(types)
    cost = np.zeros((n, o), dtype=np.int64)
    dist = np.zeros((n, o), dtype=np.float64) if distortion is None else np.asarray(distortion, dtype=np.float64)
    if dist.shape != (n, o):
        raise ValueError(f"cached GGUF menu has shape {dist.shape}, expected {(n, o)}")
    legal = np.zeros((n, o), dtype=bool)
    per_tensor = []
    bar = tqdm(inputs, desc="gguf menu", unit="tensor", disable=not progress or distortion is not None)
    for i, t in enumerate(bar):
        ok = legal_types(t.ref.cols, types)
        per_tensor.append(ok)
        for j, name in enumerate(types):
            if name not in ok:
                continue
            legal[i, j] = True
            cost[i, j] = aligned(tensor_bytes(name, t.ref.rows, t.ref.cols))
            if distortion is None:
                _, deq = quantize_dequantize(name, t)
                dist[i, j] = float(np.sum(t.importance * (deq - t.weight) ** 2, dtype=np.float64))
    return GGUFMenu(inputs, per_tensor, Menu(cost, dist, legal, unit="bytes"), tuple(types))


FEEDBACK_VALUES = ("none", "gptq-blockwise")


def _provenance(plan: Plan | None, error_feedback: str = "none") -> dict[str, str | float | int]:
    from ... import __version__

    return {
        "general.quantized_by": f"cvxq-export {__version__}",
        "cvxq.budget_bytes": int(plan.budget_bytes) if plan else 0,
        "cvxq.lambda": float(plan.lam) if plan else 0.0,
        "cvxq.distortion": float(plan.distortion) if plan else 0.0,
        # always present, so the header measured by fixed_bytes (with the longest value) covers it
        "cvxq.error_feedback": error_feedback,
    }


def skeleton_notes(loaded: LoadedModel) -> list[str]:
    """What carrying the source's metadata and tokenizer over had to say (for the report)."""
    return gguf_skeleton(loaded).notes


def gguf_skeleton(loaded: LoadedModel) -> GGUFSkeleton:
    return skeleton_for(loaded, set(gguf_name_map(loaded).values()))


def add_metadata(writer, skeleton: GGUFSkeleton, extra: dict) -> None:
    writer.add_file_type(_gguf().LlamaFileType.GUESSED)
    for e in skeleton.kv:
        writer.add_key_value(e.key, e.value, e.vtype, sub_type=e.sub_type)
    for key, value in extra.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint64(key, int(value))


def fixed_bytes(loaded: LoadedModel, *, bias_correction: bool = False) -> int:
    """Bytes that do not depend on the plan: the header (metadata, tokenizer,
    tensor directory; measured by writing it) plus the float tensors we copy.
    With ``bias_correction`` the directory holds an entry for every bias that may be
    added (their data is charged in the menu, :func:`with_bias_bytes`)."""
    import tempfile

    gguf = _gguf()
    skeleton = gguf_skeleton(loaded)
    names = gguf_name_map(loaded)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "header.gguf")
        writer = gguf.GGUFWriter(path, skeleton.arch)
        add_metadata(writer, skeleton, _provenance(None, max(FEEDBACK_VALUES, key=len)))
        for name, arr in skeleton.float_tensors.items():
            writer.add_tensor_info(name, arr.shape, np.dtype(np.float32), arr.nbytes)
        for ref in loaded.weights:  # the directory entry's size does not depend on the type
            writer.add_tensor_info(names[ref.name], (ref.rows, ref.cols), np.dtype(np.float32), ref.rows * ref.cols * 4)
        for ref_name, bname in (new_bias_names(loaded).items() if bias_correction else ()):
            rows = next(r.rows for r in loaded.weights if r.name == ref_name)
            writer.add_tensor_info(bname, (rows,), np.dtype(np.float32), rows * BIAS_BYTES_PER_ROW)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        header = os.path.getsize(path)
    floats = sum(aligned(arr.size * 4) for arr in skeleton.float_tensors.values())
    return aligned(header) + METADATA_SLACK + floats


def size_range(loaded: LoadedModel) -> tuple[int, int]:
    """Smallest and largest achievable file sizes, from shapes alone (before calibration)."""
    fixed = fixed_bytes(loaded)
    lo = sum(min(aligned(tensor_bytes(t, r.rows, r.cols)) for t in legal_types(r.cols)) for r in loaded.weights)
    hi = sum(max(aligned(tensor_bytes(t, r.rows, r.cols)) for t in legal_types(r.cols)) for r in loaded.weights)
    return fixed + lo, fixed + hi


def plan_gguf(loaded: LoadedModel, sens, budget: int, *, progress: bool = True,
              gmenu: GGUFMenu | None = None, speed: float | None = None,
              bias_correction: bool = False) -> tuple[Plan, GGUFMenu]:
    """One type per tensor under the byte budget. With ``speed`` R the modeled llama.cpp
    time per token (:mod:`.gguf_speed`: one decode step plus one prompt token) is kept at
    most 1/R x that of the fastest file of this size the menu can make.
    ``bias_correction`` charges the bias tensors :func:`write_gguf` will add (the returned
    menu includes them). Their llama.cpp time (one vector add each) is not modeled."""
    refs = loaded.weights
    fixed = fixed_bytes(loaded, bias_correction=bias_correction)
    if gmenu is None:
        gmenu = build_menu(tensor_inputs(loaded, sens, refs), progress=progress)
    if bias_correction:
        gmenu = with_bias_bytes(gmenu, set(new_bias_names(loaded)))
    # A budget above the largest file buys the largest file (every tensor at its finest type).
    target = min(budget, cost_range(gmenu.menu, fixed)[1])
    notes = []
    unlimited = allocate(gmenu.menu, target, fixed)
    if speed:
        alloc, note = _speed_limited(gmenu, target, fixed, speed)
        notes.append(note)
    else:
        alloc = unlimited
    tensors = []
    for i, t in enumerate(gmenu.inputs):
        j = int(alloc.choice[i])
        tensors.append(TensorPlan(t.ref.name, t.ref.rows, t.ref.cols, gmenu.columns[j],
                                  bytes=int(gmenu.menu.cost[i, j]), distortion=float(gmenu.menu.distortion[i, j])))
    distortion = float(gmenu.menu.distortion[np.arange(len(alloc.choice)), alloc.choice].sum())
    plan = Plan("gguf", budget, alloc.cost, fixed, alloc.lam, distortion, alloc.min_cost, alloc.max_cost,
                loaded.source.display, sens.model_fingerprint, tensors, "all", notes,
                # the bytes-only problem's bound also bounds the speed-limited one (a limit only adds a constraint)
                dual_bound=min(distortion, unlimited.dual_bound),
                bound_scope="under the byte budget alone (the speed limit is not in the bound)" if speed
                else "under the byte budget")
    return plan, gmenu


# a speed-limited plan below this share of its budget gets a note saying the limit binds first
UNSPENT_BUDGET_NOTE = 0.99


def _speed_limited(gmenu: GGUFMenu, budget: int, fixed: int, speed: float):
    """Allocate on distortion + mu x modeled time, mu bisected to the smallest that keeps
    the time within 1/``speed`` of the fastest plan of this size (a second Lagrange
    multiplier, as for ONNX), then single-tensor moves (:mod:`..local_search`). The
    largest tensor (the tied embedding: a third of a small model's bytes) is searched at
    each of its types in turn: its type moves bytes and time by so much that the rest of
    the plan must be re-balanced around it, which single moves cannot do.
    Returns the allocation and a note for the plan."""
    from .speed import PHASES, base_us, speed_times_us

    m = gmenu.menu
    raw = speed_times_us([t.gguf_name for t in gmenu.inputs], [t.ref.rows * t.ref.cols for t in gmenu.inputs],
                         gmenu.columns, m.legal)  # [n_tensors, n_types] extra us over Q4_0 (may be < 0)
    floor = np.where(m.legal, raw, np.inf).min(1, keepdims=True)
    times = np.where(m.legal, raw - floor, 0.0)  # >= 0 per row: the same argmin, a sound "distortion"
    rows = np.arange(m.cost.shape[0])
    base = sum(base_us(ph) for ph in PHASES)

    def total(choice) -> float:
        return base + float(raw[rows, choice].sum())

    scales = lagrangian_scales(m, times)  # of the whole menu, for every restricted search too
    fastest = fastest_plan(m, times, budget, fixed, scales=scales)  # the reference: the fastest file of this size
    limit = total(fastest.choice) / speed
    time_cap = limit - base - float(floor.sum())  # the limit in the units of ``times``

    big = int(np.argmax([t.ref.rows * t.ref.cols for t in gmenu.inputs]))
    best, best_lam, best_mu = fastest.choice, fastest.lam, float("inf")
    best_d = float(m.distortion[rows, best].sum())
    for j in np.flatnonzero(m.legal[big]):
        legal = m.legal.copy()
        legal[big] = False
        legal[big, j] = True
        restricted = m.with_costs(legal=legal)
        # With the tensor pinned the largest file can be smaller than the budget: that buys the
        # largest file (as in plan_gguf), it does not rule the type out
        try:
            found = search_two_limits(restricted, times, time_cap, min(budget, cost_range(restricted, fixed)[1]),
                                      fixed, scales=scales, steps_from_zero=18)
        except InfeasibleBudget:  # no file of this size has the tensor at this type
            continue
        if found.choice is not None and float(m.distortion[rows, found.choice].sum()) < best_d:
            best, best_lam, best_mu = found.choice, found.lam, found.mu
            best_d = float(m.distortion[rows, best].sum())
    alloc = replace(fastest, choice=best, cost=fixed + int(m.cost[rows, best].sum()), distortion=best_d, lam=best_lam)
    point = f"the Lagrangian point at time multiplier {best_mu:.4g}" if np.isfinite(best_mu) else "the fastest plan"
    note = (f"llama.cpp speed: modeled {total(best):.0f} us per token (one decode step + one prompt token), "
            f"the fastest file of this size {total(fastest.choice):.0f} us, limit {limit:.0f} us for >= {speed} x its "
            f"speed (from {point} with {gmenu.inputs[big].gguf_name} at {gmenu.columns[best[big]]}, then "
            f"single-tensor moves; cvxq_export.formats.gguf.speed)")
    # Past some size the fastest mix stops getting faster while the accurate types keep
    # getting slower, so the time limit binds first and the file stops growing: say so,
    # since "fit into N bytes" users expect the bytes to be spent.
    # (Only where the bytes would buy something: a budget past the most accurate file is
    # left unspent with or without a limit.)
    if alloc.cost < UNSPENT_BUDGET_NOTE * budget:
        free = allocate(m, budget, fixed)
        if free.cost > alloc.cost + (1 - UNSPENT_BUDGET_NOTE) * budget and free.distortion < best_d:
            lower = f"e.g. {speed - 0.05:.2f}, or 0 for no limit" if speed > 0.1 else "0: no limit"
            note += (f". The speed limit binds before the byte budget: the file is {alloc.cost:,} of {budget:,} "
                     f"bytes; a lower --decode-speed ({lower}) spends the rest on accuracy")
    return alloc, note


@dataclass
class GGUFResult:
    path: Path
    size: int
    dequantized: dict[str, np.ndarray]  # HF name -> [rows, cols] float32 in HF row order
    # bias correction: HF weight name -> (GGUF bias name, [rows] float32 as written, llama.cpp row order)
    biases: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)

    def torch_bias(self, name: str, heads: int | None) -> np.ndarray:
        """The bias of weight ``name`` in HF row order (for the PyTorch evaluation)."""
        b = self.biases[name][1]
        return unpermute(b[:, None], heads)[:, 0] if heads else b


def write_gguf(loaded: LoadedModel, plan: Plan, inputs: list[GGUFTensorInput], path: str | Path, *, progress: bool = True,
               hessians: dict[str, np.ndarray] | None = None,
               input_means: dict[str, np.ndarray] | None = None) -> GGUFResult:
    """Write the planned file atomically; return its size and the dequantized weights.

    ``hessians`` (HF weight name -> ``[cols, cols]`` input second moment) turns on
    error feedback (:mod:`ggml_feedback`) for every block-quantized tensor that has one.
    ``input_means`` (HF weight name -> ``[cols]`` mean calibration input) turns on CVXQ's
    bias correction ``b' = b - (W_hat - W) x_mean``: for the biases the source has, and
    for the new ones the plan paid for (:func:`planned_new_biases`).
    """
    extra = _provenance(plan, "gptq-blockwise" if hessians else "none")
    biases = None
    if input_means is not None:
        wanted = planned_new_biases(plan, loaded)
        existing = gguf_skeleton(loaded).float_tensors
        for name, gname in gguf_name_map(loaded).items():
            if bias_name(gname) in existing:
                wanted[name] = bias_name(gname)
        biases = {name: (bname, input_means[name]) for name, bname in wanted.items() if name in input_means}
    result = _write_file(loaded, inputs, {t.name: t.option for t in plan.tensors}, path, extra,
                         progress=progress, hessians=hessians, biases=biases)
    if result.size > plan.budget_bytes:
        raise CvxqError(f"the GGUF file is {result.size:,} bytes, over the budget {plan.budget_bytes:,}",
                        "this is a bug in the size accounting; please report it")
    return result


def write_float_gguf(loaded: LoadedModel, path: str | Path, *, type_name: str = "F16", progress: bool = True) -> GGUFResult:
    """Every weight matrix as ``type_name`` (unweighted): the F16 file llama.cpp's own
    quantizer starts from, or a plain single-type baseline."""
    inputs = tensor_inputs(loaded, None, loaded.weights)
    return _write_file(loaded, inputs, {t.ref.name: type_name for t in inputs}, path, _provenance(None), progress=progress)


def add_tensor_data(writer, t: GGUFTensorInput, type_name: str, raw: np.ndarray | None) -> None:
    """One weight into a GGUFWriter: float16 when ``raw`` is None, else ``raw``
    [rows, row_bytes] uint8 of ``type_name``."""
    gguf = _gguf()
    if raw is None:
        writer.add_tensor(t.gguf_name, t.weight.astype(np.float16))
    elif ggml_quant.gguf_py_knows(type_name):
        writer.add_tensor(t.gguf_name, raw, raw_dtype=gguf.GGMLQuantizationType[type_name])
    else:  # a type newer than gguf-py's enum: give the shape and the raw type id ourselves
        writer.add_tensor(t.gguf_name, raw.view(np.int8), raw_shape=(t.ref.rows, t.ref.cols),
                          raw_dtype=ggml_quant.type_id(type_name))


def _write_file(loaded: LoadedModel, inputs: list[GGUFTensorInput], types: dict[str, str], path: str | Path,
                extra: dict, *, progress: bool = True, hessians: dict[str, np.ndarray] | None = None,
                biases: dict[str, tuple[str, np.ndarray]] | None = None) -> GGUFResult:
    """``biases``: HF weight name -> (GGUF bias name, ``[cols]`` mean input) to bias-correct."""
    from tqdm.auto import tqdm

    gguf = _gguf()
    skeleton = gguf_skeleton(loaded)
    floats = dict(skeleton.float_tensors)  # norms etc. (and source biases, corrected below)
    dequantized: dict[str, np.ndarray] = {}
    written_biases: dict[str, tuple[str, np.ndarray]] = {}
    def quantize(t: GGUFTensorInput) -> tuple[np.ndarray | None, np.ndarray]:
        type_name = types[t.ref.name]
        hessian = None if hessians is None else hessians.get(t.ref.name)
        if hessian is not None and type_name not in FLOAT_TYPES:
            return ggml_feedback.quantize_rows_feedback(type_name, t.weight, t.importance, hessian)
        return quantize_dequantize(type_name, t)

    from concurrent.futures import ThreadPoolExecutor

    from ...quantizers import worker_count

    with atomic_path(path) as tmp, ThreadPoolExecutor(max_workers=worker_count()) as pool:
        writer = gguf.GGUFWriter(str(tmp), skeleton.arch)
        add_metadata(writer, skeleton, extra)
        # tensors are quantized a core each (libggml and NumPy release the GIL; each tensor's
        # result depends on that tensor alone) and added to the file in order
        jobs = [pool.submit(quantize, t) for t in inputs]
        for t, job in tqdm(zip(inputs, jobs), total=len(inputs), desc="write gguf", unit="tensor", disable=not progress):
            type_name = types[t.ref.name]
            raw, deq = job.result()
            dequantized[t.ref.name] = unpermute(deq, t.heads) if t.heads else deq
            add_tensor_data(writer, t, type_name, raw)
            if biases and t.ref.name in biases:
                bname, mean = biases[t.ref.name]
                # [rows]: the layer's mean output over the calibration inputs is kept (llama.cpp row order
                # on both sides, so a permuted Q/K bias stays aligned with its rows)
                shift = (deq.astype(np.float64) - t.weight) @ mean.astype(np.float64)
                base = floats.get(bname, np.zeros(t.ref.rows, np.float32)).astype(np.float64)
                floats[bname] = written = (base - shift).astype(np.float32)
                written_biases[t.ref.name] = (bname, written)
        for name, arr in floats.items():  # float32, as llama.cpp's converter writes them
            writer.add_tensor(name, arr.astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return GGUFResult(Path(path), os.path.getsize(path), dequantized, written_biases)


def read_back_check(result: GGUFResult, inputs: list[GGUFTensorInput]) -> dict[str, int]:
    """Every quantized tensor, read back from the file, dequantizes to the values we
    evaluated (bit-exact) with libggml's own dequantizer (llama.cpp's code), and with
    gguf-py's NumPy dequantizer wherever gguf-py knows the type."""
    from .directory import read_directory

    directory = read_directory(str(result.path))
    checked = {"llama_cpp_dequantizer": 0, "gguf_py_dequantizer": 0}
    for t in inputs:
        entry = directory.get(t.gguf_name)
        if entry is None:
            raise CvxqError(f"GGUF read-back: tensor {t.gguf_name} is missing", "this is a bug; please report it")
        name = "F16" if entry.type_id == 1 else ggml_quant.type_name(entry.type_id)
        rows, cols = t.ref.rows, t.ref.cols
        expected = result.dequantized[t.ref.name]
        if name == "F16":
            versions = {"llama_cpp_dequantizer": entry.data[: rows * cols * 2].view(np.float16).astype(np.float32).reshape(rows, cols)}
        else:
            raw = np.asarray(entry.data[: rows * ggml_quant.row_bytes(name, cols)]).reshape(rows, -1)
            versions = {"llama_cpp_dequantizer": ggml_quant.dequantize_rows_ggml(name, raw, cols)}
            if ggml_quant.gguf_py_knows(name):
                versions["gguf_py_dequantizer"] = ggml_quant.dequantize_rows(name, raw, cols)
        for which, deq in versions.items():
            got = unpermute(deq, t.heads) if t.heads else deq
            if not np.array_equal(got, expected):
                raise CvxqError(f"GGUF read-back mismatch in {t.gguf_name} ({name}, {which})", "this is a bug; please report it")
            checked[which] += 1
    for bname, written in result.biases.values():
        entry = directory.get(bname)
        got = None if entry is None else entry.data[: written.size * 4].view(np.float32)
        if got is None or not np.array_equal(got, written):
            raise CvxqError(f"GGUF read-back mismatch in bias {bname}", "this is a bug; please report it")
        checked["biases"] = checked.get("biases", 0) + 1
    return checked


def rd_curve_of(gmenu: GGUFMenu, plan: Plan):
    """The allocator's size-vs-distortion hull around this plan, for the report."""
    from ...analysis.rd_curve import rd_curve

    chosen = np.array([gmenu.columns.index(t.option) for t in plan.tensors])
    return rd_curve(gmenu.menu, plan.fixed_bytes, plan.budget_bytes, chosen=chosen)


def modeled_speed(inputs: list[GGUFTensorInput], plan: Plan) -> dict[str, float]:
    """The plan's modeled llama.cpp microseconds per decode step and per prompt token."""
    from .speed import modeled_us

    return modeled_us([t.gguf_name for t in inputs], [t.ref.rows * t.ref.cols for t in inputs],
                      [t.option for t in plan.tensors])


def input_means(loaded: LoadedModel, sens) -> dict[str, np.ndarray]:
    """HF weight name -> ``[cols]`` mean calibration input, where the sensitivities have it."""
    return {ref.name: sens[ref.name].input_mean for ref in loaded.weights if sens[ref.name].input_mean is not None}


def set_torch_weights(loaded: LoadedModel, result: GGUFResult, inputs: list[GGUFTensorInput]) -> None:
    """Put the file's dequantized weights and biases into the PyTorch model, so that
    evaluating it evaluates the file."""
    import torch

    heads = {t.ref.name: t.heads for t in inputs}
    with torch.no_grad():
        for ref in loaded.weights:
            param = loaded.model.get_parameter(ref.name)
            t = torch.from_numpy(result.dequantized[ref.name])
            param.copy_((t.t() if ref.transposed else t).to(param.dtype))
            if ref.name in result.biases:
                module = loaded.model.get_submodule(ref.module)
                b = torch.from_numpy(result.torch_bias(ref.name, heads[ref.name]))
                if getattr(module, "bias", None) is None:  # a projection without a bias gets one
                    module.bias = torch.nn.Parameter(b.to(param.dtype), requires_grad=False)
                else:
                    module.bias.copy_(b.to(module.bias.dtype))


def bias_note(result: GGUFResult, bias_correction: bool, loaded: LoadedModel) -> str:
    arch = layout_for(loaded).arch
    if not bias_correction:
        where = ("llama.cpp loads optional biases on this architecture's projections" if arch in OPTIONAL_BIASES
                 else "only the source's own biases could be corrected on this architecture")
        return f"off ({where}; --bias-correction writes them)"
    return (f"{len(result.biases)} bias tensors corrected (b' = b - (W_hat - W) x_mean; lossless tensors need none)"
            if result.biases else "on, but nothing to correct (every tensor lossless, or no input means)")
