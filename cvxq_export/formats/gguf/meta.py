"""What a GGUF file carries besides the quantized matrices: metadata and tokenizer
(key/value pairs) and the small float tensors (norms, biases).

Two sources:

* a GGUF model: everything is copied from it;
* a Hugging Face directory: hyperparameters come from ``config.json`` as
  llama.cpp reads them (:mod:`.hparams`, per architecture), and
  the tokenizer from ``tokenizer.json`` (byte-level BPE, llama.cpp's ``gpt2``
  tokenizer model). llama.cpp also needs a *pre-tokenizer* name, which its
  converter picks from a hash table we do not have; instead we try llama.cpp's
  candidates and keep the first whose tokenization of a test text equals the
  Hugging Face tokenizer's, checked in llama.cpp itself (vocab-only load).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...architectures import CONVERT_HINT, architecture_of
from ...errors import CvxqError
from ...model import LoadedModel

# llama.cpp's token types
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
# Pre-tokenizer names llama.cpp knows for byte-level BPE models, most generic first.
PRE_CANDIDATES = ("gpt-2", "smollm", "llama-bpe", "qwen2", "gpt-4o", "default")
TOKENIZER_TEST_TEXT = ("Hello world! It's 2026: 12345 apples, 3.14 pies.\n\n  Indented\tline — ünïcödé, "
                       "emoji 🙂, CamelCaseWord and snake_case_word; x=y+1 'quoted' \"double\"   spaces.")


@dataclass
class KV:
    key: str
    value: Any
    vtype: Any  # gguf.GGUFValueType
    sub_type: Any = None


@dataclass
class GGUFSkeleton:
    arch: str
    kv: list[KV]
    float_tensors: dict[str, np.ndarray]  # GGUF name -> float32 array (norms, biases), numpy shape
    permute_qk: bool  # llama.cpp's llama arch wants Q/K rows interleaved per head
    notes: list[str] = field(default_factory=list)


def permute_for_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotary layout -> llama.cpp's (pairs interleaved within each head).
    w: [rows = n_head * head_dim, cols]; the same reindexing applies to importances."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _gguf():
    import gguf

    return gguf


def skeleton_from_gguf(loaded: LoadedModel, quantized_names: set[str]) -> GGUFSkeleton:
    """``quantized_names``: GGUF names of the matrices we write ourselves."""
    from ...gguf_header import read_gguf_header

    gguf = _gguf()
    path = loaded.source.path
    header = read_gguf_header(path, arrays=True)  # all of the metadata, in a fraction of GGUFReader's time
    arch = header.architecture
    kv = []
    for key, value in header.values.items():
        if key in ("general.architecture", "general.file_type"):
            continue
        vtype, item = header.types[key]
        kv.append(KV(key, value, gguf.GGUFValueType(vtype), gguf.GGUFValueType(item) if item is not None else None))
    floats = {}
    for t in header.tensors:
        if t.name in quantized_names:
            continue
        data = gguf.quants.dequantize(np.asarray(header.tensor_data(path, t)), gguf.GGMLQuantizationType(t.ggml_type))
        floats[t.name] = data.astype(np.float32).reshape(tuple(reversed(t.shape)))
    return GGUFSkeleton(arch, kv, floats, permute_qk=arch == "llama")


def tokenizer_kv(tokenizer, vocab_size: int, pre: str) -> list[KV]:
    """llama.cpp's ``gpt2`` (byte-level BPE) tokenizer from a HF fast tokenizer."""
    gguf = _gguf()
    T = gguf.GGUFValueType
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise CvxqError("the model's tokenizer has no tokenizer.json (fast tokenizer)",
                        CONVERT_HINT)
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise CvxqError(f"only byte-level BPE tokenizers are converted to GGUF (this one is {model.get('type')} with "
                        f"pre-tokenizer {(spec.get('pre_tokenizer') or {}).get('type')})",
                        CONVERT_HINT)
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [UNUSED] * n
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = NORMAL
    for content, t in added.items():
        types[t["id"]] = CONTROL if t.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    kv = [
        KV("tokenizer.ggml.model", "gpt2", T.STRING),
        KV("tokenizer.ggml.pre", pre, T.STRING),
        KV("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
        KV("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32),
        KV("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING),
    ]
    for name in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{name}_token_id", None)
        if tid is not None:
            kv.append(KV(f"tokenizer.ggml.{name}_token_id", int(tid), T.UINT32))
    bos = getattr(tokenizer, "bos_token_id", None)
    probe = tokenizer("a")["input_ids"]
    kv.append(KV("tokenizer.ggml.add_bos_token", bool(bos is not None and probe and probe[0] == bos), T.BOOL))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        kv.append(KV("tokenizer.chat_template", template, T.STRING))
    return kv


def _write_header_only(path: str, arch: str, kv: list[KV]) -> None:
    gguf = _gguf()
    writer = gguf.GGUFWriter(path, arch)
    for e in kv:
        writer.add_key_value(e.key, e.value, e.vtype, sub_type=e.sub_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()


def choose_pre_tokenizer(loaded: LoadedModel, arch: str, hparams: list[KV]) -> tuple[str, str]:
    """(pre-tokenizer name, how it was verified)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return "default", "not verified: llama-cpp-python is not installed"
    expected = [int(i) for i in loaded.tokenizer(TOKENIZER_TEST_TEXT, add_special_tokens=False)["input_ids"]]
    tried = []
    with tempfile.TemporaryDirectory() as tmp:
        for pre in PRE_CANDIDATES:
            path = os.path.join(tmp, f"vocab-{pre}.gguf")
            _write_header_only(path, arch, hparams + tokenizer_kv(loaded.tokenizer, loaded.config.vocab_size, pre))
            try:
                llm = Llama(model_path=path, vocab_only=True, verbose=False)
                got = llm.tokenize(TOKENIZER_TEST_TEXT.encode(), add_bos=False, special=False)
                del llm
            except Exception as exc:  # llama.cpp refused this pre-tokenizer name
                tried.append(f"{pre}: {exc}")
                continue
            if list(got) == expected:
                return pre, f"llama.cpp tokenizes the test text exactly like Hugging Face with pre='{pre}'"
            tried.append(f"{pre}: differs")
    raise CvxqError("no llama.cpp pre-tokenizer reproduces this tokenizer (" + "; ".join(tried) + ")",
                    CONVERT_HINT)


def skeleton_from_hf(loaded: LoadedModel) -> GGUFSkeleton:
    from .hparams import hyperparameters, model_name
    from .layout import layout_for, tensor_name_map

    layout = layout_for(loaded)
    arch = architecture_of(loaded.model_type)
    hparams, extra = hyperparameters(loaded.config, arch, model_name(loaded.source.path))
    pre, verified = choose_pre_tokenizer(loaded, layout.arch, hparams)
    kv = hparams + tokenizer_kv(loaded.tokenizer, loaded.config.vocab_size, pre)
    tmap = tensor_name_map(layout.arch, loaded.config.num_hidden_layers)
    skip = {ref.name for ref in loaded.weights}  # the matrices we quantize and write ourselves
    for ref in loaded.weights:
        skip.update(ref.also)
    floats: dict[str, np.ndarray] = dict(extra)
    cfg = loaded.config
    for name, param in loaded.model.named_parameters():
        if name in skip:
            continue
        gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise CvxqError(f"gguf-py's '{layout.arch}' tensor table has no name for parameter {name}",
                            CONVERT_HINT)
        data = param.detach().float().cpu().numpy()
        if layout.permute_qk and gname.endswith(("attn_q.bias", "attn_k.bias")):
            heads = cfg.num_attention_heads if "attn_q" in gname else (cfg.num_key_value_heads or cfg.num_attention_heads)
            data = permute_for_llama_cpp(data[:, None], heads)[:, 0]
        if layout.norm_offset and "norm" in gname.split(".")[-2]:
            data = data + np.float32(layout.norm_offset)  # Gemma: x * (1 + w) in HF, x * w' in llama.cpp
        floats[gname] = np.ascontiguousarray(data)
    return GGUFSkeleton(layout.arch, kv, floats, layout.permute_qk, notes=[f"tokenizer: {verified}"])


def skeleton_for(loaded: LoadedModel, quantized_names: set[str]) -> GGUFSkeleton:
    """Cached on ``loaded`` (the HF path runs llama.cpp tokenizer checks)."""
    cached = getattr(loaded, "_gguf_skeleton", None)
    if cached is None:
        cached = skeleton_from_gguf(loaded, quantized_names) if loaded.source.kind == "gguf" else skeleton_from_hf(loaded)
        loaded._gguf_skeleton = cached
    return cached
