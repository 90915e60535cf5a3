"""A decode-time model for the ONNX menu: what each option costs ONNX Runtime per token.

Decoding one token runs every fused MatMulNBits at one activation row, so its time
is a sum over matrices of what that matrix's option costs. Per matrix and option,

    t = call_us + weights * ns_per_weight / 1000      (microseconds)

fitted on ``benchmarks/bench_onnx_kernels.py``'s measurements of SmolLM2's matrix
shapes (2 threads, accuracy level 4, this project's CI machine; the table ships as
``onnx_decode_costs.json``: rerun the benchmark on the target to refit it). The fp16-offset kind's own nodes (block sums, their product with the
offsets, one more addend) are in its ``call_us`` and ``ns_per_weight``. A unit
(column group) pays its matrix's ``call_us`` in proportion to its weights, which
is exact for a matrix at one option and what keeps the model separable for the
allocator. A split matrix adds a Gather and a call per part (:func:`split_us`,
charged on the whole plan, not per unit). The rest of the graph (attention, norms:
the same for every plan) is one measured figure per layer, so that a speed *ratio*
can be turned into a limit on the products.

Why it exists: at the same file size, the option that loses least is not always one
ORT runs fast (8-bit codes read twice the bytes, 16-weight blocks do twice the
per-block work, an offset costs extra nodes), and users deploy for decode speed as
much as for size. ``plan_onnx(..., decode_limit_us=...)`` keeps the modeled time
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

from ..errors import CvxqError
from .onnx_qdq import OPTION_INDEX, OPTIONS, ZERO, QdqOption, QdqTensorUnits


@dataclass(frozen=True)
class OptionCost:
    call_us: float  # per matrix call
    ns_per_weight: float


TABLE = Path(__file__).with_name("onnx_decode_costs.json")  # written by benchmarks/bench_onnx_kernels.py
RTN_BLOCKS = (32, 64, 128)  # the block sizes of ORT's RTN quantizer that "the same size" is matched among


@lru_cache(maxsize=1)
def _table() -> dict:
    return json.loads(TABLE.read_text())


def decode_costs() -> dict[str, OptionCost]:
    """Option name -> fitted cost, from the table shipped with the package."""
    return {name: OptionCost(float(c["call_us"]), float(c["ns_per_weight"])) for name, c in _table()["options"].items()}


def split_part_us() -> float:
    """Modeled cost of each part of a matrix that is split (or drops groups): the Gather
    (or Slice) of its input columns plus one more MatMulNBits call, estimated as twice the
    measured Gather of a [1, 1, 576] row (``gather_us`` of the table)."""
    return 2.0 * float(_table()["gather_us"])


def split_us(tensors: list[QdqTensorUnits], choice: np.ndarray) -> float:
    """What the plan's split matrices add per token (:func:`split_part_us` per part of a
    matrix that is split or drops column groups)."""
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


def graph_us(n_layers: int) -> float:
    """Modeled decode time of everything but the weight products (the same for every plan)."""
    return float(_table()["graph_us_per_layer"]) * n_layers


def products_limit_us(reference_us: float, speed: float, n_layers: int) -> float:
    """The most the weight products may take so that the whole step is at least ``speed``
    x as fast as one whose products take ``reference_us``: (graph + ref) / speed - graph."""
    g = graph_us(n_layers)
    return (g + reference_us) / speed - g


def option_cost(option: QdqOption) -> OptionCost:
    """The fitted cost of ``option``; one the table lacks (options the default menu does
    not offer) takes the measured one of the same bits and kind with the nearest block."""
    if option.kind == "zero":
        return OptionCost(0.0, 0.0)
    costs = decode_costs()
    if option.name in costs:
        return costs[option.name]
    same = [o for o in OPTIONS if o.name in costs and o.bits == option.bits and o.kind == option.kind] or \
        [o for o in OPTIONS if o.name in costs and o.bits == option.bits]
    if not same:
        raise CvxqError(f"no decode cost for {option.name} in {TABLE}",
                        "rerun benchmarks/bench_onnx_kernels.py --write-table")
    best = min(same, key=lambda o: abs(np.log2(o.block) - np.log2(option.block)))
    return costs[best.name]


def unit_times_us(tensors: list[QdqTensorUnits]) -> np.ndarray:
    """[n_units, len(OPTIONS)] modeled decode microseconds of each unit at each option.
    The tied embedding's unit carries the output head's product (the gather is one row)."""
    t = np.zeros((max(tu.start + tu.n_units for tu in tensors), len(OPTIONS)))
    for tu in tensors:
        if tu.role == "embedding" and not tu.tied_head:
            continue  # an untied embedding is only gathered: its head is its own tensor
        rows = slice(tu.start, tu.start + tu.n_units)
        weights = tu.ref.rows * tu.group  # per unit
        for j in tu.legal:
            c = option_cost(OPTIONS[j])
            t[rows, j] = c.call_us / tu.n_units + weights * c.ns_per_weight / 1000.0
    return t


def reference_decode_us(tensors: list[QdqTensorUnits], option: QdqOption) -> float:
    """Modeled decode time of every matrix (and the head) at one ``option``."""
    c = option_cost(option)
    return sum(c.call_us + tu.ref.rows * tu.ref.cols * c.ns_per_weight / 1000.0
               for tu in tensors if not (tu.role == "embedding" and not tu.tied_head))


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
