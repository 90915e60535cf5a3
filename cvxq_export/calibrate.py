"""CVXQ calibration: output sensitivities of every quantizable weight.

CVXQ allocates bits from two statistics per group of weights: the weights'
variance (read from the weights themselves at allocation time) and the mean
squared gradient of the model *output* with respect to those weights, where
the output is projected onto its principal directions.

Here the output is the logit vector and its principal directions are taken in
vocabulary space, so the output head and a tied embedding get a gradient too.
The logits' covariance is ``W C_h W^T`` (``W``: head ``[V, d]``, ``C_h``: the
covariance of the head's input ``[d, d]``), so its top-k eigenvectors come
from a ``[d, d]`` eigenproblem instead of a ``[V, V]`` one.

The sum over tokens t and directions k of per-(t, k) squared gradients,
``sum_tk g_tk**2``, is estimated with one backward pass per window: with
independent random signs ``s_tk``, ``G = sum_tk s_tk g_tk`` has
``E[G**2] = sum_tk g_tk**2`` because the cross terms have zero mean.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import CvxqError
from .model import LoadedModel, WeightRef

STATS_FORMAT_VERSION = 1


@dataclass(frozen=True)
class CalibrationSettings:
    n_windows: int = 64
    seq_len: int = 512
    seed: int = 0
    n_pcs: int = 128  # principal output directions (in logit space)
    pca_windows: int = 8  # windows used to estimate the output covariance
    probes: int = 1  # random-sign backward passes per window
    row_group: int = 32  # rows per statistic (granularity of the stored grad_sq)
    calibration: str = "builtin"  # text source label


@dataclass
class WeightStats:
    grad_sq: np.ndarray  # [ceil(rows/row_group), cols] float32: mean over the group's rows of E[G^2]
    row_grad_sq: np.ndarray  # [rows] float32: mean over columns of E[G^2]
    input_mean: np.ndarray | None = None  # [cols] mean input activation (linear layers)
    input_sq: np.ndarray | None = None  # [cols] mean squared input activation

    def element_importance(self, rows: int, row_group: int) -> np.ndarray:
        """``[rows, cols]`` importance per weight (group statistic repeated)."""
        return np.repeat(self.grad_sq, row_group, axis=0)[:rows]


@dataclass
class Sensitivities:
    stats: dict[str, WeightStats]
    settings: CalibrationSettings
    model_fingerprint: str
    seconds: float = 0.0
    eigenvalues: list[float] = field(default_factory=list)  # of the chosen output directions

    def __getitem__(self, name: str) -> WeightStats:
        return self.stats[name]

    # -- persistence: one safetensors file, settings in its metadata ---------
    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        from .io import atomic_path

        tensors: dict[str, np.ndarray] = {}
        for name, st in self.stats.items():
            tensors[f"{name}::grad_sq"] = st.grad_sq
            tensors[f"{name}::row_grad_sq"] = st.row_grad_sq
            if st.input_mean is not None:
                tensors[f"{name}::input_mean"] = st.input_mean
                tensors[f"{name}::input_sq"] = st.input_sq
        meta = {
            "format": "cvxq-export-sensitivities",
            "version": str(STATS_FORMAT_VERSION),
            "settings": json.dumps(asdict(self.settings)),
            "model_fingerprint": self.model_fingerprint,
            "seconds": repr(self.seconds),
            "eigenvalues": json.dumps(self.eigenvalues),
        }
        with atomic_path(path) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "Sensitivities":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "np") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "cvxq-export-sensitivities":
                    raise CvxqError(f"{path} is not a cvxq-export sensitivities file", "run `cvxq-export calibrate` to make one")
                if meta.get("version") != str(STATS_FORMAT_VERSION):
                    raise CvxqError(f"{path} has sensitivities format version {meta.get('version')}, expected {STATS_FORMAT_VERSION}",
                                    "recalibrate with this version of cvxq-export")
                parts: dict[str, dict[str, np.ndarray]] = {}
                for key in f.keys():
                    name, _, field_name = key.rpartition("::")
                    parts.setdefault(name, {})[field_name] = f.get_tensor(key)
        except CvxqError:
            raise
        except Exception as exc:  # noqa: BLE001 - corrupt/truncated file
            raise CvxqError(f"cannot read sensitivities file {path}: {exc}", "delete it and recalibrate") from None
        stats = {name: WeightStats(p["grad_sq"], p["row_grad_sq"], p.get("input_mean"), p.get("input_sq")) for name, p in parts.items()}
        return cls(stats, CalibrationSettings(**json.loads(meta["settings"])), meta["model_fingerprint"],
                   float(meta.get("seconds", 0.0)), json.loads(meta.get("eigenvalues", "[]")))


def model_fingerprint(loaded: LoadedModel) -> str:
    """Cheap identity of the weights: shapes plus a hash of a strided sample of each."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for ref in loaded.weights:
            w = loaded.weight_tensor(ref)
            h.update(f"{ref.name}:{ref.rows}x{ref.cols};".encode())
            sample = w.reshape(-1)[:: max(1, w.numel() // 4096)].float().cpu().numpy()
            h.update(sample.tobytes())
    return h.hexdigest()[:16]


def _group_rows(x, row_group: int):
    """Mean over consecutive groups of ``row_group`` rows: [rows, cols] -> [ceil(rows/rg), cols]."""
    import torch

    rows, cols = x.shape
    n_groups = math.ceil(rows / row_group)
    pad = n_groups * row_group - rows
    if pad:
        x = torch.cat([x, x.new_zeros(pad, cols)])
    sums = x.view(n_groups, row_group, cols).sum(1)
    counts = torch.full((n_groups, 1), float(row_group), dtype=x.dtype, device=x.device)
    counts[-1] = row_group - pad
    return sums / counts


def output_directions(loaded: LoadedModel, windows: np.ndarray, n_pcs: int, device: str = "cpu"):
    """Top ``n_pcs`` principal directions of the logits, ``[V, k]``, and their variances."""
    import torch

    model = loaded.model
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise CvxqError(f"model type {loaded.model_type} has no output head this tool can find", "use a causal LM with an lm_head")
    captured: list = []
    hook = head.register_forward_hook(lambda m, inp, out: captured.append(inp[0].detach().reshape(-1, inp[0].shape[-1]).double()))
    d = head.weight.shape[1]
    total = torch.zeros(d, dtype=torch.float64, device=device)
    outer = torch.zeros(d, d, dtype=torch.float64, device=device)
    count = 0
    try:
        with torch.no_grad():
            for row in windows:
                model(input_ids=torch.as_tensor(row, device=device)[None])
                h = captured.pop()  # [T, d]
                total += h.sum(0)
                outer += h.T @ h
                count += h.shape[0]
    finally:
        hook.remove()
    mean = total / count
    cov_h = outer / count - torch.outer(mean, mean)  # [d, d]
    evals, evecs = torch.linalg.eigh(cov_h)
    root = evecs * evals.clamp_min(0).sqrt()  # [d, d]: C_h = root root^T
    a = head.weight.detach().double() @ root  # [V, d]: logits covariance = a a^T
    s_evals, q = torch.linalg.eigh(a.T @ a)  # same nonzero spectrum as a a^T
    order = torch.argsort(s_evals, descending=True)[:n_pcs]
    s_evals, q = s_evals[order], q[:, order]
    directions = (a @ q) / s_evals.clamp_min(1e-30).sqrt()  # [V, k], orthonormal columns
    return directions.float(), s_evals.float()


def probe_grad_sq(projected, signs, refs: list[WeightRef], params: dict, *, retain: bool = False):
    """One random-sign probe: backpropagate ``sum_tk s_tk y_tk`` and yield
    ``(name, G**2)`` with ``G`` the weight gradient ``[rows, cols]`` (float64).
    Over random signs, ``E[G**2] = sum_tk (dy_tk/dW)**2``."""
    for p in params.values():
        p.grad = None
    (projected * signs).sum().backward(retain_graph=retain)
    for ref in refs:
        g = params[ref.name].grad
        if g is None:  # weight unused by the forward pass
            continue
        g = (g.t() if ref.transposed else g).double()
        params[ref.name].grad = None  # free it before the next tensor's
        yield ref.name, g * g


def calibrate(loaded: LoadedModel, windows: np.ndarray, settings: CalibrationSettings, *, device: str = "cpu",
              progress: bool = True) -> Sensitivities:
    """Run CVXQ calibration over ``windows`` ``[n, seq_len]`` token ids."""
    import torch
    from tqdm.auto import tqdm

    start = time.perf_counter()
    model = loaded.model
    model.to(device)
    directions, variances = output_directions(loaded, windows[: settings.pca_windows], settings.n_pcs, device)
    k = directions.shape[1]

    refs = loaded.weights
    params = {ref.name: model.get_parameter(ref.name) for ref in refs}
    # Only the weights we quantize need gradients: norms and biases stay frozen.
    saved_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)

    grad_acc = {ref.name: torch.zeros(math.ceil(ref.rows / settings.row_group), ref.cols, dtype=torch.float64, device=device) for ref in refs}
    row_acc = {ref.name: torch.zeros(ref.rows, dtype=torch.float64, device=device) for ref in refs}
    in_sum: dict[str, torch.Tensor] = {}
    in_sq: dict[str, torch.Tensor] = {}
    n_inputs = {"tokens": 0}
    hooks = []
    for ref in refs:
        if ref.kind != "linear":
            continue
        module = model.get_submodule(ref.module)
        in_sum[ref.name] = torch.zeros(ref.cols, dtype=torch.float64, device=device)
        in_sq[ref.name] = torch.zeros(ref.cols, dtype=torch.float64, device=device)

        def hook(mod, inp, out, name=ref.name):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()  # [tokens, cols]
            in_sum[name] += x.sum(0)
            in_sq[name] += (x * x).sum(0)

        hooks.append(module.register_forward_hook(hook))

    gen = torch.Generator(device="cpu").manual_seed(settings.seed)
    try:
        bar = tqdm(windows, desc="calibrate", unit="window", disable=not progress)
        for row in bar:
            ids = torch.as_tensor(row, device=device)[None]
            logits = model(input_ids=ids).logits[0].float()  # [T, V]
            projected = logits @ directions  # [T, k]
            n_inputs["tokens"] += ids.shape[1]
            for probe in range(settings.probes):
                signs = (torch.randint(0, 2, projected.shape, generator=gen) * 2 - 1).to(projected)  # [T, k]
                for name, g2 in probe_grad_sq(projected, signs, refs, params, retain=probe + 1 < settings.probes):
                    grad_acc[name] += _group_rows(g2, settings.row_group)
                    row_acc[name] += g2.mean(1)
            del logits, projected
    finally:
        for h in hooks:
            h.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(saved_flags[name])
            p.grad = None

    n_samples = len(windows) * settings.probes
    stats: dict[str, WeightStats] = {}
    for ref in refs:
        grad_sq = (grad_acc[ref.name] / n_samples).float().cpu().numpy()
        if ref.kind == "embedding":
            grad_sq = _floor_unseen_rows(grad_sq)
        mean = sq = None
        if ref.name in in_sum:
            mean = (in_sum[ref.name] / n_inputs["tokens"]).float().cpu().numpy()
            sq = (in_sq[ref.name] / n_inputs["tokens"]).float().cpu().numpy()
        stats[ref.name] = WeightStats(grad_sq, (row_acc[ref.name] / n_samples).float().cpu().numpy(), mean, sq)
    return Sensitivities(stats, settings, model_fingerprint(loaded), time.perf_counter() - start,
                         [float(v) for v in variances[:k].tolist()])


def _floor_unseen_rows(grad_sq: np.ndarray) -> np.ndarray:
    """An input-only embedding gets no gradient for tokens absent from the
    calibration text; a zero would let the allocator erase those rows. Floor
    each column at a small fraction of its median so unseen tokens keep bits."""
    positive = np.where(grad_sq > 0, grad_sq, np.nan)
    floor = np.nan_to_num(np.nanmedian(positive, axis=0), nan=0.0) * 0.01  # [cols]
    return np.maximum(grad_sq, floor[None, :]).astype(np.float32)
