"""Error feedback (GPTQ, Frantar et al. 2022) shared by the formats, and its use
for the native / packed plan.

CVXQ rounds every weight on its own. When a weight column is rounded, the error
it leaves on the layer's output, ``(w - q) x``, can be partly cancelled by
nudging the columns still to be quantized. For one row ``w`` (all rows share the
Hessian ``H = E[x x^T]`` of the layer's input) fixing column ``j`` leaves the
error ``e_j = w_j - q_j``, and the best change of the later columns is
``dw_{>j} = -e_j / U_jj * U_{j,>j}`` with ``U`` the upper Cholesky factor of
``H^-1`` (GPTQ's observation: one factorisation serves every step).

The native plan's units are one column x a group of rows (``col_group == 1``),
so the walk is GPTQ's own: column by column, each unit of the column quantized
with the option the plan gave it, its scale and offset fitted to the values as
they stand after the earlier columns' feedback. The bytes are the plan's bytes
(same bit depth per unit); only the codes and the per-unit parameters change.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np


# The last few factors, keyed by the Hessian array's identity and the column order: layers
# that share an input (q/k/v, gate/up) share one Hessian array, so one factorisation (the
# O(n^3) part of the feedback) serves all of them. Entries hold the array, so its id cannot
# be reused by another array while the entry lives.
_FACTORS: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
_FACTORS_KEPT = 4


def inverse_hessian_factor(hessian: np.ndarray, damp: float = 0.01, order: np.ndarray | None = None) -> np.ndarray:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) I)^-1``: ``[n, n]`` float64,
    of ``H = hessian[order][:, order]`` when ``order`` (``[n]`` column indices) is given.

    Columns that never see input (zero diagonal) get a unit diagonal so the
    factorisation exists; their weights get no feedback from the others.
    A recent factor of the same array and order is reused (read-only result).
    """
    order_key = None if order is None else hash(np.asarray(order, dtype=np.int64).tobytes())
    key = (id(hessian), order_key, damp)
    hit = _FACTORS.get(key)
    if hit is not None and hit[0] is hessian:
        return hit[1]
    h = hessian if order is None else np.asarray(hessian)[np.ix_(order, order)]
    u = _inverse_hessian_factor(h, damp)
    u.setflags(write=False)
    while len(_FACTORS) >= _FACTORS_KEPT:
        _FACTORS.pop(next(iter(_FACTORS)))
    _FACTORS[key] = (hessian, u)
    return u


def _inverse_hessian_factor(hessian: np.ndarray, damp: float) -> np.ndarray:
    h = np.array(hessian, dtype=np.float64, copy=True)
    diag = np.diag(h).copy()
    dead = diag <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    mean = float(np.mean(np.diag(h)))
    h[np.diag_indices_from(h)] += damp * (mean if mean > 0 else 1.0)
    lower = np.linalg.cholesky(h)                       # H = L L^T
    inv_lower = np.linalg.inv(lower)                    # L^-1
    h_inv = inv_lower.T @ inv_lower                     # H^-1 = L^-T L^-1
    return np.linalg.cholesky(h_inv).T                  # H^-1 = U^T U, U upper


# Columns per lazy batch: inside a batch each fixed column updates only the batch's later
# columns; the rest of the matrix gets the whole batch's correction in one matmul (GPTQ's
# lazy batch update; the same sums, in another order).
FEEDBACK_BLOCK = 64


