"""ONNX for ONNX Runtime: QDQ weights that ORT fuses into MatMulNBits, with
CVXQ bit depths per column group, an exact file budget, and verification in
ORT itself.

Stages (each a function, plain data between them):

1. ``build_menu`` (:mod:`onnx_qdq`): per tensor and column group (``G`` input
   columns x all outputs), options {0, 2, 4, 8} bits x blocks x {sym, asym,
   offset}, exact stored bits, CVXQ-weighted error of the real rounding.
2. ``plan_onnx``: the shared allocator under ``budget - fixed`` bytes, where
   ``fixed`` is an upper bound on everything but the weight bytes (graph,
   names, norms, Gather indices), measured by serialising a worst-case
   skeleton. Splits are charged by restricting each matrix to at most
   ``max_options`` distinct options (the allocator runs once freely, then
   again with each matrix limited to the options it used most), so a matrix
   has at most two fused MatMuls.
3. ``quantize_for_onnx``: the plan's splits, with the down_proj column
   permutation folded into gate/up's output order.
4. ``write_onnx`` (:mod:`onnx_graph` builds the graph): atomically, then the
   file on disk is checked against the budget.
5. ``verify_onnx``: ``onnx.checker``, a fusion check on ORT's optimized graph,
   logits, greedy generation and perplexity against PyTorch with the same
   dequantized weights (ORT at accuracy level 0, fp32 compute), and the same
   figures at ORT's default level 4 (int8 activations), which users run.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...allocate import Menu, allocate, cost_range, smallest_multiplier
from ...architectures import onnx_list
from ...errors import CvxqError, InfeasibleBudget, missing_extra
from ...io import atomic_path
from ...model import LoadedModel, WeightRef
from ...plan import Plan, TensorPlan
from .qdq import (DEFAULT_COL_GROUP, OPTION_INDEX, OPTIONS, ZERO, QdqMenu, QdqOption, QdqTensorUnits,
                       block_view, build_menu, costs_only_menu, menu_layout, quantize_blocks, single_thread)

if TYPE_CHECKING:
    from .graph import QdqEmbedding, QdqLinear

SUPPORTED_TYPES = tuple(onnx_list())  # architectures.py: the ONNX column of the table
MODEL_FILE = "model.onnx"
CONFIG_FILE = "cvxq_onnx_config.json"
INIT_SLACK = 16  # bytes per initializer: dims and length varints of the real tensors vs the skeleton's
GRAPH_SLACK = 256  # graph / model length prefixes, producer string, an 8-bit embedding's `bits` attribute
MAX_OPTIONS = 2  # distinct options (so fused MatMuls) per matrix
PPL_TOLERANCE = 0.005  # ORT perplexity within 0.5 % of PyTorch's on the same weights
PROMPTS = ("The capital of France is", "Once upon a time, there was a", "The meaning of life is")


def _onnx():
    try:
        import ml_dtypes  # noqa: F401
        import onnx
    except ImportError as exc:
        raise missing_extra(exc.name or "onnx", "onnx") from None
    return onnx


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise missing_extra("onnxruntime", "onnx") from None
    onnxruntime.set_default_logger_severity(3)
    return onnxruntime


# --------------------------------------------------------------------------- model structure


def layer_weight_names(loaded: LoadedModel) -> list[dict[str, str]]:
    n = loaded.config.num_hidden_layers
    keys = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    return [{k: f"model.layers.{i}.{v}.weight" for k, v in keys.items()} for i in range(n)]


def check_supported(loaded: LoadedModel) -> None:
    """The graph builder covers the Llama family's decoder; say so up front otherwise."""
    cfg = loaded.config
    if loaded.model_type not in SUPPORTED_TYPES:
        raise CvxqError(f"the ONNX target builds Llama-family decoders ({', '.join(SUPPORTED_TYPES)}), not '{loaded.model_type}'",
                        "use --format packed for this model")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) and loaded.model_type == "mistral":
        raise CvxqError("sliding-window attention is not in the ONNX graph", "use --format gguf or packed for this model")
    rotary = getattr(loaded.model.model, "rotary_emb", None)
    rope_type = getattr(rotary, "rope_type", "default")
    if rotary is None or rope_type not in ("default", "linear", "llama3", "yarn"):
        raise CvxqError(f"RoPE type '{rope_type}' depends on the sequence length; the ONNX graph has fixed frequencies",
                        "use --format gguf or packed for this model")
    names = {r.name for r in loaded.weights}
    missing = [n for layer in layer_weight_names(loaded) for n in layer.values() if n not in names]
    if missing:
        raise CvxqError(f"the model lacks the Llama projections the graph expects (e.g. {missing[0]})",
                        "use --format packed for this model")
    embeds = [r for r in loaded.weights if r.kind == "embedding"]
    if len(embeds) != 1:
        raise CvxqError("the ONNX target needs one token embedding to quantize", "use --format packed for this model")


def decoder_spec(loaded: LoadedModel):
    from .graph import DecoderSpec

    cfg = loaded.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rotary = loaded.model.model.rotary_emb
    norms = {name: p.detach().float().cpu().numpy() for name, p in loaded.model.named_parameters()
             if name.endswith("layernorm.weight") or name == "model.norm.weight"}
    return DecoderSpec(cfg.num_hidden_layers, cfg.hidden_size, heads, getattr(cfg, "num_key_value_heads", None) or heads,
                       head_dim, cfg.vocab_size, float(cfg.rms_norm_eps),
                       rotary.inv_freq.detach().float().cpu().numpy(), float(getattr(rotary, "attention_scaling", 1.0)),
                       norms)


# --------------------------------------------------------------------------- sizes


def _skeleton_parts(loaded: LoadedModel, layout: list[QdqTensorUnits], sets: dict[str, list[QdqOption]] | None,
                    max_options: int):
    """Empty-data stand-ins for every tensor, in the largest graph *structure* its
    allowed options can produce: a Gather over all K columns when it may be split or
    drop groups, one part per allowed non-zero option (or, with ``sets`` None, the
    ``max_options`` longest-named parts with zero points and offsets)."""
    from .graph import QdqEmbedding, QdqLinear, QdqSplit

    worst = QdqOption(8, 128, "offset")  # the longest option name: uint8-b128-offset
    linears, embedding, head = {}, None, None
    for t in layout:
        ref = t.ref
        n, k = ref.rows, ref.cols
        if t.role == "embedding":
            # zero points and offsets both present: every initializer and node any option adds
            z = np.zeros((n, 0), np.int16)
            embedding = QdqEmbedding(ref, QdqOption(4, 16, "offset"), z, z.astype(np.float16), z, z.astype(np.float16),
                                     np.zeros(0), np.zeros(0))
            continue
        if sets is None:
            parts, gather = [worst] * max_options, max_options > 1
        else:
            allowed = sets[ref.name]
            parts = [o for o in allowed if o.kind != "zero"]
            gather = len(parts) > 1 or len(parts) < len(allowed)
        cols = np.array_split(np.arange(k), max(1, len(parts)))
        empty = np.zeros((0, n), np.int16)
        splits = [QdqSplit(o, c, empty, empty.astype(np.float16),
                           empty if (sets is None or o.kind == "asym") else None,
                           empty.astype(np.float16) if o.kind == "offset" else None) for o, c in zip(parts, cols)]
        bias = np.zeros(n, np.float32) if ref.has_bias else None
        lin = QdqLinear(ref, splits, np.zeros(0), bias, full_input=not gather)
        if ref.role == "head":
            head = lin
        else:
            linears[ref.name] = lin
    return embedding, linears, head


