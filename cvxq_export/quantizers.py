"""Scalar quantizers, vectorised over *units* (each row of ``x`` is one unit).

Every quantizer returns integer codes plus fp16 reconstruction parameters,
and its ``dequant`` is computed from exactly those stored fp16 values, so a
reader that follows ``dequantize_*`` reproduces it bit for bit.

* uniform affine: ``w = offset + code * scale`` with an MSE-optimal clipping
  search over the range;
* companded (CVXQ): levels at the Laplace quantiles ``(code + 0.5) / 2^b``,
  stored once per bit depth as a normalised table ``T_b``, scaled per unit:
  ``w = offset + scale * T_b[code]``; the encoder picks the nearest level;
* zero bits: the whole unit collapses to one value, ``w = offset``.

Reconstruction arithmetic is float32: ``float32(offset) + float32(code) *
float32(scale)`` (uniform) and ``float32(offset) + float32(scale) * T_b[code]``
(companded), multiply first, then add, no fused multiply-add.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

MAX_BITS = 8
UNIFORM, COMPANDED = 0, 1
KIND_NAMES = {UNIFORM: "uniform", COMPANDED: "companded"}
# Clipping search: fraction of the half-range kept. Low bit depths gain most.
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)
LOW_BIT_CLIP_GRID = CLIP_GRID + (0.4, 0.3, 0.2)  # 1-2 bits: the optimum sits far inside the range
# Companded scale search: multipliers of 3x the moment-matched Laplace scale.
# A Laplace(b) source is best companded (high-rate, fixed-rate MSE) by the CDF
# of the cube root of its density, which is Laplace(3b): CVXQ's 3/sqrt(2) RMS.
LAPLACE_SCALE_GRID = tuple(2.0 ** (e / 4) for e in range(-3, 2))


def worker_count() -> int:
    """Threads for the menu and writer pools: the cores this process may use."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() or 1)


@dataclass
class QuantizedUnits:
    codes: torch.Tensor  # [n, m] uint8
    offset: torch.Tensor  # [n] float16
    scale: torch.Tensor  # [n] float16 (zero for zero-bit units)
    dequant: torch.Tensor  # [n, m] float32, exactly what a reader reconstructs
    bits: int
    kind: int  # UNIFORM or COMPANDED


