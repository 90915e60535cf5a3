"""GPTQ-style error feedback for the ONNX QDQ blocks (Frantar et al. 2022).

Same idea as the GGUF and packed formats (:mod:`cvxq_export.feedback`): the
rounding error of each input column of ``W`` ``[N, K]`` is pushed onto the
columns not yet quantized through the upper Cholesky factor ``U`` of the
inverse input Hessian ``H^-1`` (``H = E[x x^T]``), so the layer's output error
``E||(W - Q) x||^2`` drops.

The walk follows the graph's column order: the dropped (zero-bit) column groups
first, so what they leave out is picked up by the columns that stay, then each
split's columns. One quantization block (16..128 input columns of every output
row) at a time: the block's scale / zero point / offset are fitted by the
menu's own quantizer (:func:`onnx_qdq.quantize_blocks`) to the values as they
stand, then its codes are chosen column by column on that fixed grid, each
column's error fed to the block's later columns at once and to the rest of the
matrix when the block is done (GPTQ's lazy batch update: the same result as
updating everything after every column). The stored layout and bytes are the
plan's; only the codes and block parameters change.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ...feedback import inverse_hessian_factor
from .qdq import QBlocks, QdqOption, quantize_blocks


@dataclass
class Segment:
    option: QdqOption  # ZERO for dropped groups
    columns: np.ndarray  # [K_d] original input column indices, in the order the graph reads them


def _round_column(x: torch.Tensor, option: QdqOption, fit: QBlocks) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [N] and values [N] of column ``x`` [N] on the block grid ``fit`` (one block per
    row), with exactly the arithmetic of :mod:`onnx_qdq`'s quantizers."""
    bits = option.bits
    sf = fit.scale.float()
    safe = torch.where(sf > 0, sf, torch.ones_like(sf))
    if option.kind == "sym":
        qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        q = torch.clamp(torch.round(x / safe), qmin, qmax)
        return q, q * sf
    levels = (1 << bits) - 1
    if option.kind == "asym":
        z = fit.zero.float()
        q = torch.clamp(torch.round(x / safe) + z, 0, levels)
        return q, (q - z) * sf
    o = fit.offset.float()
    q = torch.clamp(torch.round((x - o) / safe), 0, levels)
    return q, o + q * sf


def quantize_with_feedback(w: torch.Tensor, imp: torch.Tensor, hessian: np.ndarray, segments: list[Segment],
                           damp: float = 0.01) -> tuple[torch.Tensor, list[QBlocks | None]]:
    """Quantize ``w`` ``[N, K]`` segment by segment with error feedback.

    Returns the dequantized weights ``[N, K]`` (original column order; dropped
    columns are 0) and, per segment, a :class:`QBlocks` in the layout
    ``quantize_blocks(block_view(w[:, cols], block))`` would give (``None`` for zero).
    """
    n, k = w.shape
    order = np.concatenate([s.columns for s in segments])
    if sorted(order.tolist()) != list(range(k)):
        raise ValueError("segments must cover every input column exactly once")
    idx = torch.from_numpy(order)
    h = np.asarray(hessian, dtype=np.float64)[np.ix_(order, order)]
    u = torch.from_numpy(inverse_hessian_factor(h, damp)).float()  # [K, K], in processing order
    work = w[:, idx].clone()  # [N, K] in processing order, updated as columns are fixed
    imp_p = imp[:, idx]
    deq = torch.zeros(n, k)
    out: list[QBlocks | None] = []
    pos = 0
    for seg in segments:
        kd = len(seg.columns)
        o = seg.option
        block = o.block if o.kind != "zero" else math.gcd(kd, 64)  # zero: any block; 64 keeps updates batched
        nb = kd // block
        codes = torch.zeros(n, kd, dtype=torch.int16)
        scale = torch.zeros(n, nb, dtype=torch.float16)
        zero = torch.zeros(n, nb, dtype=torch.int16) if o.kind == "asym" else None
        offset = torch.zeros(n, nb, dtype=torch.float16) if o.kind == "offset" else None
        for bi in range(nb):
            a, b = pos + bi * block, pos + (bi + 1) * block
            fit = None
            if o.kind != "zero":
                fit = quantize_blocks(work[:, a:b].contiguous(), o, imp_p[:, a:b].contiguous())  # one block per row
                scale[:, bi] = fit.scale
                if zero is not None:
                    zero[:, bi] = fit.zero
                if offset is not None:
                    offset[:, bi] = fit.offset
            errs = torch.empty(n, b - a)
            for j in range(a, b):
                x = work[:, j]
                if fit is None:
                    q, v = torch.zeros(n), torch.zeros(n)
                else:
                    q, v = _round_column(x, o, fit)
                codes[:, j - pos] = q.to(torch.int16)
                deq[:, j] = v
                e = (x - v) / u[j, j]
                errs[:, j - a] = e
                if j + 1 < b:
                    work[:, j + 1:b] -= e[:, None] * u[j, j + 1:b][None, :]
            if b < k:
                work[:, b:] -= errs @ u[a:b, b:]  # [N, block] @ [block, rest]: the lazy batch update
        if o.kind == "zero":
            out.append(None)
        else:
            blocks_deq = deq[:, pos:pos + kd].reshape(n * nb, block)
            out.append(QBlocks(codes.reshape(n * nb, block), scale.reshape(-1),
                               None if zero is None else zero.reshape(-1),
                               None if offset is None else offset.reshape(-1), blocks_deq))
        pos += kd
    result = torch.zeros(n, k)
    result[:, idx] = deq
    return result, out