@lru_cache(maxsize=1)
def _companded_search() -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Tables to find every companded unit's nearest level in one search, whatever its bit depth.

    ``merged`` is the sorted union of every bit depth's decision thresholds (the midpoints
    between neighbouring levels, float32, as :func:`quantizers._nearest_level` computes them);
    ``below[b * stride + p]`` is how many of depth ``b``'s thresholds lie among ``merged[:p]``.
    With ``p = searchsorted(merged, z)`` (thresholds strictly below ``z``) that count is the
    code ``torch.bucketize(z, thresholds_b)`` gives: the same float32 comparisons, so the same
    codes. ``levels[b * 256 + code]`` is the level (0 padded). Returns
    (merged, below, levels, stride).
    """
    from .quantizers import MAX_BITS, laplace_table

    mids = {}
    for b in range(1, MAX_BITS + 1):
        t = laplace_table(b)
        mids[b] = ((t[1:] + t[:-1]) / 2).numpy()
    merged = np.unique(np.concatenate(list(mids.values())))               # [m] float32, ascending
    stride = len(merged) + 1
    below = np.zeros((MAX_BITS + 1, stride), dtype=np.int64)
    levels = np.zeros((MAX_BITS + 1, 256), dtype=np.float32)
    for b, m in mids.items():
        below[b, 1:] = np.cumsum(np.isin(merged, m))
        levels[b, :1 << b] = laplace_table(b).numpy()
    return merged, below.reshape(-1), levels.reshape(-1), stride


def quantize_tensor_feedback(loaded, sens, ref, unit_map: np.ndarray, row_group: int, col_group: int,
                             hessian: np.ndarray, *, damp: float = 0.01):
    """:func:`cvxq_export.native.quantize_tensor` with error feedback across columns.

    Each unit's grid (offset, scale, and for companded units the Laplace level
    table) is the one the plain quantizer fits to the original weights
    (GPTQ's "static groups": fitting per column as it comes up costs a clip
    search per unit and column, 20x slower for about the same result); the
    codes are then chosen column by column on those grids, each column's
    rounding error pushed onto the later columns (lazily, :data:`FEEDBACK_BLOCK`
    columns at a time). ``hessian`` is ``[cols, cols]`` (``E[x x^T]`` of the
    layer's input). The returned NativeTensor's ``dequant`` is computed with the
    reader's arithmetic from the stored codes and parameters.
    """
    import torch

    from .native import NativeTensor, decode_map, option_units, quantize_tensor
    from .quantizers import COMPANDED

    if col_group != 1:
        raise ValueError(f"error feedback walks single columns; the plan's column group is {col_group}")
    rows, cols = ref.rows, ref.cols
    if hessian.shape != (cols, cols):
        raise ValueError(f"{ref.name}: hessian is {hessian.shape}, expected ({cols}, {cols})")
    plain = quantize_tensor(loaded, sens, ref, unit_map, row_group, col_group)  # the grids
    n_rg = rows // row_group
    bits, kind = decode_map(np.asarray(unit_map, dtype=np.uint8))
    # Per-unit parameters, one row per column ([cols, n_rg, 1]: unit index = row_group_index * cols
    # + column, native.to_units with c = 1), so column j's are one contiguous slice that
    # broadcasts against that column's weights viewed as [n_rg, row_group].
    per_col = lambda a: np.ascontiguousarray(np.asarray(a).reshape(n_rg, cols).T)[:, :, None]  # noqa: E731
    off = per_col(plain.offset.float().numpy())
    scl = per_col(plain.scale.float().numpy())
    safe = np.where(scl > 0, scl, np.float32(1.0))
    b_u = per_col(bits.astype(np.int64))
    top = ((1 << b_u) - 1).astype(np.float32)                              # uniform: the highest code
    is_zero = b_u == 0
    is_comp = per_col((kind == COMPANDED) & (bits > 0))
    any_zero, any_comp = is_zero.any(axis=(1, 2)), is_comp.any(axis=(1, 2))   # [cols]
    merged, below, levels, stride = _companded_search()
    below_at, level_at = b_u * stride, b_u * 256                            # [cols, n_rg, 1] table offsets
    u = inverse_hessian_factor(hessian, damp).astype(np.float32)            # [cols, cols]
    # the weights transposed, [cols, rows], so a column is a contiguous row; updated as columns are fixed
    work = np.ascontiguousarray(loaded.weight_tensor(ref).detach().float().cpu().numpy().T)
    codes = np.zeros((cols, rows), dtype=np.uint8)
    deq = np.empty((cols, rows), dtype=np.float32)
    errs = np.empty((FEEDBACK_BLOCK, rows), dtype=np.float32)              # one batch's scaled errors
    for a in range(0, cols, FEEDBACK_BLOCK):
        b = min(a + FEEDBACK_BLOCK, cols)
        for j in range(a, b):
            x = work[j].reshape(n_rg, row_group)
            o, s = off[j], scl[j]                                           # [n_rg, 1]
            # the arithmetic of quantizers.quantize_uniform / quantize_companded, for every unit at once
            z = (x - o) / safe[j]
            code = np.clip(np.round(z), 0.0, top[j])                        # uniform codes (float)
            level = code
            if any_comp[j]:
                code_c = below[below_at[j] + np.searchsorted(merged, z)]    # companded codes
                code = np.where(is_comp[j], code_c, code)
                level = np.where(is_comp[j], levels[level_at[j] + code_c], level)
            v = o + s * level
            if any_zero[j]:
                v = np.where(is_zero[j], o, v)
                code = np.where(is_zero[j], 0, code)
            codes[j] = code.reshape(-1)
            deq[j] = v.reshape(-1)
            e = (work[j] - deq[j]) / u[j, j]                               # [rows]
            errs[j - a] = e
            if j + 1 < b:
                work[j + 1:b] -= u[j, j + 1:b, None] * e[None, :]           # GPTQ's rank-1 update, inside the batch
        if b < cols:
            work[b:] -= u[a:b, b:].T @ errs[:b - a]                         # [cols - b, rows]: the batch, at once
    flat_codes = codes.reshape(cols, n_rg, row_group).transpose(1, 0, 2).reshape(n_rg * cols, row_group)
    code_groups = [torch.from_numpy(np.ascontiguousarray(flat_codes[sel])) for _, _, sel in option_units(bits, kind)]
    return NativeTensor(ref, row_group, col_group, np.asarray(unit_map, dtype=np.uint8), code_groups,
                        plain.offset, plain.scale, torch.from_numpy(np.ascontiguousarray(deq.T)))