def _sse(err: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Per-unit (weighted) squared error: [n, m] -> [n]."""
    e2 = err * err
    return (e2 * weights).sum(1) if weights is not None else e2.sum(1)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to float16 (what the file stores), clamped to its finite range."""
    return x.clamp(-65504.0, 65504.0).to(torch.float16)


def quantize_zero(x: torch.Tensor, weights: torch.Tensor | None = None) -> QuantizedUnits:
    """Zero bits: each unit becomes its (importance-weighted) mean. x: [n, m]."""
    if weights is None:
        mean = x.mean(1)
    else:
        total = weights.sum(1)
        mean = torch.where(total > 0, (x * weights).sum(1) / total.clamp_min(1e-30), x.mean(1))
    offset = _fp16(mean)
    n, m = x.shape
    dequant = offset.float()[:, None].expand(n, m).contiguous()
    return QuantizedUnits(torch.zeros(n, m, dtype=torch.uint8), offset, torch.zeros(n, dtype=torch.float16), dequant, 0, UNIFORM)


def dequantize_uniform(codes: torch.Tensor, offset: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[n, m] codes, [n] fp16 offset/scale -> [n, m] float32."""
    return offset.float()[:, None] + codes.float() * scale.float()[:, None]


# Units quantized together: ~4 MB of float32 per operand, so the dozen elementwise passes of
# a quantizer's search run in cache (2.6x faster on SmolLM2's tensors than whole-tensor
# passes). Units are independent, so the result is the same whatever the chunking.
CHUNK_ELEMENTS = 1 << 20


def _chunked(quantizer, x: torch.Tensor, weights: torch.Tensor | None, *args, **kwargs) -> QuantizedUnits | None:
    """``quantizer`` over cache-sized chunks of units, joined; None when ``x`` is one chunk."""
    step = max(1, CHUNK_ELEMENTS // max(1, x.shape[1]))
    if x.shape[0] <= step:
        return None
    parts = [quantizer(x[lo:lo + step], *args, weights[lo:lo + step] if weights is not None else None, **kwargs)
             for lo in range(0, x.shape[0], step)]
    return QuantizedUnits(torch.cat([p.codes for p in parts]), torch.cat([p.offset for p in parts]),
                          torch.cat([p.scale for p in parts]), torch.cat([p.dequant for p in parts]),
                          parts[0].bits, parts[0].kind)


def quantize_uniform(x: torch.Tensor, bits: int, weights: torch.Tensor | None = None,
                     clip_grid: tuple[float, ...] = CLIP_GRID) -> QuantizedUnits:
    """Asymmetric uniform quantizer with an MSE-optimal clip per unit. x: [n, m]."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")
    if (joined := _chunked(quantize_uniform, x, weights, bits, clip_grid=clip_grid)) is not None:
        return joined
    levels = (1 << bits) - 1
    lo, hi = x.min(1).values, x.max(1).values  # [n]
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    best_err = best_off = best_scale = None
    if bits >= 6:
        grid = (1.0,)  # clipping gains nothing measurable at >= 6 bits
    elif bits <= 2 and clip_grid is CLIP_GRID:
        grid = LOW_BIT_CLIP_GRID
    else:
        grid = clip_grid
    for c in grid:
        offset = _fp16(mid - c * half)
        scale = _fp16((2 * c * half) / levels)
        sf = scale.float()
        safe = torch.where(sf > 0, sf, torch.ones_like(sf))
        codes = torch.clamp(torch.round((x - offset.float()[:, None]) / safe[:, None]), 0, levels)
        err = _sse(offset.float()[:, None] + codes * sf[:, None] - x, weights)
        if best_err is None:
            best_err, best_off, best_scale = err, offset, scale
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_off = torch.where(better, offset, best_off)
            best_scale = torch.where(better, scale, best_scale)
    sf = best_scale.float()
    safe = torch.where(sf > 0, sf, torch.ones_like(sf))
    codes = torch.clamp(torch.round((x - best_off.float()[:, None]) / safe[:, None]), 0, levels).to(torch.uint8)
    return QuantizedUnits(codes, best_off, best_scale, dequantize_uniform(codes, best_off, best_scale), bits, UNIFORM)


@lru_cache(maxsize=None)
def laplace_table_np(bits: int) -> np.ndarray:
    """Normalised companded levels for ``bits``: standard Laplace (scale 1)
    quantiles at ``(k + 0.5) / 2^bits``; float32 ``[2^bits]``, ascending."""
    n = 1 << bits
    p = (np.arange(n, dtype=np.float64) + 0.5) / n
    # inverse CDF of Laplace(0, 1): -sign(p - 1/2) * ln(1 - 2|p - 1/2|)
    q = -np.sign(p - 0.5) * np.log1p(-2.0 * np.abs(p - 0.5))
    return q.astype(np.float32)


def laplace_table(bits: int) -> torch.Tensor:
    return torch.from_numpy(laplace_table_np(bits))


def dequantize_companded(codes: torch.Tensor, offset: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    table = laplace_table(bits)
    return offset.float()[:, None] + scale.float()[:, None] * table[codes.long()]


def _nearest_level(z: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table entry for each normalised value z."""
    midpoints = (table[1:] + table[:-1]) / 2
    return torch.bucketize(z.contiguous(), midpoints)


def quantize_companded(x: torch.Tensor, bits: int, weights: torch.Tensor | None = None,
                       scale_grid: tuple[float, ...] = LAPLACE_SCALE_GRID) -> QuantizedUnits:
    """CVXQ's companded quantizer: Laplace-quantile levels around the median,
    scale searched around the moment match (Laplace variance = 2 b^2). x: [n, m]."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")
    if (joined := _chunked(quantize_companded, x, weights, bits, scale_grid=scale_grid)) is not None:
        return joined
    table = laplace_table(bits)
    offset = _fp16(x.median(1).values)
    centred = x - offset.float()[:, None]
    base = 3 * (centred.pow(2).mean(1) / 2).sqrt()  # [n] 3x the moment-matched Laplace scale
    best_err = best_scale = None
    for mult in scale_grid:
        scale = _fp16(base * mult)
        sf = scale.float()
        safe = torch.where(sf > 0, sf, torch.ones_like(sf))
        codes = _nearest_level(centred / safe[:, None], table)
        err = _sse(offset.float()[:, None] + sf[:, None] * table[codes] - x, weights)
        if best_err is None:
            best_err, best_scale = err, scale
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
    sf = best_scale.float()
    safe = torch.where(sf > 0, sf, torch.ones_like(sf))
    codes = _nearest_level(centred / safe[:, None], table).to(torch.uint8)
    return QuantizedUnits(codes, offset, best_scale, dequantize_companded(codes, offset, best_scale, bits), bits, COMPANDED)


def quantize(x: torch.Tensor, bits: int, kind: int, weights: torch.Tensor | None = None) -> QuantizedUnits:
    """Dispatch on (bits, kind); bits == 0 ignores kind."""
    if bits == 0:
        return quantize_zero(x, weights)
    if kind == UNIFORM:
        return quantize_uniform(x, bits, weights)
    if kind == COMPANDED:
        return quantize_companded(x, bits, weights)
    raise ValueError(f"unknown quantizer kind {kind}")


def bias_correction(bias: torch.Tensor | None, weight: torch.Tensor, weight_hat: torch.Tensor,
                    input_mean: torch.Tensor) -> torch.Tensor:
    """CVXQ bias correction ``b' = b - (W_hat - W) x_mean``, so the layer's mean
    output over the calibration inputs is unchanged.
    weight, weight_hat: [out, in]; input_mean: [in]; bias: [out] or None."""
    shift = (weight_hat.float() - weight.float()) @ input_mean.float()
    base = bias.float() if bias is not None else torch.zeros_like(shift)
    return base - shift


def rtn_groupwise(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Round-to-nearest baseline: asymmetric min/max per ``group`` consecutive
    inputs of each row, fp16 scale and minimum, no clipping search.
    w: [rows, cols] with cols % group == 0 -> dequantized [rows, cols]."""
    rows, cols = w.shape
    if cols % group:
        raise ValueError(f"cols {cols} not a multiple of group {group}")
    x = w.reshape(-1, group)
    q = quantize_uniform(x, bits, clip_grid=(1.0,))
    return q.dequant.reshape(rows, cols)


def rtn_bytes(numel: int, bits: int, group: int) -> int:
    """Bytes of an RTN tensor: packed codes + fp16 scale and minimum per group."""
    return math.ceil(numel * bits / 8) + (numel // group) * 4
