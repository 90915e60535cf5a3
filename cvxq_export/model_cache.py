"""The cache folder, and a converted copy of a GGUF source so that loading it again takes seconds.

transformers reads a GGUF file by parsing its whole header three times (config,
tokenizer, weights), building gguf-py's tensor-name tables hundreds of times and
dequantizing in NumPy: about 20 s for SmolLM2-135M on 2 cores, most of it parsing
the 49k-token vocabulary. The first load saves what it produced (config.json with
the fields completed from the header, the tokenizer files, the weights as
safetensors in the loaded dtype) under the cache folder, keyed by the file's
path, size and modification time and the dtype. Later loads read that copy: the
same config, tokenizer and bit-identical weights, in about 2 s.

The copy is written only when it takes under a quarter of the free disk space,
into a temporary folder renamed into place, so an interrupted write leaves no
half-written copy under the final name.
"""
from __future__ import annotations

import copy
import hashlib
import os
import shutil
from pathlib import Path

# A copy may take at most this fraction of the free space where the cache lives.
MAX_DISK_FRACTION = 0.25


def cache_dir() -> Path:
    """Where calibration statistics, menus and converted models are kept."""
    base = os.environ.get("CVXQ_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cvxq-export")
    return Path(base)


def converted_dir(gguf_path: str, dtype: str) -> Path:
    """The folder that holds (or would hold) the converted copy of ``gguf_path`` in ``dtype``."""
    st = os.stat(gguf_path)
    key = hashlib.sha256(f"{os.path.abspath(gguf_path)}|{st.st_size}|{st.st_mtime_ns}|{dtype}".encode())
    return cache_dir() / "models" / f"gguf-{key.hexdigest()[:20]}"


def cached_copy(gguf_path: str, dtype: str) -> Path | None:
    """The converted copy of ``gguf_path`` in ``dtype`` if one was saved, else None."""
    folder = converted_dir(gguf_path, dtype)
    return folder if (folder / "config.json").is_file() else None


def save_copy(gguf_path: str, dtype: str, model, tokenizer) -> Path | None:
    """Save ``model`` and ``tokenizer`` (just loaded from ``gguf_path``) as the converted
    copy; None when the disk is too full for it or the write fails (the load has
    succeeded anyway, so a failed copy only costs the next load its speed)."""
    final = converted_dir(gguf_path, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if weight_bytes > MAX_DISK_FRACTION * shutil.disk_usage(final.parent).free:
            return None
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        # transformers refuses save_pretrained on a model it loaded from GGUF (it counts as
        # quantized): the config and the weights are saved directly (tied weights once)
        from safetensors.torch import save_model

        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        if not _tokenizer_round_trips(tokenizer, tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            return None
        if final.exists():  # another process saved it meanwhile: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        os.replace(tmp, final)
        return final
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return None


# Text whose tokens must come out the same from the saved tokenizer: words, digits, spaces,
# a tab, a newline, accents and a control-token look-alike.
PROBE_TEXT = "Hello world! 12345 ünïcödé  two spaces\tand a tab\nnew line <s> </s>"


def _tokenizer_round_trips(tokenizer, folder: Path) -> bool:
    """Whether the tokenizer saved in ``folder`` reads back and tokenizes like ``tokenizer``
    (transformers cannot save every tokenizer it builds from a GGUF so that it loads again)."""
    from transformers import AutoTokenizer

    try:
        again = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        return again(PROBE_TEXT)["input_ids"] == tokenizer(PROBE_TEXT)["input_ids"]
    except Exception:  # noqa: BLE001 - any failure to read it back means: keep no copy
        return False
