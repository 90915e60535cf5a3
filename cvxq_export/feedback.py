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

    ``hessian`` is ``[cols, cols]`` (``E[x x^T]`` of the layer's input). Returns a
    NativeTensor whose ``dequant`` is exactly what the packed reader reconstructs
    from its codes, offsets and scales.
    """
    import torch

    from .native import OPTIONS, NativeTensor, decode_map, importance_matrix
    from .quantizers import UNIFORM, quantize

    if col_group != 1:
        raise ValueError(f"error feedback walks single columns; the plan's column group is {col_group}")
    rows, cols = ref.rows, ref.cols
    if hessian.shape != (cols, cols):
        raise ValueError(f"{ref.name}: hessian is {hessian.shape}, expected ({cols}, {cols})")
    n_rg = rows // row_group
    bits, kind = decode_map(np.asarray(unit_map, dtype=np.uint8))
    # unit index = row_group_index * cols + column (native.to_units with c = 1)
    bits_rc, kind_rc = bits.reshape(n_rg, cols), kind.reshape(n_rg, cols)
    u = torch.from_numpy(inverse_hessian_factor(hessian, damp)).float()     # [cols, cols]
    with torch.no_grad():
        work = loaded.weight_tensor(ref).detach().float().cpu().clone()     # [rows, cols], updated as columns are fixed
        imp = importance_matrix(sens, ref)                                  # [rows, cols]
        codes = torch.zeros(n_rg, cols, row_group, dtype=torch.uint8)
        offset = torch.zeros(n_rg, cols, dtype=torch.float16)
        scale = torch.zeros(n_rg, cols, dtype=torch.float16)
        deq = torch.empty(rows, cols)
        for j in range(cols):
            x = work[:, j].reshape(n_rg, row_group)                          # [n_rg, r]: this column's units
            w = imp[:, j].reshape(n_rg, row_group)
            qcol = torch.empty(n_rg, row_group)
            for b, k in set(zip(bits_rc[:, j].tolist(), kind_rc[:, j].tolist())):
                sel = np.nonzero((bits_rc[:, j] == b) & ((kind_rc[:, j] == k) | (b == 0)))[0]
                idx = torch.from_numpy(sel)
                q = quantize(x[idx], b, UNIFORM if b == 0 else k, w[idx])
                qcol[idx] = q.dequant
                codes[idx, j] = q.codes
                offset[idx, j] = q.offset
                scale[idx, j] = q.scale
            qv = qcol.reshape(rows)
            deq[:, j] = qv
            if j + 1 < cols:
                err = (work[:, j] - qv) / u[j, j]                            # [rows]
                work[:, j + 1:] -= err[:, None] * u[j, j + 1:][None, :]     # GPTQ's rank-1 update
        flat_codes = codes.reshape(n_rg * cols, row_group)
        groups = []
        for b, k in OPTIONS:  # the writer's order: one code array per (bits, kind), units in index order
            sel = np.nonzero((bits == b) & ((kind == k) | (b == 0)))[0]
            if b == 0 and k != UNIFORM or len(sel) == 0:
                continue
            groups.append(flat_codes[torch.from_numpy(sel)])
    # deq holds quantize()'s dequant: offset + code * scale (or the level table) in the reader's arithmetic
    return NativeTensor(ref, row_group, col_group, np.asarray(unit_map, dtype=np.uint8), groups,
                        offset.reshape(-1), scale.reshape(-1), deq)
