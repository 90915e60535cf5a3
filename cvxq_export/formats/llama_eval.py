"""Perplexity inside llama.cpp (llama-cpp-python), same protocol as PyTorch:
each window from an empty cache, T - 1 scored tokens per window."""
from __future__ import annotations

import math
import time

import numpy as np

from ..errors import missing_extra
from ..evaluate import EvalResult


def llama_perplexity(path: str, windows: np.ndarray, *, threads: int | None = None, progress: bool = True) -> EvalResult:
    try:
        from llama_cpp import Llama
    except ImportError:
        raise missing_extra("llama_cpp", "llama") from None
    from tqdm.auto import tqdm

    seq = int(windows.shape[1])
    llm = Llama(model_path=str(path), n_ctx=seq, n_batch=seq, n_ubatch=seq, logits_all=True, verbose=False,
                n_threads=threads, n_gpu_layers=0)
    total, count = 0.0, 0
    for row in tqdm(windows, desc="llama.cpp ppl", unit="window", disable=not progress):
        llm.reset()
        llm.eval([int(t) for t in row])
        logits = np.asarray(llm.scores[: seq - 1], dtype=np.float64)  # [T-1, V]
        m = logits.max(1, keepdims=True)
        logz = m[:, 0] + np.log(np.exp(logits - m).sum(1))
        total += float((logz - logits[np.arange(seq - 1), row[1:]]).sum())
        count += seq - 1
    nll = total / count
    return EvalResult(math.exp(nll), nll, count, len(windows), seq)


def llama_generate(path: str, prompt: str, n_tokens: int = 16) -> tuple[str, float]:
    """A few greedy tokens and the decode speed (tokens/s)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=256, verbose=False, n_gpu_layers=0)
    start = time.perf_counter()
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
    try:
        from llama_cpp import Llama
    except ImportError:
        raise missing_extra("llama_cpp", "llama") from None

    llm = Llama(model_path=str(path), n_ctx=len(prompt_ids) + n_tokens + 8, n_batch=len(prompt_ids), verbose=False,
                n_threads=threads, n_threads_batch=threads, n_gpu_layers=0, logits_all=False)
    prefill, decode = [], []
    for _ in range(repeats):
        prefill_s, decode_s = timed_greedy_run(llm, prompt_ids, n_tokens)
        prefill.append(len(prompt_ids) / prefill_s)
        decode.append(n_tokens / decode_s)
    return {"prefill_tok_s": float(np.median(prefill)), "decode_tok_s": float(np.median(decode)), "threads": threads,
            "prompt_tokens": len(prompt_ids), "decode_tokens": n_tokens}
