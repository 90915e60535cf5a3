"""Input-activation statistics of every quantizable linear layer.

``mean_sq[c] = E[x_c^2]`` over calibration tokens is exactly what llama.cpp's
``imatrix`` tool collects (it feeds it to the block quantizers as importance),
so this is how we reproduce llama.cpp's "with an importance matrix" presets
without its CLI tools. ``hessian = E[x x^T]`` (optional) is the second moment
GPTQ-style error feedback needs.

Statistics are keyed by the quantizable weight's parameter name (the tied
embedding gets the head's input, as in llama.cpp, where the output matmul
uses ``token_embd``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .model import LoadedModel


@dataclass
class InputStats:
    mean_sq: np.ndarray  # [cols] float64: E[x^2] per input column
    hessian: np.ndarray | None  # [cols, cols] float64: E[x x^T], or None
    tokens: int


def input_module(loaded: LoadedModel, ref) -> object | None:
    """The module whose *input* multiplies this weight (the head for a tied embedding)."""
    if ref.kind == "linear":
        return loaded.model.get_submodule(ref.module)
    head = loaded.model.get_output_embeddings()
    if head is not None and head.weight is loaded.model.get_parameter(ref.name):
        return head
    return None


def collect_input_stats(loaded: LoadedModel, windows: np.ndarray, *, hessian: bool = False,
                        progress: bool = True) -> dict[str, InputStats]:
    """One forward pass per window ``[n, T]`` with hooks on every weight's module."""
    import torch
    from tqdm.auto import tqdm

    sums: dict[str, torch.Tensor] = {}
    outer: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    by_module: dict[int, list[str]] = {}
    for ref in loaded.weights:
        module = input_module(loaded, ref)
        if module is None:
            continue
        if id(module) not in by_module:
            by_module[id(module)] = []

            def hook(mod, inputs, _out, key=id(module)):
                # float32 products per window (fast on CPU), float64 running sums (many windows)
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()  # [tokens, cols]
                for name in by_module[key]:
                    sums[name] = sums.get(name, 0) + (x * x).sum(0).double()
                    if hessian:
                        outer[name] = outer.get(name, 0) + (x.T @ x).double()
                    counts[name] = counts.get(name, 0) + x.shape[0]

            handles.append(module.register_forward_hook(hook))
        by_module[id(module)].append(ref.name)
    # Layers that share an input (q/k/v, gate/up) would repeat the same
    # accumulation; compute it once per module and share the result.
    for names in by_module.values():
        del names[1:]
    try:
        with torch.no_grad():
            for row in tqdm(windows, desc="activation stats", unit="window", disable=not progress):
                loaded.model(torch.as_tensor(row[None, :], dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    out: dict[str, InputStats] = {}
    per_owner: dict[str, InputStats] = {}  # weights sharing an input share one InputStats (no copies)
    for ref in loaded.weights:
        module = input_module(loaded, ref)
        if module is None:
            continue
        owner = by_module[id(module)][0]
        if owner not in per_owner:
            n = counts[owner]
            per_owner[owner] = InputStats((sums[owner] / n).numpy(), (outer[owner] / n).numpy() if hessian else None, n)
        out[ref.name] = per_owner[owner]
    return out
