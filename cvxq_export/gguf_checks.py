"""A GGUF file checked before transformers or llama.cpp read it.

llama.cpp trusts the file: a block count of zero or a NaN epsilon trips an assertion
that aborts the whole process, a block count of 2^32-1 makes it allocate for hours,
a head count of zero divides by zero in transformers. Every check here reads only
the header (:mod:`.gguf_header`, milliseconds) and names the field and the fix.
"""
from __future__ import annotations

import math
from pathlib import Path

from .errors import CvxqError
from .gguf_header import GGUFHeader, ggml_block, read_gguf_header

MAX_HEADS = 1 << 14
MAX_CONTEXT = 1 << 24
MAX_WIDTH = 1 << 20  # embedding / feed-forward length
FLOAT_TYPES = (0, 1, 30)  # ggml F32, F16, BF16
FIX = "the file is damaged or was not written by a GGUF converter: convert or download it again"


def checked_gguf_header(path: str | Path) -> GGUFHeader:
    """The header of ``path`` after every check below; a clear error otherwise."""
    path = str(path)
    header = read_gguf_header(path)
    problems = _tensor_problems(header, path) + _hyperparameter_problems(header) + _tokenizer_problems(header)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CvxqError(f"{path} is not a usable GGUF model: {shown}", FIX)
    return header


def _tensor_problems(header: GGUFHeader, path: str) -> list[str]:
    if not header.tensors:
        return ["it holds no tensors"]
    size = Path(path).stat().st_size
    alignment = header.values.get("general.alignment", 32)
    problems = []
    seen = set()
    for t in header.tensors:
        if t.name in seen:
            problems.append(f"tensor {t.name!r} appears twice")
        seen.add(t.name)
        layout = ggml_block(t.ggml_type)
        if layout is None:
            problems.append(f"tensor {t.name!r} has unknown ggml type {t.ggml_type}")
            continue
        block, type_size = layout
        if not 1 <= len(t.shape) <= 4 or min(t.shape) < 1:
            problems.append(f"tensor {t.name!r} has shape {list(t.shape)}: 1 to 4 dimensions of at least 1")
            continue
        if len(t.shape) == 1 and t.ggml_type not in FLOAT_TYPES:
            # norms and biases enter element-wise adds and products, which llama.cpp runs on
            # float vectors only (anything else aborts the process mid-inference)
            problems.append(f"tensor {t.name!r} is a vector of ggml type {t.ggml_type}; vectors (norms, biases) "
                            "must be F32, F16 or BF16")
            continue
        if t.shape[0] % block:
            problems.append(f"tensor {t.name!r}: rows of {t.shape[0]} values are not whole blocks of {block}")
            continue
        nbytes = t.n_elements // block * type_size
        if t.offset % alignment:
            problems.append(f"tensor {t.name!r} starts at offset {t.offset}, not a multiple of the alignment {alignment}")
        if header.data_offset + t.offset + nbytes > size:
            problems.append(f"tensor {t.name!r} ({nbytes} bytes at offset {t.offset}) runs past the end of the file")
    return problems


TOKEN_ID_KEYS = ("bos", "eos", "unk", "pad", "sep", "cls", "mask", "eot", "eom")


def _tokenizer_problems(header: GGUFHeader) -> list[str]:
    """Special-token ids must name a token of the vocabulary (the tokenizer indexes it with them)."""
    n_tokens = header.array_lengths.get("tokenizer.ggml.tokens")
    if n_tokens is None:
        return []
    problems = []
    for kind in TOKEN_ID_KEYS:
        key = f"tokenizer.ggml.{kind}_token_id"
        if key in header.values:
            v = _number(header.values[key])
            if v is None or v != int(v) or not 0 <= v < n_tokens:
                problems.append(f"{key} = {header.values[key]!r} is not a token of the {n_tokens}-token vocabulary")
    return problems


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _hyperparameter_problems(header: GGUFHeader) -> list[str]:
    arch = header.architecture
    if arch is None:
        return ["general.architecture is missing"]
    hp = header.arch_values()
    problems = []

    def integer(key: str, lo: int, hi: int, required: bool = False) -> int | None:
        if key not in hp:
            if required:
                problems.append(f"{arch}.{key} is missing")
            return None
        v = hp[key]
        if isinstance(v, list):  # some architectures give a value per layer
            return None
        n = _number(v)
        if n is None or n != int(n) or not lo <= n <= hi:
            problems.append(f"{arch}.{key} = {v!r} (expected a whole number in {lo}..{hi})")
            return None
        return int(n)

    layers = {int(part) for t in header.tensors
              if t.name.startswith("blk.") and (part := t.name.split(".")[1]).isdigit()}
    integer("block_count", 1, max(layers) + 1 if layers else 1 << 12, required=True)
    heads = integer("attention.head_count", 1, MAX_HEADS)
    kv_heads = integer("attention.head_count_kv", 1, MAX_HEADS)
    if heads and kv_heads and heads % kv_heads:
        problems.append(f"{arch}.attention.head_count {heads} is not a multiple of head_count_kv {kv_heads}")
    integer("context_length", 1, MAX_CONTEXT)
    integer("embedding_length", 1, MAX_WIDTH)
    rope_dims = integer("rope.dimension_count", 2, MAX_WIDTH)
    if rope_dims is not None and rope_dims % 2:
        problems.append(f"{arch}.rope.dimension_count = {rope_dims} (expected an even number: rotations act on pairs)")
    integer("feed_forward_length", 1, MAX_WIDTH)
    for key in ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon"):
        if key in hp:
            eps = _number(hp[key])
            if eps is None or not math.isfinite(eps) or not 0 < eps < 1:
                problems.append(f"{arch}.{key} = {hp[key]!r} (expected a small positive number)")
    if "rope.freq_base" in hp:
        base = _number(hp["rope.freq_base"])
        if base is None or not math.isfinite(base) or base <= 0:
            problems.append(f"{arch}.rope.freq_base = {hp['rope.freq_base']!r} (expected a positive number)")
    return problems
