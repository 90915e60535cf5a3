"""A speed model for the GGUF menu: what each ggml type costs llama.cpp per token.

llama.cpp's CPU kernels differ per type far more than their bytes do. Measured
here (``docs/results/gguf/type_speed_table.json``, 2 threads, SmolLM2 shapes): every linear at
Q4_1 makes the whole decode step 1.41x and a 64-token prefill 2.36x slower than at
Q4_0 (Q5_1 1.60x / 2.74x, Q8_0 1.47x / 1.28x, F16 1.69x / 1.37x), while IQ4_NL is as
fast as Q4_0 and Q4_K on ffn_down faster: consistent with llama.cpp's CPU backend
repacking Q4_0 / IQ4_NL / Q4_K into interleaved rows for its fast matrix kernels,
and not the other types. The IQ2 / IQ3 types on ffn_down alone (20 % of the weights)
add 16-23 % to a decode step. An allocator that sees only bytes and distortion picks
Q4_1 wherever it is accurate (on SmolLM2 it is the source grid), and such files prefill
1.5-4x slower than llama.cpp's presets of the same size (mostly IQ4_NL / Q4_K / Q6_K).

The table (``speed_costs.json``, written by ``benchmarks/bench_gguf_types.py``)
holds, per tensor group (``linear``: every block matrix; ``down``: ffn_down, the only
SmolLM2 rows the 256-element types divide; ``head``: the tied embedding / output) and
type, the extra microseconds per token per weight over Q4_0, for decode and for
prefill, measured in whole SmolLM2-shaped files, plus the all-Q4_0 file's own step
times. A plan's modeled time per token is then

    base_us(phase) + sum over tensors of weights * extra_ns(group, type, phase) / 1000

and the planner weighs one generated and one prompt token alike (``speed_times_us``).
Why a reference "fastest file of the same size" rather than a preset: a preset's types
are cheap to get (llama.cpp's quantizer has a dry run, ``benchmarks/bench_llama_recipes.py``),
but "the preset of this size" is not well defined: llama.cpp's recipes of one size differ
by up to 1.5x in modeled time on SmolLM2, and the one of the nearest size jumps between
them as the budget moves. The fastest mix of our own menu at the budget is well defined
and computable from the table; llama.cpp's presets sit at 0.8-0.95 of it on SmolLM2. ``fit --format gguf --decode-speed R`` keeps the
modeled time within 1/R of that fastest mix.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from ...errors import CvxqError

TABLE = Path(__file__).with_name("speed_costs.json")  # written by benchmarks/bench_gguf_types.py
PHASES = ("decode", "prefill")


@lru_cache(maxsize=1)
def _table() -> dict:
    return json.loads(TABLE.read_text())


def tensor_group(gguf_name: str) -> str:
    """The table's group of a GGUF tensor name."""
    if gguf_name.startswith("token_embd") or gguf_name.startswith("output."):
        return "head"
    return "down" if gguf_name.endswith("ffn_down.weight") else "linear"


def extra_ns_per_weight(group: str, type_name: str, phase: str) -> float:
    """Measured extra ns per weight over Q4_0 (Q4_0 itself is 0). A group the type was not
    timed in takes the ``linear`` figure (a 32-element type on ffn_down), then ``down``
    (a 256-element type), then the head's; a type timed nowhere is an error."""
    if type_name == _table()["base_type"]:
        return 0.0
    extra = _table()["extra_ns_per_weight"]
    for g in (group, "linear", "down", "head"):
        if type_name in extra.get(g, {}):
            return float(extra[g][type_name][phase])
    raise CvxqError(f"no llama.cpp speed figure for {type_name} in {TABLE}",
                    "rerun benchmarks/bench_gguf_types.py --write-table with that type")


def base_us(phase: str) -> float:
    """Measured us per token of the all-Q4_0 file (decode step, or per prompt token)."""
    return float(_table()["base"][f"{phase}_us"])


def speed_times_us(gguf_names: list[str], weights: list[int], columns: tuple[str, ...],
                   legal: np.ndarray) -> np.ndarray:
    """[n_tensors, n_types] modeled extra us per token (one decode step plus one prompt
    token) of each tensor at each legal type, over Q4_0."""
    t = np.zeros((len(gguf_names), len(columns)))
    for i, (name, w) in enumerate(zip(gguf_names, weights)):
        group = tensor_group(name)
        for j, ty in enumerate(columns):
            if legal[i, j]:
                t[i, j] = w * sum(extra_ns_per_weight(group, ty, ph) for ph in PHASES) / 1000.0
    return t


def modeled_us(gguf_names: list[str], weights: list[int], types: list[str]) -> dict[str, float]:
    """Modeled us per token of a whole file, per phase."""
    out = {}
    for ph in PHASES:
        out[ph] = base_us(ph) + sum(w * extra_ns_per_weight(tensor_group(n), ty, ph) / 1000.0
                                    for n, w, ty in zip(gguf_names, weights, types))
    return out