def fixed_bytes(loaded: LoadedModel, layout: list[QdqTensorUnits], max_options: int = MAX_OPTIONS,
                sets: dict[str, list[QdqOption]] | None = None) -> int:
    """Upper bound on the file's bytes other than the weights' codes, scales, zero
    points and offsets: the serialised skeleton (graph, names, norms, RoPE frequencies,
    Gather indices at their largest) plus a slack per initializer for the length
    fields of the real data. ``sets`` (tensor name -> allowed options) tightens it
    to the structures those options can produce."""
    from .graph import build_decoder

    _onnx()
    embedding, linears, head = _skeleton_parts(loaded, layout, sets, max_options)
    # unfused: the real graph fuses q/k/v or gate/up only when that removes nodes and names
    model = build_decoder(decoder_spec(loaded), embedding, linears, layer_weight_names(loaded), head, fuse=False)
    return model.ByteSize() + INIT_SLACK * len(model.graph.initializer) + GRAPH_SLACK


def size_range(loaded: LoadedModel, *, col_group: int = DEFAULT_COL_GROUP, max_options: int = MAX_OPTIONS) -> tuple[int, int]:
    """Smallest and largest achievable file sizes, from shapes alone (before calibration)."""
    check_supported(loaded)
    layout = menu_layout(loaded, loaded.weights, col_group)
    lo, hi = cost_range(costs_only_menu(layout))
    fixed = fixed_bytes(loaded, layout, max_options)
    return fixed + -(-lo // 8), fixed + hi // 8


# --------------------------------------------------------------------------- plan


def _allowed_sets(qmenu: QdqMenu, choice: np.ndarray, max_options: int, add_zero: bool) -> dict[str, list[int]]:
    """Per matrix, the ``max_options`` options its units chose most often (zero counts as
    one: dropping groups costs a Gather too), plus zero if asked."""
    sets = {}
    for t in qmenu.tensors:
        if t.role != "linear":
            continue
        used, counts = np.unique(choice[t.start:t.start + t.n_units], return_counts=True)
        keep = used[np.argsort(-counts, kind="stable")][:max_options].tolist()
        if add_zero and OPTION_INDEX[ZERO] not in keep:
            keep.append(OPTION_INDEX[ZERO])
        sets[t.ref.name] = sorted(int(j) for j in keep)
    return sets


def _restricted_menu(qmenu: QdqMenu, sets: dict[str, list[int]]) -> Menu:
    legal = qmenu.menu.legal.copy()
    for t in qmenu.tensors:
        if t.ref.name in sets:
            mask = np.zeros(legal.shape[1], dtype=bool)
            mask[sets[t.ref.name]] = True
            legal[t.start:t.start + t.n_units] &= mask
    return qmenu.menu.with_costs(legal=legal)


@dataclass
class _TwoPass:
    choice: np.ndarray  # [n_units] option index
    lam: float
    distortion_free: float  # pass 1 (the menu's own distortion, penalised when a time limit is on)
    distortion: float  # pass 2
    fixed: int  # graph bytes bound of pass 2
    add_zero: bool


def _two_pass(loaded: LoadedModel, qmenu: QdqMenu, menu: Menu, budget: int, loose: int, max_options: int,
              fixed_cache: dict) -> _TwoPass:
    free = allocate(menu, min((budget - loose) * 8, cost_range(menu)[1]), 0, unit="bits")
    for add_zero in (False, True):
        sets = _allowed_sets(qmenu, free.choice, max_options, add_zero)
        key = (max_options, tuple(sorted((k, tuple(v)) for k, v in sets.items())))
        if key not in fixed_cache:  # the skeleton build is the slow part of a pass: time limits rerun passes
            fixed_cache[key] = fixed_bytes(loaded, qmenu.tensors, max_options,
                                           {k: [OPTIONS[j] for j in v] for k, v in sets.items()})
        fixed = fixed_cache[key]
        restricted = _restricted_menu(QdqMenu(qmenu.tensors, menu, qmenu.options), sets)
        r_lo, r_hi = cost_range(restricted)
        room = (budget - fixed) * 8
        if r_lo <= room:  # with zero allowed this always holds: fixed <= loose and zero costs nothing
            break
    alloc = allocate(restricted, min(room, r_hi), 0, unit="bits")
    return _TwoPass(alloc.choice, alloc.lam, free.distortion, alloc.distortion, fixed, add_zero)


def _menu_distortion(qmenu: QdqMenu, choice: np.ndarray) -> float:
    """The menu's own distortion of a choice (no time penalty)."""
    return float(qmenu.menu.distortion[np.arange(len(choice)), choice].sum())


def _time_limited(loaded: LoadedModel, qmenu: QdqMenu, budget: int, loose: int, max_options: int,
                  limit_us: float, fixed_cache: dict) -> tuple[_TwoPass, float, float]:
    """The two passes on distortion + mu * modeled time, mu bisected (in log space) to the
    smallest that brings the modeled decode time under ``limit_us``: the Lagrangian of
    the second constraint. Returns the passes, mu, and the modeled time."""
    from .speed import plan_time_us, unit_times_us

    times = unit_times_us(qmenu.tensors)  # [n_units, n_options] us, the per-weight part

    def run(mu: float) -> tuple[_TwoPass, float]:
        m = qmenu.menu
        penalised = m.with_costs(distortion=m.distortion + mu * times)
        r = _two_pass(loaded, qmenu, penalised, budget, loose, max_options, fixed_cache)
        # calls and splits are charged on the whole plan: mu rises until all of it fits
        return r, plan_time_us(qmenu.tensors, r.choice, times)

    legal = qmenu.menu.legal
    d = qmenu.menu.distortion[legal]
    scale = float(np.median(d[d > 0])) / max(float(np.median(times[legal][times[legal] > 0])), 1e-12)
    # more weight on time stops helping when the calls alone exceed the limit: 4 stale growths end it
    best, mu, t = smallest_multiplier(run, limit_us, scale, stale_growths=4)
    if best is None:
        raise _unreachable(limit_us, t)
    return best, mu, t


def _unreachable(limit_us: float, fastest_us: float) -> CvxqError:
    return CvxqError(f"no plan of this size is modeled under the decode-time limit {limit_us:.0f} us "
                     f"(the fastest found: {fastest_us:.0f} us)",
                     "lower --decode-speed (the default is 0.9; 0 turns the limit off) or raise the budget")


def _time_limited_tied(loaded: LoadedModel, qmenu: QdqMenu, budget: int, loose: int, limit_us: float,
                       fixed_cache: dict) -> tuple[_TwoPass, float, float]:
    """One option per *fused group* (q/k/v together, gate/up together, every other
    matrix alone; zero not offered): then every call is known in advance, the modeled
    time is separable over groups, and the plan is a two-limit choice over ~150 groups
    that the GGUF planner's search solves (time multiplier bisected, every Lagrangian
    point repaired / filled by single-group moves, :mod:`..local_search`). Returns what
    :func:`_time_limited` returns."""
    from ...local_search import search_two_limits
    from .speed import fusion_key, option_cost, plan_time_us, unit_times_us

    m = qmenu.menu
    times = unit_times_us(qmenu.tensors)  # [n_units, n_options] us, the per-weight part
    zero = OPTION_INDEX[ZERO]
    groups: dict[str, list[QdqTensorUnits]] = {}
    for t in qmenu.tensors:
        key = fusion_key(t.ref.name) if t.role == "linear" else t.ref.name
        groups.setdefault(key, []).append(t)
    members = list(groups.values())
    n_opt = m.cost.shape[1]
    cost = np.zeros((len(members), n_opt), dtype=np.int64)  # [groups, options] bits
    dist = np.zeros((len(members), n_opt))
    gtime = np.zeros((len(members), n_opt))  # per-weight time + the group's one call
    legal = np.ones((len(members), n_opt), dtype=bool)
    legal[:, zero] = False
    for g, ts in enumerate(members):
        for t in ts:
            units = slice(t.start, t.start + t.n_units)
            cost[g] += m.cost[units].sum(0)
            dist[g] += m.distortion[units].sum(0)
            gtime[g] += times[units].sum(0)
            legal[g] &= m.legal[units].all(0)
        calls_here = not (len(ts) == 1 and ts[0].role == "embedding" and not ts[0].tied_head)
        if calls_here:
            gtime[g] += [option_cost(o).call_us for o in OPTIONS]
    if not legal.any(1).all():
        raise CvxqError("a fused group has no option legal for all its matrices", "this is a bug; please report it")
    gmenu = Menu(cost, np.where(legal, dist, 0.0), legal, unit=qmenu.menu.unit)
    room = min((budget - loose) * 8, cost_range(gmenu)[1])
    found = search_two_limits(gmenu, gtime, limit_us, room, 0, unit="bits", stale_growths=4)
    best = found.choice
    if best is None:
        raise _unreachable(limit_us, float(gtime[np.arange(len(members)), found.fastest.choice].sum()))
    choice = np.empty(m.cost.shape[0], dtype=np.intp)
    for g, ts in enumerate(members):
        for t in ts:
            choice[t.start:t.start + t.n_units] = best[g]
    sets = {t.ref.name: [int(best[g])] for g, ts in enumerate(members) for t in ts if t.role == "linear"}
    key = (1, tuple(sorted((n, tuple(v)) for n, v in sets.items())))
    if key not in fixed_cache:
        fixed_cache[key] = fixed_bytes(loaded, qmenu.tensors, 1, {n: [OPTIONS[j] for j in v] for n, v in sets.items()})
    dist_total = _menu_distortion(qmenu, choice)
    r = _TwoPass(choice, found.lam, dist_total, dist_total, fixed_cache[key], False)
    return r, found.mu, plan_time_us(qmenu.tensors, choice, times)


def plan_onnx(loaded: LoadedModel, sens, budget: int, *, col_group: int = DEFAULT_COL_GROUP,
              max_options: int = MAX_OPTIONS, progress: bool = True, qmenu: QdqMenu | None = None,
              decode_speed: float | None = None, decode_limit_us: float | None = None) -> tuple[Plan, QdqMenu]:
    """Allocate an option per (tensor, column group) so the file fits ``budget`` bytes
    and, with ``decode_speed`` R, its modeled decode time (:mod:`.onnx_speed`) is at most
    1/R x that of ORT's own 4-bit RTN file of about the same size (or, with
    ``decode_limit_us``, at most that many microseconds).

    Pass 1 allocates freely under a loose bound on the graph's own bytes (every matrix
    split ``max_options`` ways). Pass 2 limits each matrix to the options it used most
    (that is how splits are charged: at most ``max_options`` fused MatMuls per matrix),
    measures the graph those options can produce, and allocates again with that
    tighter bound, so the budget freed goes to the weights.
    """
    check_supported(loaded)
    if qmenu is None:
        qmenu = build_menu(loaded, sens, loaded.weights, col_group=col_group, progress=progress)
    loose = fixed_bytes(loaded, qmenu.tensors, max_options)
    lo, hi = cost_range(qmenu.menu)
    min_bytes, max_bytes = loose + -(-lo // 8), loose + hi // 8
    if not min_bytes <= budget <= max_bytes:
        raise InfeasibleBudget(budget, min_bytes, max_bytes)
    cache: dict = {}
    notes = []
    if decode_speed and decode_limit_us is None:
        from .speed import PLAN_MARGIN, graph_us, planned_speed, products_limit_us, rtn_reference

        ref = rtn_reference(qmenu.tensors, budget)
        layers = loaded.config.num_hidden_layers
        decode_limit_us = products_limit_us(ref.decode_us, planned_speed(decode_speed), layers)
        notes.append(f"decode-speed reference: ORT RTN 4-bit asym block {ref.block} (~{ref.rtn_bytes:,} bytes): weight "
                     f"products modeled {ref.decode_us:.0f} us per token, the rest of the graph {graph_us(layers):.0f} us; "
                     f"products limited to {decode_limit_us:.0f} us for >= {decode_speed} x its speed measured "
                     f"(planned at {planned_speed(decode_speed):.3f} x modeled: a {PLAN_MARGIN:.0%} margin for the "
                     f"model's scatter)")
    if decode_limit_us is None:
        r = _two_pass(loaded, qmenu, qmenu.menu, budget, loose, max_options, cache)
    else:
        # splits and calls cost time the per-unit model cannot see, so a limit on the whole
        # plan would be met by making every unit slower; instead compare the best plan with
        # splits (charged), without (one option per matrix), and without with q/k/v and
        # gate/up at one option each (fused: fewer calls)
        best, failure = None, None
        for mo, tie in sorted({(1, False), (1, True), (max_options, False)}):
            mo_loose = loose if mo == max_options else fixed_bytes(loaded, qmenu.tensors, mo)
            try:
                cand = (_time_limited_tied(loaded, qmenu, budget, mo_loose, decode_limit_us, cache) if tie else
                        _time_limited(loaded, qmenu, budget, mo_loose, mo, decode_limit_us, cache))
            except CvxqError as exc:  # this variant cannot reach the limit; another may
                failure = exc
                continue
            true_d = _menu_distortion(qmenu, cand[0].choice)
            if best is None or true_d < best[3]:
                best = (cand, (mo, tie), mo_loose, true_d)
        if best is None:
            raise failure
        (r, mu, t_us), (max_options, tied), loose, _ = best
        if tied:
            notes.append("siblings tied: q/k/v and gate/up each at one option (one fused call per layer), planned over "
                         "the fused groups (cvxq_export.local_search.search_two_limits)")
        source = f"time multiplier {mu:.4g}" if np.isfinite(mu) else "polished from the fastest plan"
        notes.append(f"decode time: products, calls and splits modeled {t_us:.0f} us per token <= limit {decode_limit_us:.0f} us "
                     f"({source}; cvxq_export.formats.onnx.speed)")
    choice, lam, fixed, add_zero = r.choice, r.lam, r.fixed, r.add_zero
    notes = [f"splits: each matrix limited to its {max_options} most used options{' plus zero' if add_zero else ''} "
             f"(pass 1 distortion {r.distortion_free:.6g}, pass 2 {r.distortion:.6g}); graph bytes bound "
             f"{loose:,} -> {fixed:,}", *notes,
             "unit_map: index into cvxq_export.formats.onnx.qdq.OPTIONS per column group"]
    rows = np.arange(len(choice))
    tensors = []
    for t in qmenu.tensors:
        units = rows[t.start:t.start + t.n_units]
        c = choice[units]
        bits = int(qmenu.menu.cost[units, c].sum())
        tensors.append(TensorPlan(t.ref.name, t.ref.rows, t.ref.cols, "qdq", 0, t.group, c.astype(np.uint8),
                                  -(-bits // 8), float(qmenu.menu.distortion[units, c].sum())))
    total = fixed + sum(t.bytes for t in tensors)
    distortion = _menu_distortion(qmenu, choice)
    # the bound of the whole menu with the graph bytes this plan counted (no split or speed limit: each
    # only adds a constraint, so the bound holds for them too)
    room = min((budget - fixed) * 8, cost_range(qmenu.menu)[1])
    bound = allocate(qmenu.menu, room, 0).dual_bound if room >= cost_range(qmenu.menu)[0] else None
    plan = Plan("onnx", budget, total, fixed, lam, distortion, min_bytes, max_bytes, loaded.source.display,
                sens.model_fingerprint, tensors, "all", notes,
                dual_bound=None if bound is None else min(distortion, bound),
                bound_scope="under the byte budget alone (the split rule and any speed limit are not in the bound)")
    if total > budget:
        raise AssertionError(f"onnx plan uses {total} bytes > budget {budget}")
    return plan, qmenu


def option_counts(plan: Plan) -> dict[str, int]:
    """Weights per option name over the plan."""
    out: dict[str, int] = {}
    for t in plan.tensors:
        g = t.col_group
        for j, n in zip(*np.unique(t.unit_map, return_counts=True)):
            name = OPTIONS[int(j)].name
            out[name] = out.get(name, 0) + int(n) * g * t.rows
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# --------------------------------------------------------------------------- quantize


@dataclass
class OnnxWeights:
    """Everything the graph needs, plus the reference weights."""

    embedding: QdqEmbedding
    linears: dict[str, QdqLinear]  # HF name -> the block linears
    head: QdqLinear | None  # None when the head is tied to the embedding
    lossless: dict[str, int] = field(default_factory=dict)  # option name -> weights reproduced exactly


def _quantize_columns(w, imp, option: QdqOption):
    """Quantize w [N, Kd] at ``option``: (QBlocks, dequant [N, Kd])."""
    q = quantize_blocks(block_view(w, option.block), option, block_view(imp, option.block))
    return q, q.dequant.reshape(w.shape)


def _blocks_to_kn(x, n: int, k: int, block: int) -> np.ndarray:
    """Per-block values [N * K/b] -> [K/b, N] (B's layout)."""
    return x.reshape(n, k // block).t().contiguous().numpy()


def quantize_for_onnx(loaded: LoadedModel, sens, plan: Plan, *, progress: bool = True,
                      hessians: dict[str, np.ndarray] | None = None) -> OnnxWeights:
    """The plan's options per column group, as the graph's splits. With ``hessians``
    (:func:`cvxq_export.pipeline.input_hessians`) every tensor that has one is rounded
    with GPTQ-style error feedback (:mod:`onnx_feedback`); same bytes."""
    import torch
    from tqdm.auto import tqdm

    from .feedback import Segment, quantize_with_feedback

    from ...native import importance_matrix
    from .graph import QdqEmbedding, QdqLinear, QdqSplit

    if plan.model_fingerprint != sens.model_fingerprint:
        raise CvxqError("the plan was made for a different model than the one loaded", "re-plan for this model")
    if plan.format != "onnx":
        raise CvxqError(f"plan.json is a '{plan.format}' plan, not an ONNX one", "make it with --format onnx")
    refs = {r.name: r for r in loaded.weights}
    linears, embedding, head = {}, None, None
    lossless: dict[str, int] = {}
    with torch.no_grad(), single_thread():
        for tp in tqdm(plan.tensors, desc="quantize onnx", unit="tensor", disable=not progress):
            ref = refs.get(tp.name)
            if ref is None:
                raise CvxqError(f"plan names tensor {tp.name}, which the model does not have", "re-plan for this model")
            w = loaded.weight_tensor(ref).detach().float().cpu()  # [N, K]
            imp = importance_matrix(sens, ref)
            n, k = w.shape
            g = tp.col_group
            if ref.kind == "embedding":
                o = OPTIONS[int(tp.unit_map[0])]
                h = hessians.get(ref.name) if hessians else None
                if h is not None:  # the tied head's input: feedback lowers the head's output error
                    deq, (q,) = quantize_with_feedback(w, imp, h, [Segment(o, np.arange(k))])
                else:
                    q, deq = _quantize_columns(w, imp, o)
                _count(lossless, o.name, int((deq == w).sum()))
                codes = q.codes.reshape(n, k).numpy()
                scale = q.scale.reshape(n, k // o.block).numpy()
                zero = None if q.zero is None else q.zero.reshape(n, k // o.block).numpy()
                if zero is None and o.bits == 8 and o.signed and ref.also:
                    zero = np.full(scale.shape, 128, np.int16)  # the tied head's DQ has no implicit 128
                offset = None if q.offset is None else q.offset.reshape(n, k // o.block).numpy()
                # GBQ with fp16 scales returns fp16 rows: (q - z) * s rounded to fp16, then + offset in fp32
                zf = 0.0 if q.zero is None else q.zero.float()[:, None]
                rows16 = ((q.codes.float() - zf) * q.scale.float()[:, None]).to(torch.float16).float()
                gathered = rows16 + (q.offset.float()[:, None] if q.offset is not None else 0.0)
                embedding = QdqEmbedding(ref, o, codes, scale, zero, offset, gathered.reshape(n, k).numpy(), deq.numpy())
                continue
            options = [OPTIONS[int(j)] for j in tp.unit_map]  # per unit
            deq_full = torch.zeros_like(w)
            splits = []
            used = sorted({o for o in options if o.kind != "zero"}, key=lambda o: OPTION_INDEX[o])

            def columns(opt):
                units = [u for u, uo in enumerate(options) if uo == opt]
                return np.concatenate([np.arange(u * g, (u + 1) * g) for u in units]) if units else np.zeros(0, np.int64)

            h = hessians.get(ref.name) if hessians else None
            fed = {}
            if h is not None:  # dropped groups first: the columns that stay pick up what they leave out
                segments = [Segment(ZERO, columns(ZERO))] if ZERO in options else []
                segments += [Segment(o, columns(o)) for o in used]
                deq_full, blocks = quantize_with_feedback(w, imp, h, segments)
                fed = {s.option: b for s, b in zip(segments, blocks) if b is not None}
            for o in used:
                cols = columns(o)
                idx = torch.from_numpy(cols)
                wd = w[:, idx]
                if o in fed:
                    q = fed[o]
                    deq = q.dequant.reshape(wd.shape)
                else:
                    q, deq = _quantize_columns(wd, imp[:, idx], o)
                    deq_full[:, idx] = deq
                _count(lossless, o.name, int((deq == wd).sum()))
                kd = len(cols)
                splits.append(QdqSplit(
                    o, cols.astype(np.int64), q.codes.reshape(n, kd).t().contiguous().numpy(),
                    _blocks_to_kn(q.scale, n, kd, o.block),
                    None if q.zero is None else _blocks_to_kn(q.zero, n, kd, o.block),
                    None if q.offset is None else _blocks_to_kn(q.offset, n, kd, o.block)))
            bias = None
            if ref.has_bias:
                bias = loaded.model.get_submodule(ref.module).bias.detach().float().cpu().numpy()
            full = len(splits) == 1 and len(splits[0].columns) == k
            lin = QdqLinear(ref, splits, deq_full.numpy(), bias, full_input=full)
            if ref.role == "head":
                head = lin
            else:
                linears[ref.name] = lin
    _fold_down_permutations(loaded, linears)
    return OnnxWeights(embedding, linears, head, lossless)


def _count(counts: dict[str, int], key: str, n: int) -> None:
    if n:
        counts[key] = counts.get(key, 0) + n


def _fold_down_permutations(loaded: LoadedModel, linears: dict) -> None:
    """down_proj's input is silu(gate) * up, elementwise per channel, so instead of a
    Gather before each of down's splits, gate and up emit their outputs in down's split
    order and down's splits read contiguous Slices. Exact: a column of B is quantized
    on its own, so permuting gate/up's outputs permutes their stored arrays and nothing else."""
    for names in layer_weight_names(loaded):
        down = linears[names["down"]]
        if down.full_input or not down.splits:
            continue
        order = np.concatenate([s.columns for s in down.splits])
        rest = np.setdiff1d(np.arange(down.ref.cols), order)  # dropped groups: computed by gate/up, never read
        perm = np.concatenate([order, rest])
        start = 0
        for s in down.splits:
            s.input_slice = (start, start + len(s.columns))
            start += len(s.columns)
        for key in ("gate", "up"):
            lin = linears[names[key]]
            for s in lin.splits:
                s.codes, s.scale = s.codes[:, perm], s.scale[:, perm]
                s.zero = None if s.zero is None else s.zero[:, perm]
                s.offset = None if s.offset is None else s.offset[:, perm]
            lin.bias = None if lin.bias is None else lin.bias[perm]
            lin.out_perm = perm


# --------------------------------------------------------------------------- write


@dataclass
class OnnxArtifact:
    path: Path
    size: int  # bytes of model.onnx on disk (the graph, weights inside: no external data)
    opset: int
    n_quantized_matmuls: int  # DequantizeLinear -> MatMul pairs written (the tied head included)
    quantized_initializers: list[str]
    tied_head: bool


def write_onnx(loaded: LoadedModel, weights: OnnxWeights, path: str | Path, budget: int | None = None) -> OnnxArtifact:
    from .graph import build_decoder

    onnx = _onnx()
    from ... import __version__

    model = build_decoder(decoder_spec(loaded), weights.embedding, weights.linears, layer_weight_names(loaded),
                          weights.head, producer=f"cvxq-export {__version__}")
    size = model.ByteSize()
    if size >= 2**31:
        raise CvxqError(f"the ONNX graph would be {size:,} bytes, over protobuf's 2 GB limit",
                        "this writer keeps weights inside the .onnx file; use a smaller budget or another format")
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))
    on_disk = os.path.getsize(path)
    if budget is not None and on_disk > budget:
        raise CvxqError(f"the ONNX file is {on_disk:,} bytes, over the budget {budget:,}",
                        "this is a bug in the size accounting; please report it")
    qnames = [n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    return OnnxArtifact(Path(path), on_disk, model.opset_import[0].version, len(qnames),
                        [q for q in qnames if not q.startswith("lm_head/")], weights.head is None)


def write_float_onnx(loaded: LoadedModel, path: str | Path, *, untie_head: bool = True, fuse: bool = False) -> Path:
    """The same decoder graph with fp32 weights: the starting point of ONNX Runtime's own
    quantizer (``MatMulNBitsQuantizer``) in the benchmark. The head gets its own [K, V]
    copy of a tied embedding (so the quantizer can treat MatMul and Gather separately).
    ``fuse``: q/k/v and gate/up as one MatMul each, as our quantized graphs do when
    their structures agree (default: one MatMul per matrix, as torch.onnx.export writes)."""
    from .graph import FloatEmbedding, FloatLinear, build_decoder

    onnx = _onnx()
    check_supported(loaded)
    linears, head, embedding = {}, None, None
    for ref in loaded.weights:
        w = loaded.weight_tensor(ref).detach().float().cpu().numpy()  # [N, K]
        if ref.kind == "embedding":
            embedding = FloatEmbedding(ref, w)
            continue
        bias = loaded.model.get_submodule(ref.module).bias.detach().float().numpy() if ref.has_bias else None
        lin = FloatLinear(ref, np.ascontiguousarray(w.T), bias)
        if ref.role == "head":
            head = lin
        else:
            linears[ref.name] = lin
    if head is None:
        if not untie_head:
            raise CvxqError("a float export needs an untied head", "pass untie_head=True")
        head = FloatLinear(WeightRef("lm_head.weight", "lm_head", embedding.weight.shape[0], embedding.weight.shape[1],
                                     "linear", "head"), np.ascontiguousarray(embedding.weight.T))
    model = build_decoder(decoder_spec(loaded), embedding, linears, layer_weight_names(loaded), head, fuse=fuse)
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))
    return Path(path)


GENERATE_PY = '''#!/usr/bin/env python3
"""Greedy generation with ONNX Runtime for the model in this folder (written by cvxq-export).

    pip install onnxruntime tokenizers numpy
    python generate.py "The capital of France is" --max-new-tokens 32
"""
import argparse
import json
import os
import time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prompt")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ORT decides)")
    args = ap.parse_args()
    with open(os.path.join(HERE, "CONFIG_FILE")) as f:
        cfg = json.load(f)
    tok = Tokenizer.from_file(os.path.join(HERE, "tokenizer.json"))
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(os.path.join(HERE, cfg["model"]), so, providers=["CPUExecutionProvider"])
    ids = tok.encode(args.prompt, add_special_tokens=False).ids
    layers, kv_heads, head_dim = cfg["num_layers"], cfg["num_kv_heads"], cfg["head_dim"]
    past = {f"past_key_values.{i}.{kv}": np.zeros((1, kv_heads, 0, head_dim), np.float32)
            for i in range(layers) for kv in ("key", "value")}
    out, step, pos = [], np.array([ids], np.int64), 0
    t0 = time.perf_counter()
    for _ in range(args.max_new_tokens):
        n = step.shape[1]
        feeds = {"input_ids": step, "attention_mask": np.ones((1, pos + n), np.int64),
                 "position_ids": np.arange(pos, pos + n, dtype=np.int64)[None], **past}
        logits, *present = sess.run(None, feeds)
        past = {f"past_key_values.{i}.{kv}": present[2 * i + j] for i in range(layers) for j, kv in enumerate(("key", "value"))}
        pos += n
        nxt = int(logits[0, -1].argmax())
        if nxt in cfg.get("eos_token_ids", []):
            break
        out.append(nxt)
        step = np.array([[nxt]], np.int64)
    dt = time.perf_counter() - t0
    print(args.prompt + tok.decode(out))
    print(f"[{len(out)} tokens in {dt:.2f} s]")


if __name__ == "__main__":
    main()
'''.replace("CONFIG_FILE", CONFIG_FILE)


def _eos_ids(loaded: LoadedModel) -> list[int]:
    ids = set()
    for src in (getattr(loaded.model, "generation_config", None), loaded.config):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    if getattr(loaded.tokenizer, "eos_token_id", None) is not None:
        ids.add(int(loaded.tokenizer.eos_token_id))
    return sorted(ids)


def write_extras(loaded: LoadedModel, out_dir: Path, plan: Plan | None) -> list[str]:
    """Tokenizer files, a config for the example, and generate.py: written in a staging
    folder, then each renamed into place."""
    spec = decoder_spec(loaded)
    staging = Path(tempfile.mkdtemp(prefix=".onnx-staging-", dir=out_dir))
    try:
        loaded.tokenizer.save_pretrained(str(staging))
        if not (staging / "tokenizer.json").is_file():
            raise CvxqError("the tokenizer could not be saved as tokenizer.json (a slow tokenizer?)",
                            "load the model with a fast tokenizer (tokenizer.json) to use generate.py")
        cfg = {"model": MODEL_FILE, "num_layers": spec.n_layers, "num_kv_heads": spec.n_kv_heads,
               "num_heads": spec.n_heads, "head_dim": spec.head_dim, "vocab_size": spec.vocab,
               "eos_token_ids": _eos_ids(loaded), "source": loaded.source.display,
               "budget_bytes": plan.budget_bytes if plan else None,
               "inputs": ["input_ids", "attention_mask", "position_ids", "past_key_values.{i}.key|value"],
               "outputs": ["logits", "present.{i}.key|value"]}
        (staging / CONFIG_FILE).write_text(json.dumps(cfg, indent=1) + "\n")
        (staging / "generate.py").write_text(GENERATE_PY)
        written = []
        for f in sorted(staging.iterdir()):
            os.replace(f, out_dir / f.name)
            written.append(f.name)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------- ONNX Runtime


class OrtDecoder:
    """The exported decoder in an ONNX Runtime CPU session."""

    def __init__(self, path: str | Path, *, threads: int | None = None, optimized_path: str | Path | None = None,
                 accuracy_level: int | None = None) -> None:
        ort = _ort()
        self.path = Path(path)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        if optimized_path is not None:
            so.optimized_model_filepath = str(optimized_path)
        if accuracy_level is not None:  # ORT's default for fused QDQ MatMuls is 4 (int8 activations)
            so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
        try:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT raises its own Fail/InvalidGraph/... types for a bad file
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CvxqError(f"ONNX Runtime cannot load {path}: {first[:300]}",
                            "the file is damaged or incomplete (with its .data file beside it?): write it again") from None
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        if not past:
            raise CvxqError(f"{path} has no past_key_values inputs: it is not a decoder this tool wrote",
                            "pass the model.onnx that `cvxq-export fit --format onnx` wrote")
        self.n_layers = len(past) // 2
        shape = past[0].shape  # [batch, kv_heads, past, head_dim]
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])

    def empty_past(self, batch: int = 1) -> dict[str, np.ndarray]:
        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
        return {f"past_key_values.{i}.{kv}": z for i in range(self.n_layers) for kv in ("key", "value")}

    def forward(self, ids: np.ndarray, past: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, dict]:
        """ids [B, T] -> logits [B, T, V], present cache (past grown by T)."""
        past = past if past is not None else self.empty_past(ids.shape[0])
        p = next(iter(past.values())).shape[2]
        b, t = ids.shape
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((b, p + t), np.int64),
                 "position_ids": np.broadcast_to(np.arange(p, p + t, dtype=np.int64), (b, t)).copy(), **past}
        try:
            logits, *present = self.session.run(None, feeds)
        except Exception as exc:  # noqa: BLE001 - ORT's Fail/RuntimeException types for a graph that cannot run
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CvxqError(f"ONNX Runtime could not run {self.path}: {first[:300]}",
                            "the file is damaged (it loaded but a node fails on its data): write it again") from None
        names = [f"past_key_values.{i}.{kv}" for i in range(self.n_layers) for kv in ("key", "value")]
        return logits, dict(zip(names, present))

    def greedy(self, prompt: list[int], n_new: int) -> tuple[list[int], float]:
        """Greedy continuation with the KV cache; returns tokens and decode tokens/s."""
        logits, past = self.forward(np.array([prompt]))
        out = [int(logits[0, -1].argmax())]
        t0 = time.perf_counter()
        for _ in range(n_new - 1):
            logits, past = self.forward(np.array([[out[-1]]]), past)
            out.append(int(logits[0, -1].argmax()))
        dt = time.perf_counter() - t0
        return out, (n_new - 1) / dt if dt > 0 and n_new > 1 else 0.0

    def perplexity(self, windows: np.ndarray, *, progress: bool = True, desc: str = "eval onnxruntime"):
        """Each window from an empty cache, the first token unscored (evaluate.py's protocol)."""
        from tqdm.auto import tqdm

        from ...evaluate import EvalResult, perplexity_from_nll

        nll, count = 0.0, 0
        for row in tqdm(windows, desc=desc, unit="window", disable=not progress):
            logits, _ = self.forward(np.asarray(row)[None])
            z = logits[0, :-1].astype(np.float64)  # [T-1, V]
            m = z.max(1, keepdims=True)
            logp = z - m - np.log(np.exp(z - m).sum(1, keepdims=True))
            nll -= float(logp[np.arange(len(row) - 1), np.asarray(row)[1:]].sum())
            count += len(row) - 1
        mean = nll / count
        return EvalResult(perplexity_from_nll(mean), mean, count, len(windows), int(windows.shape[1]))


@dataclass
class FusionReport:
    matmulnbits: int  # MatMulNBits nodes in ORT's optimized graph
    expected: int  # DequantizeLinear -> MatMul pairs written
    gather_block_quantized: int
    unfused_dequantize: int  # DequantizeLinear nodes left (each dequantizes its weight on every run)
    unfused_weights: list[str]
    bits: dict[str, int]  # MatMulNBits count per bit width
    accuracy_levels: list[int]

    @property
    def ok(self) -> bool:
        return (self.matmulnbits == self.expected and self.unfused_dequantize == 0 and not self.unfused_weights
                and self.gather_block_quantized == 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def check_fusion(artifact: OnnxArtifact) -> FusionReport:
    """Load in ORT with every optimization, save its optimized graph, and check that each
    quantized weight ended in a MatMulNBits (the embedding in GatherBlockQuantized)."""
    onnx = _onnx()
    with tempfile.TemporaryDirectory(prefix="cvxq-onnx-opt-") as tmp:
        opt = Path(tmp) / "optimized.onnx"
        OrtDecoder(artifact.path, optimized_path=opt)
        model = onnx.load(str(opt), load_external_data=False)
    nodes = model.graph.node
    fused = [n for n in nodes if n.op_type == "MatMulNBits"]
    b_inputs = {n.input[1] for n in fused}
    # ORT names the fused B after the DequantizeLinear's initializer (e.g. "<name>_T")
    unfused = [w for w in artifact.quantized_initializers if not any(b.startswith(w) for b in b_inputs)]
    bits: dict[str, int] = {}
    levels = set()
    for n in fused:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        bits[str(attrs.get("bits", 4))] = bits.get(str(attrs.get("bits", 4)), 0) + 1
        levels.add(int(attrs.get("accuracy_level", 0)))
    return FusionReport(len(fused), artifact.n_quantized_matmuls,
                        sum(n.op_type == "GatherBlockQuantized" for n in nodes),
                        sum(n.op_type == "DequantizeLinear" for n in nodes), unfused, dict(sorted(bits.items())),
                        sorted(levels))


# --------------------------------------------------------------------------- verify


def set_reference_weights(loaded: LoadedModel, weights: OnnxWeights) -> None:
    """Put the weights the ONNX graph computes with into the PyTorch model, in place.
    A tied embedding is untied: the graph embeds fp16-rounded rows (GatherBlockQuantized's
    output type) and its head multiplies by the same codes in fp32 (MatMulNBits)."""
    import torch

    model = loaded.model
    with torch.no_grad():
        for lin in list(weights.linears.values()) + ([weights.head] if weights.head is not None else []):
            ref = lin.ref
            param = model.get_parameter(ref.name)
            t = torch.from_numpy(lin.dequant)
            param.copy_((t.t() if ref.transposed else t).to(param.dtype))
        emb = weights.embedding
        model.get_input_embeddings().weight = torch.nn.Parameter(torch.from_numpy(emb.dequant_gather).clone(),
                                                                 requires_grad=False)
        if weights.head is None:
            model.get_output_embeddings().weight = torch.nn.Parameter(torch.from_numpy(emb.dequant_head).clone(),
                                                                      requires_grad=False)


def _torch_greedy(model, prompt: list[int], n_new: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(n_new):  # full recompute: independent of any cache implementation
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


def _logit_diff(got: np.ndarray, ref: np.ndarray) -> dict:
    scale = float(np.abs(ref).max())
    return {"max_abs_diff": float(np.abs(got - ref).max()), "max_abs_logit": scale,
            "relative": float(np.abs(got - ref).max() / scale),
            "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean())}


def verify_onnx(loaded: LoadedModel, artifact: OnnxArtifact, *, eval_windows: np.ndarray | None = None,
                prompts: tuple[str, ...] = PROMPTS, n_new: int = 12, progress: bool = True,
                threads: int | None = None) -> dict:
    """Checks in the real runtime; ``loaded`` must already hold the reference weights
    (:func:`set_reference_weights`).

    Two ORT sessions on the same file. ORT's default for fused QDQ MatMuls is
    accuracy level 4: MatMulNBits quantizes the *activations* to int8 per block, the
    fast path users get, which moves SmolLM2's perplexity by ~1 % from fp32 (measured:
    24.534 PyTorch, 24.535 ORT level 0, 24.963 ORT level 4 on 3 windows). So the
    exactness checks (logits, greedy generation, perplexity within 0.5 %) run at
    accuracy level 0 (fp32 compute: the graph and its weights against PyTorch), and
    the default level's perplexity and generations are reported next to them.
    """
    import torch

    onnx = _onnx()
    onnx.checker.check_model(str(artifact.path))
    fusion = check_fusion(artifact)
    if not fusion.ok:
        raise CvxqError(f"ONNX Runtime left quantized weights unfused: {fusion.to_dict()}",
                        "this is a bug in the graph writer (a weight not fused is dequantized on every run); please report it")
    exact = OrtDecoder(artifact.path, threads=threads, accuracy_level=0)
    default = OrtDecoder(artifact.path, threads=threads)
    result: dict = {"checker": "passed", "fusion": fusion.to_dict(),
                    "accuracy_levels": {"exact": 0, "default": 4}}
    tok = loaded.tokenizer
    encoded = [(p, tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    encoded = [(p, e) for p, e in encoded if e]
    ids = np.array([encoded[0][1]])
    with torch.no_grad():
        ref = loaded.model(input_ids=torch.from_numpy(ids)).logits[0].float().numpy()
    result["logits"] = _logit_diff(exact.forward(ids)[0][0], ref)
    result["logits_default"] = _logit_diff(default.forward(ids)[0][0], ref)
    gens = []
    for p, e in encoded:
        t_tokens = _torch_greedy(loaded.model, e, n_new)
        x_tokens, _ = exact.greedy(e, n_new)
        d_tokens, tps = default.greedy(e, n_new)
        gens.append({"prompt": p, "onnxruntime": tok.decode(d_tokens), "identical": x_tokens == t_tokens,
                     "identical_default": d_tokens == t_tokens, "decode_tokens_per_s": tps})
    result["generation"] = gens
    result["greedy_identical"] = all(g["identical"] for g in gens)
    result["greedy_identical_default"] = all(g["identical_default"] for g in gens)
    if eval_windows is not None:
        result["eval"] = evaluate_onnx(loaded, artifact.path, eval_windows, progress=progress, threads=threads)
    return result


def evaluate_onnx(loaded: LoadedModel, path: str | Path, eval_windows: np.ndarray, *, progress: bool = True,
                  threads: int | None = None) -> dict:
    """Perplexity in ONNX Runtime at accuracy level 0 (fp32 compute: must match PyTorch on the
    same weights within 0.5 %) and at the default level 4 (what users run), next to PyTorch's;
    ``loaded`` must hold the file's weights (:func:`set_reference_weights`)."""
    from ...evaluate import evaluate

    exact = OrtDecoder(path, threads=threads, accuracy_level=0)
    default = OrtDecoder(path, threads=threads)
    t_ppl = evaluate(loaded.model, eval_windows, progress=progress, desc="eval torch (onnx weights)")
    x_ppl = exact.perplexity(eval_windows, progress=progress, desc="eval onnxruntime (accuracy level 0)")
    d_ppl = default.perplexity(eval_windows, progress=progress, desc="eval onnxruntime (default, level 4)")
    rel = abs(x_ppl.perplexity - t_ppl.perplexity) / t_ppl.perplexity
    return {"torch_perplexity": t_ppl.perplexity, "onnxruntime_exact_perplexity": x_ppl.perplexity,
            "relative_difference": rel, f"within_{100 * PPL_TOLERANCE:g}_percent": rel <= PPL_TOLERANCE,
            "onnxruntime_perplexity": d_ppl.perplexity,
            "default_relative_difference": (d_ppl.perplexity - t_ppl.perplexity) / t_ppl.perplexity,
            "windows": d_ppl.windows, "seq_len": d_ppl.seq_len}


# --------------------------------------------------------------------------- all together


def export_onnx(loaded: LoadedModel, sens, budget: int, out_dir: Path, *, eval_windows: np.ndarray | None = None,
                progress: bool = True, plan: Plan | None = None, col_group: int = DEFAULT_COL_GROUP,
                max_options: int = MAX_OPTIONS, qmenu: QdqMenu | None = None, verify: bool = True,
                hessians: dict[str, np.ndarray] | None = None, decode_speed: float | None = None) -> dict:
    """Plan (unless given) with non-default menu settings (``col_group``, ``max_options``), then
    :func:`write_and_verify` and, with ``eval_windows``, :func:`evaluate_onnx` (in
    ``info["verify"]["eval"]``). ``fit`` goes through :class:`.format.OnnxFormat` instead."""
    t0 = time.perf_counter()
    if plan is None:
        plan, _ = plan_onnx(loaded, sens, budget, col_group=col_group, max_options=max_options, progress=progress,
                            qmenu=qmenu, decode_speed=decode_speed)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    plan.save(Path(out_dir) / "plan.json")
    t_plan = time.perf_counter()
    info = write_and_verify(loaded, sens, plan, out_dir, progress=progress, hessians=hessians, verify=verify)
    info["timings"]["plan_s"] = t_plan - t0
    if verify and eval_windows is not None:
        info["verify"]["eval"] = evaluate_onnx(loaded, info["path"], eval_windows, progress=progress)
    return info


def write_and_verify(loaded: LoadedModel, sens, plan: Plan, out_dir: Path, *, progress: bool = True,
                     hessians: dict[str, np.ndarray] | None = None, verify: bool = True) -> dict:
    """Quantize under ``plan``, write model.onnx + tokenizer + generate.py, and check the file in
    ONNX Runtime (checker, fusion, logits and greedy generation against PyTorch). The PyTorch
    model is left holding the exported weights."""
    check_supported(loaded)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    weights = quantize_for_onnx(loaded, sens, plan, progress=progress, hessians=hessians)
    artifact = write_onnx(loaded, weights, out_dir / MODEL_FILE, plan.budget_bytes)
    extras = write_extras(loaded, out_dir, plan)
    t_write = time.perf_counter()
    set_reference_weights(loaded, weights)
    splits = {"matrices": len(weights.linears) + (weights.head is not None),
              "split": sum(len(l.splits) > 1 for l in weights.linears.values()),
              "with_dropped_groups": sum(not l.full_input and sum(len(s.columns) for s in l.splits) < l.ref.cols
                                         for l in weights.linears.values()),
              "down_proj_permutation_folded": sum(l.out_perm is not None for l in weights.linears.values()) // 2}
    emb = weights.embedding
    info: dict = {
        "path": str(artifact.path), "file_bytes": artifact.size, "budget_bytes": plan.budget_bytes,
        "opset": artifact.opset, "tied_head_shares_embedding_bytes": artifact.tied_head,
        "embedding_option": emb.option.name, "options_by_weights": option_counts(plan),
        "splits": splits, "lossless_weights": weights.lossless, "extras": extras, "plan": plan.summary(),
        "bias_correction": "not applied: dropped (zero-bit) column groups contribute nothing",
        "error_feedback": "gptq-blockwise" if hessians else "none",
        "source_grid_note": _source_grid_note(loaded, weights),
        "timings": {"quantize_write_s": t_write - t0},
    }
    if verify:
        info["verify"] = verify_onnx(loaded, artifact, progress=progress)
        info["timings"]["verify_s"] = time.perf_counter() - t_write
    return info


def _source_grid_note(loaded: LoadedModel, weights: OnnxWeights) -> str | None:
    """Say when options reproduced the source's grid (SmolLM2's GGUF is Q4_1 + a Q8_0 embedding)."""
    total = sum(r.numel for r in loaded.weights)
    exact = sum(weights.lossless.values())
    if not exact:
        return None
    parts = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in sorted(weights.lossless.items(), key=lambda kv: -kv[1]) if v)
    return (f"{exact / total:.1%} of the weights are reproduced bit for bit ({parts}): uint4-b32-offset is llama.cpp's "
            "Q4_1 grid and int8-b32-sym its Q8_0 grid, which a GGUF source such as SmolLM2's already sits on")
