"""CVXQ's gradient statistics computed the direct way, to check calibrate() against: full
``[T, V]`` logits projected on the output directions, one backward pass per window with the
same random signs as calibrate() (same generator, same order), every weight's ``.grad`` read
after the pass, float64 squares."""
from __future__ import annotations

import numpy as np
import torch

from cvxq_export.calibrate import output_directions


def reference_stats(loaded, windows, settings) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per weight: (mean over each ``row_group`` of rows of E[G^2] ``[groups, cols]``, the last
    group over the rows it has; mean over columns of E[G^2] ``[rows]``), float64, unfloored."""
    model = loaded.model
    directions, _ = output_directions(loaded, windows[: settings.pca_windows], settings.n_pcs)  # [V, k]
    params = {r.name: model.get_parameter(r.name) for r in loaded.weights}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in params.values():
        p.requires_grad_(True)
    acc = {n: 0.0 for n in params}
    rows = {n: 0.0 for n in params}
    gen = torch.Generator().manual_seed(settings.seed)
    try:
        for row in windows:
            projected = model(input_ids=torch.as_tensor(row)[None]).logits[0].float() @ directions  # [T, k]
            signs = (torch.randint(0, 2, projected.shape, generator=gen) * 2 - 1).to(projected)
            for p in params.values():
                p.grad = None
            (projected * signs).sum().backward()
            for name, p in params.items():
                g2 = p.grad.double() ** 2  # [rows, cols]
                acc[name] = acc[name] + g2
                rows[name] = rows[name] + g2.mean(1)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = None
    out = {}
    for ref in loaded.weights:
        mean = (acc[ref.name] / len(windows)).numpy()  # [rows, cols]
        grouped = np.stack([mean[i : i + settings.row_group].mean(0) for i in range(0, ref.rows, settings.row_group)])
        out[ref.name] = (grouped, (rows[ref.name] / len(windows)).numpy())
    return out
