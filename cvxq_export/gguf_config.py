"""Complete the config transformers builds from a GGUF header.

transformers' GGUF loader maps only some of llama.cpp's keys to config fields
(its ``GGUF_CONFIG_MAPPING``); the others keep their class defaults, so the
PyTorch model would compute something other than what llama.cpp runs from the
same file: Qwen 3's head size, Gemma's attention scale and sliding window,
Phi-3's partial rotary size. Calibrating that model would measure the wrong
function. Here the missing fields are set the way llama.cpp reads the header.
"""
from __future__ import annotations

from typing import Any


def _header_values(path: str) -> tuple[str, dict[str, Any]]:
    from .gguf_header import read_gguf_header

    header = read_gguf_header(path)
    return header.architecture or "", header.arch_values()


# llama.cpp scales Gemma's queries by 1/sqrt(head size), except for the 27B models,
# recognised by their layer count, where it uses 1/sqrt(hidden / heads).
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def complete_gguf_config(config, path: str) -> list[str]:
    """Set, in place, the fields llama.cpp reads from the header that transformers did not.
    Returns one line per field changed (for the log)."""
    arch, hp = _header_values(path)
    changes: list[str] = []

    def put(field: str, value) -> None:
        if value is None or getattr(config, field, None) == value:
            return
        changes.append(f"{field}: {getattr(config, field, None)} -> {value}")
        setattr(config, field, value)

    heads = int(config.num_attention_heads)
    head_dim = hp.get("attention.key_length")
    if head_dim is not None and hasattr(config, "head_dim"):
        put("head_dim", int(head_dim))
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    if arch in GEMMA_27B_LAYERS:
        big = int(config.num_hidden_layers) == GEMMA_27B_LAYERS[arch]
        put("query_pre_attn_scalar", int(config.hidden_size // heads) if big else head_dim)
        if "attention.sliding_window" in hp:
            put("sliding_window", int(hp["attention.sliding_window"]))
    if arch == "gemma2":
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if key in hp:
                put(key, float(hp[key]))
    if arch == "phi3":
        rotary = hp.get("rope.dimension_count")
        if rotary is not None and int(rotary) != head_dim:
            params = dict(getattr(config, "rope_parameters", None) or {})
            params["partial_rotary_factor"] = int(rotary) / head_dim
            put("rope_parameters", params)
        put("sliding_window", int(hp["attention.sliding_window"]) if "attention.sliding_window" in hp else None)
        if "attention.sliding_window" not in hp and getattr(config, "sliding_window", None) is not None:
            changes.append(f"sliding_window: {config.sliding_window} -> None")
            config.sliding_window = None
    pad = getattr(config, "pad_token_id", None)
    if pad is not None and not 0 <= int(pad) < int(config.vocab_size):  # a class default beyond this vocabulary
        changes.append(f"pad_token_id: {pad} -> None")
        config.pad_token_id = None
    return changes
