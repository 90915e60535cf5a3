"""Perplexity inside llama.cpp (llama-cpp-python), same protocol as PyTorch:
each window from an empty cache, T - 1 scored tokens per window."""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ...errors import CvxqError, missing_extra
from ...evaluate import EvalResult, perplexity_from_nll


def _has_amx() -> bool:
    from llama_cpp import llama_print_system_info

    return b"AMX_INT8 = 1" in llama_print_system_info()


@contextmanager
def _without_extra_buffers():
    """Model parameters with ``use_extra_bufts`` off while a ``Llama`` is constructed.

    Why: on CPUs with AMX, a llama.cpp built natively puts quantized weights into its AMX
    buffer type, and ``llama_decode`` then crashes (segmentation fault, measured on this
    project's 2-core AMX machine with llama-cpp-python 0.3.36, for SmolLM2's own file and
    ours alike). ``Llama`` builds its parameters and loads the model in one constructor, so
    the defaults it reads are swapped for the duration. The plain CPU buffers compute the
    same values; only the speed of repacked types changes (so speed is measured on CPUs
    without AMX as before, and reported with this caveat on AMX ones).
    """
    from llama_cpp import llama_cpp as low

    default = low.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = default


def open_llama(path: str | Path, **kwargs):
    """``llama_cpp.Llama(model_path=path, **kwargs)``, the one way this project opens a GGUF
    in llama.cpp (see :func:`_without_extra_buffers` for what it does on AMX CPUs)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise missing_extra("llama_cpp", "llama") from None
    if not kwargs.get("vocab_only"):  # llama.cpp trusts the file: a damaged header can abort the process
        from ...gguf_checks import checked_gguf_header

        checked_gguf_header(path)
    try:
        if kwargs.get("vocab_only") or not _has_amx():
            return Llama(model_path=str(path), **kwargs)
        with _without_extra_buffers():
            return Llama(model_path=str(path), **kwargs)
    except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"
        raise CvxqError(f"llama.cpp cannot load {path}: {exc}",
                        "check the file with llama.cpp's own tools; a model llama.cpp does not support cannot run there") from None


@contextmanager
def _llama_errors(path):
    """llama.cpp's failures while evaluating (llama-cpp-python raises RuntimeError, e.g.
    "llama_decode returned 1") as a clear error."""
    try:
        yield
    except RuntimeError as exc:
        raise CvxqError(f"llama.cpp could not evaluate {path}: {exc}",
                        "check the file with llama.cpp's own tools; it may be damaged") from None


def llama_perplexity(path: str, windows: np.ndarray, *, threads: int | None = None, progress: bool = True) -> EvalResult:
    from tqdm.auto import tqdm

    seq = int(windows.shape[1])
    llm = open_llama(path, n_ctx=seq, n_batch=seq, n_ubatch=seq, logits_all=True, verbose=False,
                n_threads=threads, n_gpu_layers=0)
    total, count = 0.0, 0
    for row in tqdm(windows, desc="llama.cpp ppl", unit="window", disable=not progress):
        llm.reset()
        with _llama_errors(path):
            llm.eval([int(t) for t in row])
        logits = np.asarray(llm.scores[: seq - 1], dtype=np.float64)  # [T-1, V]
        m = logits.max(1, keepdims=True)
        logz = m[:, 0] + np.log(np.exp(logits - m).sum(1))
        total += float((logz - logits[np.arange(seq - 1), row[1:]]).sum())
        count += seq - 1
    nll = total / count
    return EvalResult(perplexity_from_nll(nll), nll, count, len(windows), seq)


def llama_generate(path: str, prompt: str, n_tokens: int = 16) -> tuple[str, float]:
    """A few greedy tokens and the decode speed (tokens/s)."""
    llm = open_llama(path, n_ctx=256, verbose=False, n_gpu_layers=0)
    start = time.perf_counter()
    with _llama_errors(path):
        out = llm(prompt, max_tokens=n_tokens, temperature=0.0)
    elapsed = time.perf_counter() - start
    text = out["choices"][0]["text"]
    return text, out["usage"]["completion_tokens"] / max(elapsed, 1e-9)


def timed_greedy_run(llm, prompt_ids: list[int], n_tokens: int) -> tuple[float, float]:
    """One run on a loaded ``llama_cpp.Llama`` from an empty cache: (seconds to evaluate the
    prompt, seconds for ``n_tokens`` greedy tokens evaluated one by one)."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt_ids)
    t1 = time.perf_counter()
    for _ in range(n_tokens):
        # logits of the last evaluated token, straight from the context: [n_vocab]
        last = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        llm.eval([int(np.argmax(last))])
    return t1 - t0, time.perf_counter() - t1


def llama_speed(path: str, prompt_ids: list[int], n_tokens: int = 128, *, threads: int = 2,
                repeats: int = 3) -> dict[str, float]:
    """Prefill and greedy-decode throughput in llama.cpp (tokens/s, median of ``repeats``).

    Decoding is driven token by token (argmax of the last logits, then one
    ``eval``) so every run does the same work regardless of sampling settings.
    """
    llm = open_llama(path, n_ctx=len(prompt_ids) + n_tokens + 8, n_batch=len(prompt_ids), verbose=False,
                     n_threads=threads, n_threads_batch=threads, n_gpu_layers=0, logits_all=False)
    prefill, decode = [], []
    for _ in range(repeats):
        with _llama_errors(path):
            prefill_s, decode_s = timed_greedy_run(llm, prompt_ids, n_tokens)
        prefill.append(len(prompt_ids) / prefill_s)
        decode.append(n_tokens / decode_s)
    return {"prefill_tok_s": float(np.median(prefill)), "decode_tok_s": float(np.median(decode)), "threads": threads,
            "prompt_tokens": len(prompt_ids), "decode_tokens": n_tokens}
