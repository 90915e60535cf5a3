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

The projection is backpropagated through the head's weight projected on the
directions (``W^T directions``, ``[d, k]``), so the ``[T, V]`` logits and their
gradient are never formed; the head's weight still gets its full gradient.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import contextmanager, nullcontext
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
    full = rows // row_group
    # Whole groups are a reshape of the leading rows (no padded copy); a short
    # last group is averaged over the rows it has.
    means = x[: full * row_group].reshape(full, row_group, cols).sum(1).div_(row_group)  # [full, cols]
    if full * row_group < rows:
        means = torch.cat([means, x[full * row_group :].mean(0, keepdim=True)])
    return means


def _output_head(loaded: LoadedModel):
    head = loaded.model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise CvxqError(f"model type {loaded.model_type} has no output head this tool can find", "use a causal LM with an lm_head")
    return head


@contextmanager
def _head_replaced(head, forward):
    """Run the model with ``forward`` in place of the output head's own.

    The model's own forward pass still computes everything up to the head, so
    every architecture transformers supports keeps working; only the ``[T, V]``
    logits, the largest product of the pass, need not be formed."""
    # An instance attribute shadows the class's forward; keep one already there
    # (accelerate's device hooks wrap forward that way) to put it back after.
    previous = head.__dict__.get("forward")
    head.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


def output_directions(loaded: LoadedModel, windows: np.ndarray, n_pcs: int, device: str = "cpu"):
    """Top ``n_pcs`` principal directions of the logits, ``[V, k]``, and their variances."""
    import torch

    model = loaded.model
    head = _output_head(loaded)
    d = head.weight.shape[1]
    total = torch.zeros(d, dtype=torch.float64, device=device)
    outer = torch.zeros(d, d, dtype=torch.float64, device=device)
    count = 0

    def accumulate_head_input(x):  # x: [1, T, d], the head's input
        nonlocal count
        h = x.reshape(-1, d).double()  # [T, d]
        total.add_(h.sum(0))
        outer.add_(h.T @ h)
        count += h.shape[0]
        return x  # only the head's input is needed here, not the logits

    with torch.inference_mode(), _head_replaced(head, accumulate_head_input):
        for row in windows:
            model(input_ids=torch.as_tensor(row, device=device)[None], use_cache=False)
    mean = total / count
    cov_h = outer / count - torch.outer(mean, mean)  # [d, d]
    evals, evecs = torch.linalg.eigh(cov_h)
    root = evecs * evals.clamp_min(0).sqrt()  # [d, d]: C_h = root root^T
    # The logits' covariance is a a^T with a = W root ([V, d]); its nonzero
    # spectrum is that of a^T a = root^T (W^T W) root ([d, d]). Going through
    # the Gram matrix W^T W instead of forming a halves the [V, d] float64 work.
    w = head.weight.detach().double()  # [V, d]
    s_evals, q = torch.linalg.eigh(root.T @ (w.T @ w) @ root)
    order = torch.argsort(s_evals, descending=True)[:n_pcs]
    s_evals, q = s_evals[order], q[:, order]
    directions = (w @ (root @ q)) / s_evals.clamp_min(1e-30).sqrt()  # [V, k] = a q / sqrt(eig), orthonormal columns
    return directions.float(), s_evals.float()


def probe_grad_sq(projected, signs, refs: list[WeightRef], params: dict, *, retain: bool = False):
    """One random-sign probe: backpropagate ``sum_tk s_tk y_tk`` and yield
    ``(name, G**2)`` with ``G`` the weight gradient ``[rows, cols]`` (float32).
    Over random signs, ``E[G**2] = sum_tk (dy_tk/dW)**2``."""
    for p in params.values():
        p.grad = None
    (projected * signs).sum().backward(retain_graph=retain)
    for ref in refs:
        g = params[ref.name].grad
        if g is None:  # weight unused by the forward pass
            continue
        params[ref.name].grad = None  # the gradient buffer is ours now: square it in place
        g = g.t() if ref.transposed else g
        yield ref.name, g.square_()


def _plain_head(loaded: LoadedModel, row: np.ndarray, device: str) -> bool:
    """True when the model's logits are exactly ``head(head input)``: the model
    does not change them after the head (Llama, Qwen, OPT, GPT-2 do not;
    Gemma 2 soft-caps them, Granite divides them). Checked on a few tokens."""
    import torch

    model, head = loaded.model, _output_head(loaded)
    captured: list = []
    hook = head.register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
    try:
        with torch.inference_mode():
            logits = model(input_ids=torch.as_tensor(row[:16], device=device)[None], use_cache=False).logits  # [1, t, V]
            direct = head(captured[-1])
    finally:
        hook.remove()
    return logits.shape == direct.shape and torch.allclose(logits.float(), direct.float(), rtol=1e-4, atol=1e-5)


def calibrate(loaded: LoadedModel, windows: np.ndarray, settings: CalibrationSettings, *, device: str = "cpu",
              progress: bool = True) -> Sensitivities:
    """Run CVXQ calibration over ``windows`` ``[n, seq_len]`` token ids."""
    import torch
    from tqdm.auto import tqdm

    start = time.perf_counter()
    model = loaded.model
    model.to(device)
    directions, variances = output_directions(loaded, windows[: settings.pca_windows], settings.n_pcs, device)  # [V, k]
    k = directions.shape[1]
    head = _output_head(loaded)
    # Only y = logits @ directions ([T, k]) is backpropagated. For a plain head
    # (logits = h W^T + b; W: [V, d], h: its input [T, d]) that is
    # y = h (W^T directions) + b directions: the head's weight is projected to
    # [d, k] inside the graph, so W still gets its gradient, directions (S^T h).
    # The head then costs 2 V k d multiply-adds per window instead of
    # 3 T V d + 2 T V k (the logits, their gradients into h and W, and the
    # projection): about 7x fewer on SmolLM2 (T 512, k 128, d 576).
    projected_head = _plain_head(loaded, windows[0], device)

    def project_through_head(x):  # x: [1, T, d] -> [1, T, k]
        y = x @ (directions.T @ head.weight).T  # [d, k] projected head
        return y + head.bias @ directions if getattr(head, "bias", None) is not None else y

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
            # float32 sums over one window's tokens, float64 running sums over windows
            x = inp[0].detach().reshape(-1, inp[0].shape[-1])  # [tokens, cols]
            in_sum[name] += x.sum(0)
            in_sq[name] += (x * x).sum(0)

        hooks.append(module.register_forward_hook(hook))

    gen = torch.Generator(device="cpu").manual_seed(settings.seed)
    try:
        with _head_replaced(head, project_through_head) if projected_head else nullcontext():
            bar = tqdm(windows, desc="calibrate", unit="window", disable=not progress)
            for row in bar:
                ids = torch.as_tensor(row, device=device)[None]
                out = model(input_ids=ids, use_cache=False).logits[0].float()  # [T, k] projected, or [T, V] logits
                projected = out if projected_head else out @ directions  # [T, k]
                n_inputs["tokens"] += ids.shape[1]
                for probe in range(settings.probes):
                    signs = (torch.randint(0, 2, projected.shape, generator=gen) * 2 - 1).to(projected)  # [T, k]
                    for name, g2 in probe_grad_sq(projected, signs, refs, params, retain=probe + 1 < settings.probes):
                        grad_acc[name] += _group_rows(g2, settings.row_group)
                        row_acc[name] += g2.mean(1)
                        del g2  # free each [rows, cols] buffer before the next one is squared
                del out, projected
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
