"""Memory: what a model needs to calibrate, what the machine has, and the
weight dtype that follows from both.

Everything here is read before any weight is loaded: the parameter count
comes from the safetensors headers (a few KB per file) or the tensor infos
in a GGUF file's header (memory-mapped, metadata values skipped), so a model
that cannot fit is refused in a second instead of after minutes of loading.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from .errors import CvxqError

GiB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Python, torch, transformers and the tokenizer once imported: measured ~0.5 GB RSS.
RUNTIME_BYTES = 600 << 20
# Part of the available memory left alone: the page cache, other processes, the allocator's slack.
SAFETY_FRACTION = 0.10


def available_bytes(device: str = "cpu") -> int:
    """Memory this process may still use on ``device``: free accelerator memory,
    or for the CPU the kernel's MemAvailable capped by a cgroup limit."""
    if str(device).startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    available = _meminfo_available()
    limit = _cgroup_room()
    return min(available, limit) if limit is not None else available


def _meminfo_available() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise CvxqError("cannot read the available memory (no psutil, no /proc/meminfo)", "pip install psutil")


def _cgroup_room() -> int | None:
    """Bytes left under a cgroup v2 memory limit (containers), None without one."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        return max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


# -- the model's size, from file headers only ---------------------------------

def parameter_count(source) -> int | None:
    """Number of weight elements of a model source (``model.ModelSource``),
    read from headers; None when the files say nothing cheap about it
    (PyTorch ``.bin`` checkpoints are pickles: their size is estimated instead)."""
    path = Path(source.path)
    if source.kind == "gguf":
        return _gguf_parameter_count(path)
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return sum(safetensors_parameter_count(p) for p in shards)
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:  # usually float32 or float16: take 2 bytes per element, the larger count
        return sum(p.stat().st_size for p in bins) // 2
    return None


def safetensors_parameter_count(path: Path) -> int:
    # The format: 8-byte little-endian header length, then a JSON header with
    # every tensor's dtype, shape and offsets; the data follows.
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        n = 1
        for dim in info["shape"]:
            n *= int(dim)
        total += n
    return total


def _gguf_parameter_count(path: Path) -> int:
    """Sum of the tensor infos' element counts, read from the header (:mod:`.gguf_header`)."""
    from .gguf_header import read_gguf_header

    return read_gguf_header(path).parameters


# -- what calibration needs ---------------------------------------------------

def _config_dims(config: Any) -> tuple[int, int, int, int, int]:
    """(hidden, ffn, layers, heads, vocab) of a transformers config, with the
    usual aliases of GPT-2 and OPT."""
    text = getattr(config, "get_text_config", lambda: config)()
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None) or 1024
    ffn = getattr(text, "intermediate_size", None) or getattr(text, "ffn_dim", None) or getattr(text, "n_inner", None) or 4 * hidden
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None) or 1
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None) or 1
    vocab = getattr(text, "vocab_size", None) or 32000
    return int(hidden), int(ffn), int(layers), int(heads), int(vocab)


def activation_bytes(config: Any, seq_len: int, itemsize: int) -> int:
    """Estimated activations one window keeps for its backward pass.

    Per layer and token a Llama-style block saves about a dozen hidden-sized
    tensors (norm inputs and outputs, q/k/v, attention output, residuals) and
    four ffn-sized ones (gate, up, their product, the activation); attention
    adds a ``[heads, T, T]`` score matrix when the kernel materialises it.
    """
    hidden, ffn, layers, heads, _vocab = _config_dims(config)
    per_layer = seq_len * (12 * hidden + 4 * ffn) * itemsize + 2 * heads * seq_len * seq_len * itemsize
    return layers * per_layer


def calibration_bytes(n_params: int, config: Any, dtype: str, seq_len: int = 512, row_group: int = 32) -> int:
    """Peak memory of calibrating a model of ``n_params`` weights in ``dtype``:
    the weights, the float64 statistics (one value per ``row_group`` rows of
    each weight), one window's activations (checkpointed where that is less),
    the largest weight's gradient and the runtime itself."""
    itemsize = DTYPE_BYTES[dtype]
    hidden, ffn, layers, _heads, vocab = _config_dims(config)
    weights = n_params * itemsize
    stats = n_params * 8 // row_group
    largest_grad = max(vocab * hidden, hidden * ffn) * itemsize + (64 << 20)  # + its float32 square, in 64 MB blocks
    full = activation_bytes(config, seq_len, itemsize)
    # With activation checkpointing (used when memory is short): each block's
    # input is kept, and one block's activations are rebuilt at a time.
    checkpointed = layers * seq_len * hidden * itemsize + full // layers
    return weights + stats + min(full, checkpointed) + largest_grad + RUNTIME_BYTES


def choose_dtype(requested: str, n_params: int | None, config: Any, *, device: str = "cpu", display: str = "the model",
                 offload: bool = False, seq_len: int = 512) -> str:
    """The dtype to load in: ``requested`` when explicit; for "auto", float32
    when calibrating in float32 fits the available memory (less a margin), else
    bfloat16 (float16 on a GPU without bfloat16). Raises CvxqError, before any
    weight is read, when the model does not fit even in 16 bits and no offload
    was asked for."""
    if requested not in ("auto", *DTYPE_BYTES):
        raise CvxqError(f"unknown dtype '{requested}'", f"use one of: auto, {', '.join(DTYPE_BYTES)}")
    half = "bfloat16"
    if str(device).startswith("cuda"):
        import torch

        half = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if n_params is None:  # nothing cheap to go by: keep the exact default
        return "float32" if requested == "auto" else requested
    room = int(available_bytes(device) * (1 - SAFETY_FRACTION))
    if requested == "auto":
        if calibration_bytes(n_params, config, "float32", seq_len) <= room:
            return "float32"
        chosen = half
    else:
        chosen = requested
    need = calibration_bytes(n_params, config, chosen, seq_len)
    if need > room and not offload:
        where = "GPU" if str(device).startswith("cuda") else "RAM"
        raise CvxqError(
            f"{display} ({n_params / 1e9:.2f}B parameters) needs about {need / GiB:.1f} GiB to calibrate in {chosen}, "
            f"but only {room / GiB:.1f} GiB of {where} is available",
            "use a machine with more memory, or offload part of the model: load_model(..., device_map='auto', "
            "max_memory={...}, offload_folder=DIR)",
        )
    return chosen


def model_bytes(model) -> int:
    """Bytes of a loaded model's parameters (tied ones once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
