"""A decode-time model for the ONNX menu: what a plan costs ONNX Runtime per token.

Decoding one token runs every fused MatMulNBits at one activation row. The model:

    step_us = graph_us_per_layer x layers                     (attention, norms: every plan alike)
            + sum over weights of ns_per_weight[option] / 1000 (the head: its own ``head`` entry)
            + call_us x MatMulNBits calls  (+ offset_us per offset product)
            + gather_us x parts of split matrices

fitted by ``benchmarks/bench_onnx_inmodel.py`` (least squares over ~80 whole
SmolLM2-shaped decoders with random codes: uniform, all-dropped and random mixed
plans, 2 threads, accuracy level 4, this project's CI machine; the table ships as
``decode_costs.json``: rerun it on the target to refit). The per-call cost is
pinned at 3 us, not fitted: calls and per-weight costs are nearly collinear, and a free
fit puts weight time into calls (11.75-18 us a call), which lets the planner buy "cheap"
fused calls with slow offsets (a 108.8 MB plan modeled at 0.95x ORT's RTN file measures
0.86x); ORT's unfused RTN graph, 90 calls more than our fused one, is ~3 % slower,
~3 us a call. Pinned, the fit is better (median residual 2.7 % against 4.4 %)
and includes a real plan's variants (its 8-bit, offset and head choices moved to
4-bit blocks of 64; ``--plan-variants``), where the planner needs it right. Why whole models:
timing each option on one matrix at a time (``bench_onnx_kernels.py``, the table's
``isolated_*`` entries) stays in the 32 MB L3 cache and mixes the costs of plans up: it
predicts a 90 MB plan at 1.11x a uniform 4-bit block-64 model that measures 1.30-1.37x;
the whole-model fit predicts 1.33x (and the plan's variants with
the 32-blocks, the 8-bit or the offset parts replaced, within 3 %).

Calls are counted on the whole plan, as the graph builder writes it: q/k/v and
gate/up with the same single option are one call. The allocator's per-unit times
(:func:`unit_times_us`) hold only the per-weight part, which is what keeps them
separable; calls and splits are charged on the whole plan (:func:`plan_time_us`)
by the planner's bisection on the time multiplier.

Why it exists: at the same file size, the option that loses least is not always one
ORT runs fast (blocks of 32 and 16, 8-bit codes and offsets each cost a measured
~10-40 % more per weight than 4-bit blocks of 64), and users deploy for decode speed
as much as for size. ``plan_onnx(..., decode_limit_us=...)`` keeps the modeled time
under a limit; ``rtn_reference`` gives the modeled time of ORT's own RTN quantizer's
file of about the same size (uniform ``uint4`` asymmetric blocks) to set it from:
``fit --format onnx --decode-speed 0.9`` asks for at least 0.9x that speed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ...errors import CvxqError
from .qdq import OPTION_INDEX, OPTIONS, ZERO, QdqOption, QdqTensorUnits


@dataclass(frozen=True)
class OptionCost:
    call_us: float  # per MatMulNBits call (the offset kind's product included)
    ns_per_weight: float


TABLE = Path(__file__).with_name("decode_costs.json")  # written by benchmarks/bench_onnx_inmodel.py
RTN_BLOCKS = (32, 64, 128)  # the block sizes of ORT's RTN quantizer that "the same size" is matched among
FUSED_WITH = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}  # read the same input: one call


@lru_cache(maxsize=1)
def _table() -> dict:
    return json.loads(TABLE.read_text())


def decode_costs() -> dict[str, OptionCost]:
    """Option name -> fitted cost, from the table shipped with the package."""
    return {name: OptionCost(float(c["call_us"]), float(c["ns_per_weight"])) for name, c in _table()["options"].items()}


def split_part_us() -> float:
    """Modeled cost of each part of a matrix that is split (or drops groups) besides its
    call: the Gather (or Slice) of its input columns (``gather_us``, measured on a
    [1, 1, 576] row)."""
    return float(_table()["gather_us"])


def graph_us(n_layers: int) -> float:
    """Modeled decode time of everything but the weight products (the same for every plan)."""
    return float(_table()["graph_us_per_layer"]) * n_layers


# Measured ratios of our files to ORT's RTN files scatter by about +-5 % around the modeled
# ratio (paired runs of the same two files: 0.89 and 0.95 where the model said 0.90), so the
# planner aims that much faster than asked.
PLAN_MARGIN = 0.05


def planned_speed(speed: float) -> float:
    """The modeled speed ratio the planner aims at for an asked ``speed``: R / (1 - margin)."""
    return speed / (1.0 - PLAN_MARGIN)


def products_limit_us(reference_us: float, speed: float, n_layers: int) -> float:
    """The most the weight products may take so that the whole step is at least ``speed``
    x as fast as one whose products take ``reference_us``: (graph + ref) / speed - graph."""
    g = graph_us(n_layers)
    return (g + reference_us) / speed - g


def _nearest(option: QdqOption, names) -> QdqOption | None:
    same = [o for o in OPTIONS if o.name in names and o.bits == option.bits and o.kind == option.kind] or \
        [o for o in OPTIONS if o.name in names and o.bits == option.bits]
    return min(same, key=lambda o: abs(np.log2(o.block) - np.log2(option.block))) if same else None


def option_cost(option: QdqOption) -> OptionCost:
    """The fitted cost of ``option``; one the table lacks (options the default menu does
    not offer) takes the one of the same bits and kind with the nearest block."""
    if option.kind == "zero":
        return OptionCost(0.0, 0.0)
    costs = decode_costs()
    if option.name in costs:
        return costs[option.name]
    near = _nearest(option, costs)
    if near is None:
        raise CvxqError(f"no decode cost for {option.name} in {TABLE}",
                        "rerun benchmarks/bench_onnx_inmodel.py --write-table")
    return costs[near.name]


def head_ns_per_weight(option: QdqOption) -> float:
    """The output head's fitted ns per weight at ``option`` (its N is the vocabulary:
    per weight it costs more than a block matrix); nearest block where not fitted."""
    heads = _table().get("head", {})
    if option.name in heads:
        return float(heads[option.name]["ns_per_weight"])
    near = _nearest(option, heads)
    return float(heads[near.name]["ns_per_weight"]) if near is not None else option_cost(option).ns_per_weight


def _is_head(tu: QdqTensorUnits) -> bool:
    return tu.ref.role == "head" or (tu.role == "embedding" and tu.tied_head)


def _ns(tu: QdqTensorUnits, option: QdqOption) -> float:
    return head_ns_per_weight(option) if _is_head(tu) else option_cost(option).ns_per_weight


def unit_times_us(tensors: list[QdqTensorUnits]) -> np.ndarray:
    """[n_units, len(OPTIONS)] modeled per-weight decode microseconds of each unit at each
    option (calls and splits: :func:`plan_time_us`). The tied embedding's unit carries the
    output head's product (the gather is one row)."""
    t = np.zeros((max(tu.start + tu.n_units for tu in tensors), len(OPTIONS)))
    for tu in tensors:
        if tu.role == "embedding" and not tu.tied_head:
            continue  # an untied embedding is only gathered: its head is its own tensor
        rows = slice(tu.start, tu.start + tu.n_units)
        weights = tu.ref.rows * tu.group  # per unit
        for j in tu.legal:
            t[rows, j] = weights * _ns(tu, OPTIONS[j]) / 1000.0
    return t


