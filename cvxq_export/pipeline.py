"""The stages glued together: calibrate (cached), plan, quantize, apply.

Each stage takes and returns plain data (Sensitivities, Plan, quantized
tensors), so the CLI can run any one alone.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .allocate import allocate, cost_range
from .calibrate import CalibrationSettings, Sensitivities, calibrate
from .errors import CvxqError, InfeasibleBudget
from .model import LoadedModel, WeightRef
from .model_cache import cache_dir
from .native import (OPTIONS, Geometry, NativeMenu, NativeTensor, build_menu, quantize_tensor,
                     tensor_padding_allowance, unit_bits)
from .plan import Plan, TensorPlan
from .textdata import calibration_windows, read_text

SCOPES = ("all", "blocks")


def sensitivities_key(fingerprint: str, settings: CalibrationSettings, text: str, dtype: str = "float32") -> str:
    h = hashlib.sha256()
    h.update(fingerprint.encode())
    # Statistics of the same weights calibrated in another dtype differ (16-bit
    # activations and gradients): another key. float32 adds nothing, so the
    # keys of float32 calibrations stay what they were.
    if dtype != "float32":
        h.update(f"dtype={dtype};".encode())
    # The text is identified by its hash, not by the label (the path as the user spelled it):
    # the same file by a relative or absolute path, or a copy of it, is the same calibration
    h.update(repr(sorted((k, v) for k, v in asdict(settings).items() if k != "calibration")).encode())
    h.update(hashlib.sha256(text.encode()).digest())
    return h.hexdigest()[:20]


# Error feedback's input second moments come from the first this many calibration windows.
MOMENT_WINDOWS = 32


@dataclass
class CalibrationOutcome:
    sens: Sensitivities
    path: Path
    cached: bool
    moments: dict[str, np.ndarray] | None = None  # collected during this calibration (and cached), if asked


def calibrate_cached(loaded: LoadedModel, calibration: str | None, settings: CalibrationSettings, *,
                     device: str = "cpu", progress: bool = True, use_cache: bool = True,
                     moments: bool = False) -> CalibrationOutcome:
    """Calibrate, or reuse a cached result for the same model, dtype, text and settings.

    ``moments``: when calibration runs, also collect error feedback's input second
    moments from its forward passes (:func:`input_hessians_cached` finds them in the
    cache afterwards), unless they are cached already or would not fit in memory.

    Under ``torch.distributed`` (torchrun) every rank calls this; the ranks
    share the windows and the result, and only rank 0 writes the cache file."""
    from . import distributed
    from .calibrate import model_fingerprint

    text, source = read_text(calibration)
    settings = CalibrationSettings(**{**asdict(settings), "calibration": source})
    fingerprint = model_fingerprint(loaded)
    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    path = cache_dir() / f"sens-{sensitivities_key(fingerprint, settings, text, dtype)}.safetensors"
    if use_cache and path.is_file():
        sens = Sensitivities.load(path)
        if sens.model_fingerprint == fingerprint:
            return CalibrationOutcome(sens, path, True)
    windows = calibration_windows(loaded.tokenizer, calibration, settings.n_windows, settings.seq_len, settings.seed)
    moments_file = moments_path(loaded, text, settings, MOMENT_WINDOWS)
    fold = moments and not (use_cache and moments_file.is_file()) and _moments_fit_in_memory(loaded, device)
    sens = calibrate(loaded, windows.ids, settings, device=device, progress=progress,
                     moment_windows=MOMENT_WINDOWS if fold else 0)
    if distributed.is_main():
        sens.save(path)
        if sens.input_moments is not None:
            save_moments(moments_file, sens.input_moments)
    distributed.barrier()  # the other ranks return once the file is there
    return CalibrationOutcome(sens, path, False, sens.input_moments)


def moment_sum_bytes(loaded: LoadedModel) -> int:
    """Bytes of the moment sums (float64 ``[cols, cols]`` per distinct input, counted here
    per weight: an upper bound)."""
    from .activations import input_module

    return sum(8 * r.cols * r.cols for r in loaded.weights if input_module(loaded, r) is not None)


def _moments_fit_in_memory(loaded: LoadedModel, device: str) -> bool:
    """Whether the moment sums can sit beside calibration within a quarter of the free memory."""
    from .memory import available_bytes

    return moment_sum_bytes(loaded) < available_bytes(device) // 4


def moments_fit_alone(loaded: LoadedModel, device: str = "cpu") -> tuple[bool, int, int]:
    """Whether a pass of its own can hold the moment sums (within half the free memory):
    (fits, bytes needed, bytes free). An 8B Llama needs about 66 GB: error feedback is then off."""
    from .memory import available_bytes

    need, free = moment_sum_bytes(loaded), available_bytes(device)
    return need < free // 2, need, free


def select_weights(loaded: LoadedModel, scope: str) -> list[WeightRef]:
    if scope not in SCOPES:
        raise CvxqError(f"unknown scope '{scope}'", f"use one of: {', '.join(SCOPES)}")
    return [r for r in loaded.weights if scope == "all" or r.in_block]


def unquantized_bytes(loaded: LoadedModel, refs: list[WeightRef]) -> int:
    """fp16 bytes of every parameter not in ``refs`` (norms, biases, skipped weights).
    Tied parameters count once."""
    quantized = {r.name for r in refs} | {n for r in refs for n in r.also}
    return sum(2 * p.numel() for name, p in loaded.model.named_parameters() if name not in quantized)


def fixed_bytes(loaded: LoadedModel, refs: list[WeightRef]) -> int:
    return unquantized_bytes(loaded, refs) + tensor_padding_allowance() * len(refs)


def native_size_range(loaded: LoadedModel, refs: list[WeightRef], geometry: Geometry, stat_row_group: int) -> tuple[int, int]:
    """Smallest and largest achievable bytes, without calibration (costs depend
    only on shapes), so an infeasible budget fails before the long work."""
    lo = hi = 0
    for ref in refs:
        r = geometry.row_group_for(ref.rows, stat_row_group)
        n_units = ref.numel // (r * geometry.col_group)
        size = r * geometry.col_group
        lo += n_units * unit_bits(0, size)
        hi += n_units * unit_bits(max(b for b, _ in OPTIONS), size)
    fixed = fixed_bytes(loaded, refs)
    return fixed + lo // 8, fixed + hi // 8


def check_budget(budget: int, size_range: tuple[int, int]) -> None:
    lo, hi = size_range
    if not lo <= budget <= hi:
        raise InfeasibleBudget(budget, lo, hi)


def plan_native(loaded: LoadedModel, sens: Sensitivities, budget: int, *, scope: str = "all",
                geometry: Geometry = Geometry(), progress: bool = True,
                menu: NativeMenu | None = None, extra_fixed_bytes: int = 0) -> tuple[Plan, NativeMenu]:
    """Allocate bit depths per unit under ``budget`` bytes (whole weights).
    ``extra_fixed_bytes``: a format's own overhead (e.g. the packed file's
    header), counted as fixed so the file fits the budget."""
    refs = select_weights(loaded, scope)
    fixed = fixed_bytes(loaded, refs) + extra_fixed_bytes
    if menu is None:
        menu = build_menu(loaded, sens, refs, geometry, progress=progress)
    lo_bits, hi_bits = cost_range(menu.menu)
    check_budget(budget, (fixed + lo_bits // 8, fixed + hi_bits // 8))
    # The allocator counts bits; the fixed part and the budget are whole bytes.
    alloc = allocate(menu.menu, budget * 8, fixed * 8, unit="bits")
    opt_bits = np.array([b for b, _ in OPTIONS], dtype=np.uint8)
    opt_kind = np.array([k for _, k in OPTIONS], dtype=np.uint8)
    tensors: list[TensorPlan] = []
    from .native import encode_map, native_tensor_bytes

    for t in menu.tensors:
        choice = alloc.choice[t.start : t.start + t.n_units]
        unit_map = encode_map(opt_bits[choice], opt_kind[choice])
        dist = float(menu.menu.distortion[np.arange(t.start, t.start + t.n_units), choice].sum())
        tensors.append(TensorPlan(t.ref.name, t.ref.rows, t.ref.cols, "native", t.row_group, t.col_group, unit_map,
                                  native_tensor_bytes(unit_map, t.unit_size), dist))
    total = fixed - tensor_padding_allowance() * len(refs) + sum(t.bytes for t in tensors)
    plan = Plan("native", budget, total, fixed, alloc.lam, alloc.distortion, fixed + lo_bits // 8,
                fixed + hi_bits // 8, loaded.source.display, sens.model_fingerprint, tensors, scope,
                dual_bound=alloc.dual_bound)
    if total > budget:  # the padding allowance makes this impossible; keep the promise checked
        raise AssertionError(f"plan uses {total} bytes > budget {budget}")
    return plan, menu


def quantize_plan(loaded: LoadedModel, sens: Sensitivities, plan: Plan, *, progress: bool = True,
                  hessians: dict[str, np.ndarray] | None = None) -> dict[str, NativeTensor]:
    """Quantize every tensor with its planned option per unit. With ``hessians``
    (:func:`input_hessians`), tensors that have one are rounded with GPTQ-style
    error feedback across columns (:mod:`cvxq_export.feedback`); same bytes."""
    from tqdm.auto import tqdm

    from .feedback import quantize_tensor_feedback

    if plan.model_fingerprint != sens.model_fingerprint:
        raise CvxqError("the plan was made for a different model than the one loaded", "re-plan for this model")
    refs = {r.name: r for r in loaded.weights}
    out: dict[str, NativeTensor] = {}
    for tp in tqdm(plan.tensors, desc="quantize", unit="tensor", disable=not progress):
        if tp.name not in refs:
            raise CvxqError(f"plan names tensor {tp.name}, which the model does not have", "re-plan for this model")
        h = hessians.get(tp.name) if hessians else None
        if h is not None and tp.col_group == 1:
            out[tp.name] = quantize_tensor_feedback(loaded, sens, refs[tp.name], tp.unit_map, tp.row_group,
                                                    tp.col_group, h)
        else:
            out[tp.name] = quantize_tensor(loaded, sens, refs[tp.name], tp.unit_map, tp.row_group, tp.col_group)
    return out


def apply_quantized(loaded: LoadedModel, qtensors: dict[str, NativeTensor], sens: Sensitivities | None = None,
                    *, bias_correction: bool = True) -> list[str]:
    """Write the dequantized weights into the model in place. Where a layer has
    a bias, fold in CVXQ's bias correction. Returns the names corrected."""
    import torch

    from .quantizers import bias_correction as correct

    corrected = []
    with torch.no_grad():
        for name, qt in qtensors.items():
            ref = qt.ref
            param = loaded.model.get_parameter(name)
            original = loaded.weight_tensor(ref).detach().clone()
            new = qt.dequant.t() if ref.transposed else qt.dequant
            param.copy_(new.to(param.dtype))
            if bias_correction and ref.has_bias and sens is not None and sens[name].input_mean is not None:
                module = loaded.model.get_submodule(ref.module)
                mean = torch.from_numpy(sens[name].input_mean)
                module.bias.copy_(correct(module.bias, original, qt.dequant, mean).to(module.bias.dtype))
                corrected.append(name)
    return corrected


