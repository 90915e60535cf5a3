"""Perplexity and KL divergence in PyTorch, over fixed windows.

Each window is scored from an empty cache; the first token of a window has no
prediction, so a window of T tokens scores T - 1 tokens (the protocol the
benchmarks use for llama.cpp and ONNX Runtime too).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class EvalResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    windows: int
    seq_len: int
    kl: float | None = None  # mean KL(reference || quantized) per token (nats)
    top1_agreement: float | None = None  # fraction of tokens where the argmax agrees

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity_from_nll(nll: float) -> float:
    """exp(mean negative log-likelihood); infinite past float range (a broken model), never an OverflowError."""
    return math.exp(nll) if nll < 709.0 else math.inf


def evaluate(model, windows: np.ndarray, reference=None, *, device: str = "cpu", progress: bool = True,
             desc: str = "eval") -> EvalResult:
    """Perplexity of ``model`` over ``windows`` ``[n, T]``; with ``reference``,
    also the KL divergence of ``model``'s next-token distribution from it."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    total_nll = 0.0
    total_kl = 0.0
    agree = 0
    count = 0
    with torch.no_grad():
        for row in tqdm(windows, desc=desc, unit="window", disable=not progress):
            ids = torch.as_tensor(row, device=device)[None]
            logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)  # [T-1, V]
            target = ids[0, 1:]
            total_nll += float(-logp.gather(1, target[:, None]).sum())
            if reference is not None:
                ref_logp = F.log_softmax(reference(input_ids=ids).logits[0, :-1].float(), -1)
                total_kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
                agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
            count += target.numel()
    nll = total_nll / count
    return EvalResult(
        perplexity=perplexity_from_nll(nll), nll=nll, tokens=count, windows=len(windows), seq_len=int(windows.shape[1]),
        kl=total_kl / count if reference is not None else None,
        top1_agreement=agree / count if reference is not None else None,
    )
