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


def _column_grid(option: QdqOption, fit: QBlocks) -> tuple[np.ndarray, ...]:
    """The block grid ``fit`` (one block per row) as float32 NumPy vectors ``[N]``:
    (scale, safe divisor, zero point or offset)."""
    sf = fit.scale.float().numpy()
    safe = np.where(sf > 0, sf, np.float32(1.0))
    if option.kind == "asym":
        return sf, safe, fit.zero.float().numpy()
    if option.kind == "offset":
        return sf, safe, fit.offset.float().numpy()
    return sf, safe, None


def _round_column(x: np.ndarray, option: QdqOption, grid: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Codes [N] and values [N] of column ``x`` [N] on the block grid, with exactly the
    float32 arithmetic of :mod:`onnx_qdq`'s quantizers (NumPy: a column is a few hundred
    values, where NumPy's per-call cost is a third of torch's)."""
    bits = option.bits
    sf, safe, extra = grid
    if option.kind == "sym":
        q = np.clip(np.round(x / safe), -(1 << (bits - 1)), (1 << (bits - 1)) - 1)
        return q, q * sf
    levels = (1 << bits) - 1
    if option.kind == "asym":
        q = np.clip(np.round(x / safe) + extra, 0, levels)
        return q, (q - extra) * sf
    q = np.clip(np.round((x - extra) / safe), 0, levels)
    return q, extra + q * sf


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
    u = torch.from_numpy(inverse_hessian_factor(hessian, damp, order=order).astype(np.float32))  # [K, K], processing order
    u_np = u.numpy()
    # [K, N]: the weights in processing order, transposed so a column is contiguous; updated
    # as columns are fixed (NumPy for the per-column steps, torch, on the same memory, for
    # the batch update's matmul)
    work_t = w[:, idx].t().contiguous()
    work = work_t.numpy()
    imp_p = imp[:, idx]
    deq = np.zeros((k, n), dtype=np.float32)   # [K, N], processing order
    out: list[QBlocks | None] = []
    pos = 0
    for seg in segments:
        kd = len(seg.columns)
        o = seg.option
        block = o.block if o.kind != "zero" else math.gcd(kd, 64)  # zero: any block; 64 keeps updates batched
        nb = kd // block
        codes = np.zeros((kd, n), dtype=np.int16)  # [K_d, N]
        scale = torch.zeros(n, nb, dtype=torch.float16)
        zero = torch.zeros(n, nb, dtype=torch.int16) if o.kind == "asym" else None
        offset = torch.zeros(n, nb, dtype=torch.float16) if o.kind == "offset" else None
        for bi in range(nb):
            a, b = pos + bi * block, pos + (bi + 1) * block
            grid = None
            if o.kind != "zero":
                fit = quantize_blocks(work_t[a:b].t().contiguous(), o, imp_p[:, a:b].contiguous())  # one block per row
                scale[:, bi] = fit.scale
                if zero is not None:
                    zero[:, bi] = fit.zero
                if offset is not None:
                    offset[:, bi] = fit.offset
                grid = _column_grid(o, fit)
            errs = torch.empty(n, b - a)  # [N, block], as the batch update's matmul has always read it
            errs_np = errs.numpy()
            for j in range(a, b):
                x = work[j]
                if grid is None:
                    q, v = 0, np.float32(0.0)
                else:
                    q, v = _round_column(x, o, grid)
                codes[j - pos] = q
                deq[j] = v
                e = (x - deq[j]) / u_np[j, j]
                errs_np[:, j - a] = e
                if j + 1 < b:
                    work[j + 1:b] -= u_np[j, j + 1:b, None] * e[None, :]
            if b < k:
                work_t[b:] -= (errs @ u[a:b, b:]).t()  # [N, block] @ [block, rest]: the lazy batch update
        if o.kind == "zero":
            out.append(None)
        else:
            seg_deq = torch.from_numpy(np.ascontiguousarray(deq[pos:pos + kd].T))   # [N, K_d]
            seg_codes = torch.from_numpy(np.ascontiguousarray(codes.T))            # [N, K_d]
            out.append(QBlocks(seg_codes.reshape(n * nb, block), scale.reshape(-1),
                               None if zero is None else zero.reshape(-1),
                               None if offset is None else offset.reshape(-1), seg_deq.reshape(n * nb, block)))
        pos += kd
    result = torch.zeros(n, k)
    result[:, idx] = torch.from_numpy(np.ascontiguousarray(deq.T))
    return result, out