def input_hessians(loaded: LoadedModel, calibration: str | None, settings: CalibrationSettings, *,
                   n_windows: int = MOMENT_WINDOWS, progress: bool = True) -> dict[str, np.ndarray]:
    """``E[x x^T]`` of every quantizable weight's input (``[cols, cols]`` float32, keyed by
    weight name; the tied embedding gets the output head's input) over the first
    ``n_windows`` calibration windows: what error feedback needs.

    :func:`input_hessians_cached` keeps them on disk next to the sensitivities.
    """
    from .activations import collect_input_stats

    # the first windows of calibration's own draw (the seeded draw's prefix), as calibrate() folds them in
    windows = calibration_windows(loaded.tokenizer, calibration, min(n_windows, settings.n_windows), settings.seq_len,
                                  settings.seed)
    stats = collect_input_stats(loaded, windows.ids, hessian=True, progress=progress)
    shared: dict[int, np.ndarray] = {}  # q/k/v (and gate/up) share one input: keep one float32 copy
    out = {}
    for name, st in stats.items():
        key = id(st.hessian)
        if key not in shared:
            shared[key] = st.hessian.astype(np.float32)
        out[name] = shared[key]
    return out


def moments_path(loaded: LoadedModel, text: str, settings: CalibrationSettings,
                 n_windows: int = MOMENT_WINDOWS) -> Path:
    """Where the input second moments of this model, text (as read) and settings are cached."""
    from .calibrate import model_fingerprint

    key_settings = CalibrationSettings(**{**asdict(settings), "n_windows": min(n_windows, settings.n_windows)})
    return cache_dir() / f"moments-{sensitivities_key(model_fingerprint(loaded), key_settings, text)}.npz"