def fusion_key(name: str) -> str:
    """Tensors with the same key read the same input (q/k/v, gate/up)."""
    for part, into in FUSED_WITH.items():
        if f".{part}." in name:
            return name.replace(f".{part}.", f".{into}.")
    return name


def calls_us(tensors: list[QdqTensorUnits], choice: np.ndarray) -> float:
    """What the plan's MatMulNBits calls cost per token: one per non-zero option of each
    matrix, siblings that read the same input at the same single option counted once
    (the graph fuses them), plus the offset kind's product once per (fused) matrix."""
    zero = OPTION_INDEX[ZERO]
    groups: dict[str, list[tuple[int, ...]]] = {}
    for tu in tensors:
        if tu.role == "embedding" and not tu.tied_head:
            continue
        used = tuple(sorted(set(np.unique(choice[tu.start:tu.start + tu.n_units]).tolist())))
        groups.setdefault(fusion_key(tu.ref.name), []).append(used)
    total = 0.0
    for members in groups.values():
        fused = len(members) > 1 and len(set(members)) == 1 and len(members[0]) == 1 and members[0][0] != zero
        for used in (members[:1] if fused else members):
            for j in used:
                if j != zero:
                    total += option_cost(OPTIONS[j]).call_us
    return total


def split_us(tensors: list[QdqTensorUnits], choice: np.ndarray) -> float:
    """What the plan's split matrices add per token besides their calls
    (:func:`split_part_us` per part of a matrix that is split or drops column groups)."""
    zero = OPTION_INDEX[ZERO]
    total = 0.0
    for tu in tensors:
        if tu.role != "linear":
            continue
        used = set(np.unique(choice[tu.start:tu.start + tu.n_units]).tolist())
        parts = len(used - {zero})
        if parts > 1 or (zero in used and parts):
            total += parts * split_part_us()
    return total


