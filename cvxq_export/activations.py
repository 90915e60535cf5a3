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
from typing import Callable

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


class InputSums:
    """Forward hooks that sum, per quantizable weight, its input's squares ``sum_t x_t^2``
    ``[cols]`` and (``outer``) products ``sum_t x_t x_t^T`` ``[cols, cols]`` over the windows
    marked active (the tied embedding gets the output head's input, see :func:`input_module`).

    Weights that read the same input tensor (q/k/v, gate/up) share one sum: within a window
    the first hook to see a tensor owns it and the others alias it. Sums are float32 per
    window (fast on CPU) and float64 across windows (many windows). Used by
    :func:`collect_input_stats` and, inside calibration's own forward passes, by
    :func:`cvxq_export.calibrate.calibrate`."""

    def __init__(self, loaded: LoadedModel, refs, *, outer: bool, squares: bool = True, device: str = "cpu"):
        self.modules = [(ref.name, m) for ref in refs if (m := input_module(loaded, ref)) is not None]
        self.outer, self.squares, self.device = outer, squares, device
        self.sq_sums: dict[str, object] = {}  # owner name -> [cols] float64
        self.outer_sums: dict[str, object] = {}  # owner name -> [cols, cols] float64
        self.tokens: dict[str, int] = {}
        self.alias: dict[str, str] = {}  # weight name -> owner name
        self.active = False
        self._seen: list = []  # (input tensor, owner name) of this window; kept alive until it ends

    def register(self, in_forward: Callable[[], bool] = lambda: True) -> list:
        """Hook every weight's input module; ``in_forward`` tells a forward pass from a
        checkpointed block's recomputation (whose inputs were already counted)."""
        def hook(mod, inp, out, name):
            if not self.active or not in_forward():
                return
            x = inp[0]
            for seen, owner in self._seen:
                if seen is x:
                    self.alias[name] = owner
                    return
            self._seen.append((x, name))
            flat = x.detach().reshape(-1, x.shape[-1]).float()  # [tokens, cols]
            if self.squares:
                sq = (flat * flat).sum(0).double().to(self.device)  # [cols]
                self.sq_sums[name] = self.sq_sums[name] + sq if name in self.sq_sums else sq
            if self.outer:
                prod = (flat.T @ flat).double().to(self.device)  # [cols, cols]
                self.outer_sums[name] = self.outer_sums[name] + prod if name in self.outer_sums else prod
            self.tokens[name] = self.tokens.get(name, 0) + flat.shape[0]

        return [m.register_forward_hook(lambda mod, inp, out, name=name: hook(mod, inp, out, name))
                for name, m in self.modules]

    def start_window(self, active: bool = True) -> None:
        self.active, self._seen = active, []

    def owner(self, name: str) -> str:
        return self.alias.get(name, name)

    def means(self, sums: dict, reduce: Callable | None = None) -> dict[str, np.ndarray]:
        """Per weight name, its owner's sum divided by the owner's token count (weights
        sharing an input share one array); ``reduce`` sums a tensor across processes."""
        self._seen = []
        per_owner: dict[str, np.ndarray] = {}
        for owner, total in sums.items():
            count = total.new_tensor([float(self.tokens[owner])])
            if reduce is not None:
                reduce(total)
                reduce(count)
            per_owner[owner] = (total / count).cpu().numpy()
        return {name: per_owner[self.owner(name)] for name, _ in self.modules if self.owner(name) in per_owner}


def collect_input_stats(loaded: LoadedModel, windows: np.ndarray, *, hessian: bool = False,
                        progress: bool = True) -> dict[str, InputStats]:
    """One forward pass per window ``[n, T]`` with :class:`InputSums` hooks on every weight's module."""
    import torch
    from tqdm.auto import tqdm

    sums = InputSums(loaded, loaded.weights, outer=hessian)
    handles = sums.register()
    try:
        with torch.no_grad():
            for row in tqdm(windows, desc="activation stats", unit="window", disable=not progress):
                sums.start_window()
                loaded.model(torch.as_tensor(row[None, :], dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    mean_sq = sums.means(sums.sq_sums)
    outer = sums.means(sums.outer_sums) if hessian else {}
    out: dict[str, InputStats] = {}
    per_owner: dict[str, InputStats] = {}  # weights sharing an input share one InputStats (no copies)
    for name in mean_sq:
        owner = sums.owner(name)
        if owner not in per_owner:
            per_owner[owner] = InputStats(mean_sq[name], outer.get(name), sums.tokens[owner])
        out[name] = per_owner[owner]
    return out
