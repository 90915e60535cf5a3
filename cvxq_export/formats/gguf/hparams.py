"""GGUF hyperparameters from a Hugging Face ``config.json``, per architecture,
as llama.cpp reads them.

Each architecture writes the keys its llama.cpp loader reads; a configuration
llama.cpp would compute differently (a rope scaling it has no key for, an
attention scale it derives another way, a sliding-window layout it does not
use) is refused with the pointer to llama.cpp's own converter, never written
approximately. The tests fit a tiny model of every architecture here and
compare llama.cpp's logits with PyTorch's.
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from ...architectures import CONVERT_HINT, Architecture
from ...errors import CvxqError
from .meta import KV


def _gguf():
    import gguf

    return gguf


def _rope(cfg, layer_type: str | None = None) -> dict[str, Any]:
    """The rope parameters as a flat dict (transformers 5 nests them per layer type for Gemma 3)."""
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if isinstance(params, dict) and layer_type and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    params = dict(params) if isinstance(params, dict) else {}
    params.setdefault("rope_theta", getattr(cfg, "rope_theta", None) or 10000.0)
    params.setdefault("rope_type", params.get("type") or "default")
    return params


def _refuse(what: str) -> CvxqError:
    return CvxqError(f"{what}: this tool's GGUF converter does not write it", CONVERT_HINT)


def head_dim(cfg) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def hyperparameters(cfg, arch: Architecture, name: str) -> tuple[list[KV], dict[str, np.ndarray]]:
    """(metadata, extra float tensors such as llama.cpp's ``rope_freqs``)."""
    T = _gguf().GGUFValueType
    a = arch.gguf_arch
    heads = int(cfg.num_attention_heads)
    hd = head_dim(cfg)
    kv = [
        KV("general.name", name, T.STRING),
        KV(f"{a}.context_length", int(cfg.max_position_embeddings), T.UINT32),
        KV(f"{a}.embedding_length", int(cfg.hidden_size), T.UINT32),
        KV(f"{a}.block_count", int(cfg.num_hidden_layers), T.UINT32),
        KV(f"{a}.feed_forward_length", int(cfg.intermediate_size), T.UINT32),
        KV(f"{a}.attention.head_count", heads, T.UINT32),
        KV(f"{a}.attention.head_count_kv", int(getattr(cfg, "num_key_value_heads", None) or heads), T.UINT32),
        KV(f"{a}.attention.layer_norm_rms_epsilon", float(cfg.rms_norm_eps), T.FLOAT32),
        KV(f"{a}.vocab_size", int(cfg.vocab_size), T.UINT32),
    ]
    if hd * heads != cfg.hidden_size or a in ("gemma2", "gemma3", "qwen3"):
        kv += [KV(f"{a}.attention.key_length", hd, T.UINT32), KV(f"{a}.attention.value_length", hd, T.UINT32)]
    extra: dict[str, np.ndarray] = {}
    if arch.model_type in ("llama", "mistral"):
        kv += _llama_rope(cfg, a, hd, extra)
        _no_sliding_window(cfg, arch)
    elif arch.model_type in ("qwen2", "qwen3"):
        kv += _plain_rope(cfg, a)
        if getattr(cfg, "use_sliding_window", False):
            raise _refuse(f"{arch.model_type} with use_sliding_window")
    elif arch.model_type == "gemma2":
        kv += _plain_rope(cfg, a) + _gemma_attention(cfg, a, hd, pattern=2)
        for key, attr in (("attn_logit_softcapping", "attn_logit_softcapping"),
                          ("final_logit_softcapping", "final_logit_softcapping")):
            value = getattr(cfg, attr, None)
            if value:
                kv.append(KV(f"{a}.{key}", float(value), T.FLOAT32))
    elif arch.model_type == "gemma3_text":
        kv += _gemma3_rope(cfg, a) + _gemma_attention(cfg, a, hd, pattern=6)
        if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "attn_logit_softcapping", None):
            raise _refuse("Gemma 3 with logit soft-capping")
    elif arch.model_type == "phi3":
        kv += _phi3(cfg, a, hd)
    else:  # pragma: no cover - the table and this function grow together
        raise _refuse(f"architecture '{arch.model_type}'")
    return kv, extra


def _plain_rope(cfg, a: str) -> list[KV]:
    T = _gguf().GGUFValueType
    rope = _rope(cfg)
    if rope["rope_type"] not in ("default", None):
        raise _refuse(f"rope type '{rope['rope_type']}' on {a}")
    return [KV(f"{a}.rope.freq_base", float(rope["rope_theta"]), T.FLOAT32)]


