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

import numpy as np


def inverse_hessian_factor(hessian: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) I)^-1``: ``[n, n]`` float64.

    Columns that never see input (zero diagonal) get a unit diagonal so the
    factorisation exists; their weights get no feedback from the others.
    """
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


def quantize_tensor_feedback(loaded, sens, ref, unit_map: np.ndarray, row_group: int, col_group: int,
                             hessian: np.ndarray, *, damp: float = 0.01):
    """:func:`cvxq_export.native.quantize_tensor` with error feedback across columns.

    Each unit's grid (offset, scale, and for companded units the Laplace level
    table) is the one the plain quantizer fits to the original weights
    (GPTQ's "static groups": fitting per column as it comes up costs a clip
    search per unit and column, 20x slower for about the same result); the
    codes are then chosen column by column on those grids, each column's
    rounding error pushed onto the later columns. ``hessian`` is ``[cols, cols]``
    (``E[x x^T]`` of the layer's input). The returned NativeTensor's ``dequant``
    is computed with the reader's arithmetic from the stored codes and parameters.
    """
    import torch

    from .native import OPTIONS, NativeTensor, decode_map, option_units, quantize_tensor
    from .quantizers import COMPANDED, UNIFORM, laplace_table

    if col_group != 1:
        raise ValueError(f"error feedback walks single columns; the plan's column group is {col_group}")
    rows, cols = ref.rows, ref.cols
    if hessian.shape != (cols, cols):
        raise ValueError(f"{ref.name}: hessian is {hessian.shape}, expected ({cols}, {cols})")
    plain = quantize_tensor(loaded, sens, ref, unit_map, row_group, col_group)  # the grids
    n_rg = rows // row_group
    bits, kind = decode_map(np.asarray(unit_map, dtype=np.uint8))
    # unit index = row_group_index * cols + column (native.to_units with c = 1); per-row views [rows, cols]
    expand = lambda a: torch.as_tensor(a).reshape(n_rg, 1, cols).expand(n_rg, row_group, cols).reshape(rows, cols)  # noqa: E731
    off = expand(plain.offset.float())
    scl = expand(plain.scale.float())
    b_rc = expand(torch.from_numpy(bits.astype(np.int64)))
    k_rc = expand(torch.from_numpy(kind.astype(np.int64)))
    groups = [(b, k, (b_rc == b) & (k_rc == k if b else torch.ones_like(b_rc, dtype=torch.bool)))
              for b, k in OPTIONS if (b > 0 or k == UNIFORM)]
    groups = [(b, k, m) for b, k, m in groups if bool(m.any())]
    tables = {b: laplace_table(b) for b, k, _ in groups if k == COMPANDED}
    mids = {b: (t[1:] + t[:-1]) / 2 for b, t in tables.items()}
    u = torch.from_numpy(inverse_hessian_factor(hessian, damp)).float()     # [cols, cols]
    with torch.no_grad():
        work = loaded.weight_tensor(ref).detach().float().cpu().clone()     # [rows, cols], updated as columns are fixed
        codes = torch.zeros(rows, cols, dtype=torch.uint8)
        deq = torch.empty(rows, cols)
        safe = torch.where(scl > 0, scl, torch.ones_like(scl))
        for j in range(cols):
            x = work[:, j]                                                   # [rows]
            o, s, sf = off[:, j], scl[:, j], safe[:, j]
            v = torch.empty(rows)
            c = torch.zeros(rows, dtype=torch.uint8)
            for b, k, mask in groups:
                m = mask[:, j]
                if not bool(m.any()):
                    continue
                if b == 0:
                    v[m] = o[m]
                elif k == UNIFORM:  # quantizers.dequantize_uniform: offset + code * scale
                    q = torch.clamp(torch.round((x[m] - o[m]) / sf[m]), 0, (1 << b) - 1)
                    c[m] = q.to(torch.uint8)
                    v[m] = o[m] + q * s[m]
                else:  # quantizers.dequantize_companded: offset + scale * table[code]
                    q = torch.bucketize(((x[m] - o[m]) / sf[m]).contiguous(), mids[b])
                    c[m] = q.to(torch.uint8)
                    v[m] = o[m] + s[m] * tables[b][q]
            codes[:, j] = c
            deq[:, j] = v
            if j + 1 < cols:
                err = (x - v) / u[j, j]                                      # [rows]
                work[:, j + 1:] -= err[:, None] * u[j, j + 1:][None, :]     # GPTQ's rank-1 update
        flat_codes = codes.reshape(n_rg, row_group, cols).permute(0, 2, 1).reshape(n_rg * cols, row_group)
        code_groups = [flat_codes[torch.from_numpy(sel)] for _, _, sel in option_units(bits, kind)]
    return NativeTensor(ref, row_group, col_group, np.asarray(unit_map, dtype=np.uint8), code_groups,
                        plain.offset, plain.scale, deq)