def load_moments(path: Path) -> dict[str, np.ndarray] | None:
    """Cached moments, or None when the file is missing or unreadable (then they are collected again)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            names = [str(n) for n in z["names"]]
            index = z["index"]
            unique = [z[f"m{i}"] for i in range(int(index.max()) + 1)] if len(index) else []
        return {n: unique[int(i)] for n, i in zip(names, index)}
    except (OSError, ValueError, KeyError):
        return None


def save_moments(path: Path, moments: dict[str, np.ndarray]) -> None:
    """Write moments atomically; weights that share an input share one stored matrix."""
    from .io import atomic_path

    ids: dict[int, int] = {}
    unique: dict[str, np.ndarray] = {}
    for m in moments.values():
        if id(m) not in ids:
            ids[id(m)] = len(unique)
            unique[f"m{len(unique)}"] = m
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, names=np.array(list(moments)), index=np.array([ids[id(m)] for m in moments.values()]), **unique)


def input_hessians_cached(loaded: LoadedModel, calibration: str | None, settings: CalibrationSettings, *,
                          n_windows: int = MOMENT_WINDOWS, progress: bool = True, use_cache: bool = True
                          ) -> tuple[dict[str, np.ndarray] | None, bool]:
    """:func:`input_hessians`, cached in :func:`cache_dir` under the model, text and settings
    (calibration leaves them there when it runs with ``moments=True``): collecting them
    takes a minute or two for SmolLM2 (32 forward windows of 512 tokens), reading their
    ~0.4 GB back a second. Returns (moments, whether they came from the cache); (None, False)
    when they are not cached and would not fit in half the free memory (:func:`moments_fit_alone`)."""
    text, source = read_text(calibration)
    settings = CalibrationSettings(**{**asdict(settings), "calibration": source})
    path = moments_path(loaded, text, settings, n_windows)
    cached = load_moments(path) if use_cache else None
    if cached is not None:
        return cached, True
    if not moments_fit_alone(loaded)[0]:
        return None, False
    moments = input_hessians(loaded, calibration, settings, n_windows=n_windows, progress=progress)
    save_moments(path, moments)
    return moments, False