def _llama_rope(cfg, a: str, hd: int, extra: dict[str, np.ndarray]) -> list[KV]:
    T = _gguf().GGUFValueType
    rope = _rope(cfg)
    kv = [KV(f"{a}.rope.freq_base", float(rope["rope_theta"]), T.FLOAT32),
          KV(f"{a}.rope.dimension_count", hd, T.UINT32)]
    kind = rope["rope_type"]
    if kind == "linear":
        kv += [KV(f"{a}.rope.scaling.type", "linear", T.STRING),
               KV(f"{a}.rope.scaling.factor", float(rope["factor"]), T.FLOAT32)]
    elif kind == "llama3":
        extra["rope_freqs.weight"] = llama3_rope_factors(rope, hd)
    elif kind != "default":
        raise _refuse(f"rope type '{kind}'")
    return kv


def llama3_rope_factors(rope: dict[str, Any], hd: int) -> np.ndarray:
    """Llama 3's frequency-dependent rope scaling as llama.cpp applies it: one divisor per
    rotary frequency ([hd / 2] float32): 1 for short wavelengths, ``factor`` for long ones,
    and a smooth blend between ``original / high_freq_factor`` and ``original / low_freq_factor``."""
    factor = float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    original = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (float(rope["rope_theta"]) ** (np.arange(0, hd, 2, dtype=np.float64) / hd))  # [hd / 2]
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, blended))
    return out.astype(np.float32)


def _no_sliding_window(cfg, arch: Architecture) -> None:
    window = getattr(cfg, "sliding_window", None)
    if window and window < cfg.max_position_embeddings:
        raise _refuse(f"{arch.model_type} with a {window}-token sliding window (llama.cpp's llama graph attends "
                      "to the whole context)")


def _gemma_attention(cfg, a: str, hd: int, *, pattern: int) -> list[KV]:
    """Sliding window and attention scale; llama.cpp fixes both layouts (every ``pattern``-th
    layer global) and scales queries by 1/sqrt(head_dim)."""
    T = _gguf().GGUFValueType
    scalar = getattr(cfg, "query_pre_attn_scalar", None)
    if scalar is not None and int(scalar) != hd:
        raise _refuse(f"query_pre_attn_scalar {scalar} != head_dim {hd} (llama.cpp scales queries by 1/sqrt(head_dim))")
    types = getattr(cfg, "layer_types", None)
    # every pattern-th layer global, the others sliding (Gemma 2: alternating, sliding first)
    expected = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(cfg.num_hidden_layers)]
    if types is not None and list(types) != expected:
        raise _refuse(f"a layer pattern {list(types)[:8]}... other than llama.cpp's")
    return [KV(f"{a}.attention.sliding_window", int(cfg.sliding_window), T.UINT32)]


def _gemma3_rope(cfg, a: str) -> list[KV]:
    T = _gguf().GGUFValueType
    full, local = _rope(cfg, "full_attention"), _rope(cfg, "sliding_attention")
    if float(local["rope_theta"]) != 10000.0 or local["rope_type"] != "default":
        raise _refuse(f"Gemma 3 local rope base {local['rope_theta']} (llama.cpp uses 10000)")
    kv = [KV(f"{a}.rope.freq_base", float(full["rope_theta"]), T.FLOAT32)]
    if full["rope_type"] == "linear":
        kv += [KV(f"{a}.rope.scaling.type", "linear", T.STRING),
               KV(f"{a}.rope.scaling.factor", float(full["factor"]), T.FLOAT32)]
    elif full["rope_type"] != "default":
        raise _refuse(f"Gemma 3 rope type '{full['rope_type']}'")
    return kv


def _phi3(cfg, a: str, hd: int) -> list[KV]:
    T = _gguf().GGUFValueType
    rope = _rope(cfg)
    if rope["rope_type"] not in ("default", None):
        raise _refuse(f"Phi-3 rope scaling '{rope['rope_type']}' (llama.cpp needs its long/short factor tensors)")
    rotary = int(hd * float(rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0))
    kv = [KV(f"{a}.rope.freq_base", float(rope["rope_theta"]), T.FLOAT32),
          KV(f"{a}.rope.dimension_count", rotary, T.UINT32),
          KV(f"{a}.rope.scaling.original_context_length",
             int(getattr(cfg, "original_max_position_embeddings", None) or cfg.max_position_embeddings), T.UINT32)]
    window = getattr(cfg, "sliding_window", None)
    if window:
        kv.append(KV(f"{a}.attention.sliding_window", int(window), T.UINT32))
    return kv


def model_name(path: str) -> str:
    return os.path.basename(os.path.normpath(path))