def plan_time_us(tensors: list[QdqTensorUnits], choice: np.ndarray, times: np.ndarray | None = None) -> float:
    """Modeled decode microseconds of the plan's weight products: per weight, calls, splits."""
    times = unit_times_us(tensors) if times is None else times
    return float(times[np.arange(len(choice)), choice].sum()) + calls_us(tensors, choice) + split_us(tensors, choice)


def reference_decode_us(tensors: list[QdqTensorUnits], option: QdqOption) -> float:
    """Modeled decode time of every matrix (and the head) at one ``option``, with q/k/v and
    gate/up as one call each (ORT's RTN files call them apart, measured 3-10 % slower than
    our fused uniform graph: counting them fused makes the reference a little faster,
    the limit a little stricter)."""
    choice = np.full(max(tu.start + tu.n_units for tu in tensors), OPTION_INDEX[option])
    weights = sum(tu.ref.rows * tu.ref.cols * _ns(tu, option) / 1000.0
                  for tu in tensors if not (tu.role == "embedding" and not tu.tied_head))
    return weights + calls_us(tensors, choice)


def rtn_file_bytes(tensors: list[QdqTensorUnits], block: int) -> int:
    """What ORT's ``MatMulNBitsQuantizer`` writes for these weights (4-bit asymmetric,
    ``block``): per matrix rows x whole blocks (a partial last block padded) x (codes +
    fp32 scale + 4-bit zero point), a tied embedding twice (the gathered table and an
    untied head). Graph bytes left out (under 1 MB for SmolLM2)."""
    total = 0.0
    for tu in tensors:
        blocks = -(-tu.ref.cols // block)
        per_matrix = tu.ref.rows * blocks * (block * 4 / 8 + 4 + 0.5)
        total += per_matrix * (2 if tu.role == "embedding" and tu.tied_head else 1)
    return int(total)


@dataclass(frozen=True)
class SpeedReference:
    block: int  # ORT RTN block size whose file is nearest the budget
    rtn_bytes: int
    decode_us: float  # its modeled decode time


def rtn_reference(tensors: list[QdqTensorUnits], budget: int) -> SpeedReference:
    """ORT's own 4-bit RTN model "of the same size": the block (of ``RTN_BLOCKS``) whose
    file is nearest ``budget`` bytes, and its modeled decode time."""
    sizes = {b: rtn_file_bytes(tensors, b) for b in RTN_BLOCKS}
    block = min(RTN_BLOCKS, key=lambda b: abs(sizes[b] - budget))
    return SpeedReference(block, sizes[block], reference_decode_us(tensors, QdqOption(4, block, "asym")))


def plan_choice(tensors: list[QdqTensorUnits], unit_maps: dict[str, np.ndarray]) -> np.ndarray:
    """The flat per-unit option indices of a plan (``TensorPlan.unit_map`` by tensor name)."""
    choice = np.zeros(max(tu.start + tu.n_units for tu in tensors), np.int64)
    for tu in tensors:
        choice[tu.start:tu.start + tu.n_units] = unit_maps[tu.ref.name]
    return choice


def modeled_step_us(tensors: list[QdqTensorUnits], choice: np.ndarray, n_layers: int) -> float:
    """Modeled decode microseconds per token of a whole plan: graph + products + splits."""
    return graph_us(n_layers) + plan_time_us(tensors, choice)
