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

Memory: each weight's gradient is squared into its float64 statistics by a
hook the moment autograd has accumulated it, and freed, so a backward pass
holds one weight gradient at a time, never ``.grad`` for the whole model.
The weights may be float32, bfloat16 or float16; the statistics are float32
squares summed in float64 whatever the weights are. Activation checkpointing
(transformers' own) recomputes each block in the backward pass when a
window's saved activations would cost more memory than the slack allowed
(:func:`use_checkpointing`); it changes the time, not the statistics.

Scale-out: under ``torch.distributed`` each rank calibrates windows
``rank::world_size`` and the sums are all-reduced (:mod:`.distributed`);
a model dispatched by accelerate (``load_model(..., device_map=...)``, parts
on CPU or disk) is calibrated through accelerate's own hooks.
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

from .activations import InputSums
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
    # E[x x^T] of each weight's input over the first windows ([cols, cols] float32, shared by weights that
    # share an input), when calibrate() was asked for them; not part of the saved file (see pipeline)
    input_moments: dict[str, np.ndarray] | None = field(default=None, repr=False, compare=False)

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


def _accelerate_hooks(module) -> list:
    """The accelerate ModelHooks on ``module`` (a SequentialHook flattened), or []."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", [hook]))


def _resident_weight(module, name: str = "weight"):
    """``module``'s parameter ``name`` as a real tensor: the parameter itself,
    or, where accelerate offloaded it (a ``meta`` placeholder between forward
    passes), the copy in the offload store (CPU memory or a disk memory-map)."""
    w = getattr(module, name)
    if w.device.type != "meta":
        return w
    for hook in _accelerate_hooks(module):
        store = getattr(hook, "weights_map", None)
        if store is not None:
            return store[name]
    raise CvxqError(f"weight {name} of a {type(module).__name__} is on the meta device and has no offload copy",
                    "load the model with load_model(..., device_map=..., offload_folder=DIR)")


def _ref_weight(loaded: LoadedModel, ref: WeightRef):
    """``[rows, cols]`` view of a quantizable weight, offloaded or not."""
    w = _resident_weight(loaded.model.get_submodule(ref.module), ref.name.rpartition(".")[2])
    return w.t() if ref.transposed else w


def model_fingerprint(loaded: LoadedModel) -> str:
    """Cheap identity of the weights: shapes plus a hash of a strided sample of each."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for ref in loaded.weights:
            w = _ref_weight(loaded, ref)
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
    """Top ``n_pcs`` principal directions of the logits, ``[V, k]``, and their variances.

    Under ``torch.distributed`` each rank runs windows ``rank::world_size`` and
    the covariance sums are all-reduced; rank 0's directions are broadcast so
    every rank projects on exactly the same ones."""
    import torch

    from . import distributed as dist

    model = loaded.model
    head = _output_head(loaded)
    d = head.weight.shape[1]
    total = torch.zeros(d, dtype=torch.float64, device=device)
    outer = torch.zeros(d, d, dtype=torch.float64, device=device)
    count = torch.zeros(1, dtype=torch.float64, device=device)
    in_device = _input_device(loaded, device)

    def accumulate_head_input(x):  # x: [1, T, d], the head's input
        h = x.reshape(-1, d).double().to(device)  # [T, d]
        total.add_(h.sum(0))
        outer.add_(h.T @ h)
        count.add_(h.shape[0])
        return x  # only the head's input is needed here, not the logits

    with _no_grad(loaded), _head_replaced(head, accumulate_head_input):
        for row in windows[dist.rank() :: dist.world_size()]:
            model(input_ids=torch.as_tensor(row, device=in_device)[None], use_cache=False)
    for t in (total, outer, count):
        dist.all_reduce_sum(t)
    mean = total / count
    cov_h = outer / count - torch.outer(mean, mean)  # [d, d]
    evals, evecs = torch.linalg.eigh(cov_h)
    root = evecs * evals.clamp_min(0).sqrt()  # [d, d]: C_h = root root^T
    # The logits' covariance is a a^T with a = W root ([V, d]); its nonzero
    # spectrum is that of a^T a = root^T (W^T W) root ([d, d]). Going through
    # the Gram matrix W^T W instead of forming a halves the [V, d] float64 work.
    # W is read in row blocks of at most ~256 MB of float64, so a large
    # vocabulary (Llama 3: 128k x 4096) never gets a whole float64 copy.
    w = _resident_weight(head)  # [V, d], model dtype
    block = max(1, (256 << 20) // (8 * d))
    gram = torch.zeros(d, d, dtype=torch.float64, device=device)
    for start in range(0, w.shape[0], block):
        wb = w[start : start + block].detach().double().to(device)  # [b, d]
        gram.add_(wb.T @ wb)
    s_evals, q = torch.linalg.eigh(root.T @ gram @ root)
    order = torch.argsort(s_evals, descending=True)[:n_pcs]
    s_evals, q = s_evals[order], q[:, order]
    lift = root @ q  # [d, k]
    # [V, k] = a q / sqrt(eig): orthonormal columns
    directions = torch.cat([w[start : start + block].detach().double().to(device) @ lift
                            for start in range(0, w.shape[0], block)]) / s_evals.clamp_min(1e-30).sqrt()
    directions, s_evals = directions.float(), s_evals.float()
    dist.broadcast_from_main(directions)
    dist.broadcast_from_main(s_evals)
    return directions, s_evals


def probe_grad_sq(projected, signs, refs: list[WeightRef], params: dict, *, retain: bool = False):
    """One random-sign probe: backpropagate ``sum_tk s_tk y_tk`` and yield
    ``(name, G**2)`` with ``G`` the weight gradient ``[rows, cols]`` (float32).
    Over random signs, ``E[G**2] = sum_tk (dy_tk/dW)**2``.

    This plain form holds every weight's gradient until the backward pass
    ends: fine for tests and small models. :func:`calibrate` squares each
    gradient in a hook instead (:class:`_GradSquares`)."""
    for p in params.values():
        p.grad = None
    (projected * signs).sum().backward(retain_graph=retain)
    for ref in refs:
        g = params[ref.name].grad
        if g is None:  # weight unused by the forward pass
            continue
        params[ref.name].grad = None  # the gradient buffer is ours now: square it in place
        g = g.t() if ref.transposed else g
        yield ref.name, g.float().square_()


class _GradSquares:
    """Per-weight statistics of squared gradients, filled by autograd hooks.

    A post-accumulate-grad hook on each quantized weight runs as soon as the
    backward pass has summed that weight's gradient (both uses of a tied
    embedding/head included): it squares the gradient in float32, adds its
    row-group means and row means to float64 sums, and drops ``.grad``. So at
    most one weight gradient (plus its float32 square) is alive at a time.

    A module whose weights accelerate offloads gets a fresh parameter on each
    forward pass; there an accelerate ModelHook chained after the offload
    hook puts the grad hook on the weight just loaded.
    """

    def __init__(self, loaded: LoadedModel, refs: list[WeightRef], row_group: int, device: str):
        import torch

        self.row_group = row_group
        self.grad_sum = {r.name: torch.zeros(math.ceil(r.rows / row_group), r.cols, dtype=torch.float64, device=device)
                         for r in refs}  # [ceil(rows/rg), cols]
        self.row_sum = {r.name: torch.zeros(r.rows, dtype=torch.float64, device=device) for r in refs}  # [rows]
        self._handles: list = []
        self._restore: list = []  # (module, its original accelerate hook)
        self._token = object()  # marks the parameters this instance has hooked
        for ref in refs:
            module = loaded.model.get_submodule(ref.module)
            attr = ref.name.rpartition(".")[2]
            if getattr(module, attr).device.type == "meta" and _accelerate_hooks(module):
                self._follow_offload(module, attr, ref)
            else:
                self._hook(getattr(module, attr), ref)

    def _hook(self, param, ref: WeightRef) -> None:
        # Marked on the parameter itself: offloaded modules create a parameter
        # per forward pass, and a freed one's id() can come back for the next.
        if getattr(param, "_cvxq_grad_squares", None) is self._token or not param.requires_grad:
            return
        param._cvxq_grad_squares = self._token
        param.grad = None  # a stale gradient would be summed into the first one
        self._handles.append(param.register_post_accumulate_grad_hook(lambda p, ref=ref: self._accumulate(p, ref)))

    def _follow_offload(self, module, attr: str, ref: WeightRef) -> None:
        import torch
        from accelerate.hooks import ModelHook, SequentialHook

        owner = self

        class HookLoadedWeight(ModelHook):
            def pre_forward(self, module, *args, **kwargs):  # runs after the offload hook has loaded the weight
                if torch.is_grad_enabled():
                    weight = getattr(module, attr)
                    weight.requires_grad_(True)
                    owner._hook(weight, ref)
                return args, kwargs

        original = module._hf_hook
        module._hf_hook = SequentialHook(original, HookLoadedWeight())  # accelerate's wrapper reads _hf_hook per call
        self._restore.append((module, original))

    def _accumulate(self, param, ref: WeightRef) -> None:
        g = param.grad
        param.grad = None  # the gradient buffer is ours now: square it in place, then let it go
        g = g.t() if ref.transposed else g  # [rows, cols]
        acc, row_acc = self.grad_sum[ref.name], self.row_sum[ref.name]
        # Whole row groups at a time, ~64 MB of float32 each: a 16-bit gradient's
        # float32 square (a copy) never costs a whole [V, d] embedding's worth.
        block = max(1, (64 << 20) // (4 * g.shape[1] * self.row_group)) * self.row_group
        for start in range(0, g.shape[0], block):
            g2 = g[start : start + block].float().square_()  # [b, cols] float32 (in place for float32 weights)
            acc[start // self.row_group : (start + g2.shape[0] + self.row_group - 1) // self.row_group] += \
                _group_rows(g2, self.row_group).to(acc.device)
            row_acc[start : start + g2.shape[0]] += g2.mean(1).to(acc.device)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        for module, original in self._restore:
            module._hf_hook = original
        self._handles, self._restore = [], []


def _no_grad(loaded: LoadedModel):
    """inference_mode, or no_grad for a model accelerate dispatched: its
    offload hooks swap parameters in and out during the pass, and a parameter
    created under inference_mode could never require a gradient later."""
    import torch

    return torch.no_grad() if getattr(loaded.model, "hf_device_map", None) else torch.inference_mode()


def _input_device(loaded: LoadedModel, device: str):
    """Where input ids go: ``device``, or for a model accelerate dispatched,
    the device of its input embedding (accelerate moves them on from there)."""
    if getattr(loaded.model, "hf_device_map", None):
        w = loaded.model.get_input_embeddings().weight
        return "cpu" if w.device.type == "meta" else w.device
    return device


def _has_dropout(config) -> bool:
    """True when any dropout probability in the config is nonzero: checkpointing
    runs the blocks in training mode, which would switch such dropout on."""
    text = getattr(config, "get_text_config", lambda: config)()
    return any(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
               for k, v in text.to_dict().items() if "dropout" in k or k.endswith("_pdrop"))


def use_checkpointing(loaded: LoadedModel, seq_len: int, device: str = "cpu") -> bool:
    """Whether activation checkpointing is needed: it costs one more forward pass per
    window (measured +40 % on SmolLM2, 4 x 512 tokens), so only when one window's
    saved activations (:func:`memory.activation_bytes`) exceed half of the memory
    still available. Never for a model with dropout (see :func:`_has_dropout`) or
    one transformers cannot checkpoint."""
    from .memory import activation_bytes, available_bytes

    model = loaded.model
    if not getattr(model, "supports_gradient_checkpointing", False) or _has_dropout(model.config):
        return False
    itemsize = next(model.parameters()).element_size()
    needed = activation_bytes(model.config, seq_len, itemsize)
    return needed > available_bytes(device) // 2


@contextmanager
def _activation_checkpointing(model, enabled: bool):
    """transformers' activation checkpointing, on for the duration.

    transformers checkpoints a block only when that block is in training mode;
    only the blocks' own flags are set, their submodules (attention, dropout)
    stay in eval mode, and models with dropout are never checkpointed, so the
    recomputed forward is the same computation."""
    if not enabled:
        yield
        return
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers < 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    blocks = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in blocks:
        m.training = True
    try:
        yield
    finally:
        for m in blocks:
            m.training = False
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()


def _plain_head(loaded: LoadedModel, row: np.ndarray, device: str) -> bool:
    """True when the model's logits are exactly ``head(head input)``: the model
    does not change them after the head (Llama, Qwen, OPT, GPT-2 do not;
    Gemma 2 soft-caps them, Granite divides them). Checked on a few tokens."""
    import torch

    model, head = loaded.model, _output_head(loaded)
    captured: list = []
    hook = head.register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
    try:
        with _no_grad(loaded):
            logits = model(input_ids=torch.as_tensor(row[:16], device=device)[None], use_cache=False).logits  # [1, t, V]
            direct = head(captured[-1])
    finally:
        hook.remove()
    return logits.shape == direct.shape and torch.allclose(logits.float(), direct.float(), rtol=1e-4, atol=1e-5)


def calibrate(loaded: LoadedModel, windows: np.ndarray, settings: CalibrationSettings, *, device: str = "cpu",
              progress: bool = True, checkpointing: bool | None = None, moment_windows: int = 0) -> Sensitivities:
    """Run CVXQ calibration over ``windows`` ``[n, seq_len]`` token ids.

    ``checkpointing``: activation checkpointing on/off; None decides by memory
    (:func:`use_checkpointing`). It does not change the result.
    ``moment_windows``: also sum the input second moments ``E[x x^T]`` that error
    feedback needs over the first that many windows (``Sensitivities.input_moments``),
    from the forward passes calibration runs anyway instead of a pass of their own.
    Under ``torch.distributed`` every rank passes the same ``windows`` and gets
    the same Sensitivities; each runs only its share of them."""
    import torch
    from tqdm.auto import tqdm

    from . import distributed as dist

    start = time.perf_counter()
    model = loaded.model
    if not getattr(model, "hf_device_map", None):  # a dispatched model stays where accelerate put it
        model.to(device)
    in_device = _input_device(loaded, device)
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
    # An offloaded head (weight on meta between passes) runs as the model runs it.
    projected_head = head.weight.device.type != "meta" and _plain_head(loaded, windows[0], in_device)
    directions_w = directions.to(head.weight.device) if projected_head else directions

    def project_through_head(x):  # x: [1, T, d] -> [1, T, k]
        y = x @ (directions_w.T.to(head.weight.dtype) @ head.weight).T  # [d, k] projected head
        return y + head.bias @ directions_w if getattr(head, "bias", None) is not None else y

    refs = loaded.weights
    params = {ref.name: model.get_parameter(ref.name) for ref in refs}
    # Only the weights we quantize need gradients: norms and biases stay frozen.
    saved_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)

    in_sum: dict[str, torch.Tensor] = {}
    in_sq: dict[str, torch.Tensor] = {}
    forward_pass = [False]  # True while the model's forward pass runs (not its recomputation)
    n_tokens = torch.zeros(1, dtype=torch.float64, device=device)
    hooks = []
    moments = InputSums(loaded, refs, outer=True, squares=False, device=device) if moment_windows > 0 else None
    if moments is not None:
        hooks += moments.register(lambda: forward_pass[0])
    for ref in refs:
        if ref.kind != "linear":
            continue
        module = model.get_submodule(ref.module)
        in_sum[ref.name] = torch.zeros(ref.cols, dtype=torch.float64, device=device)
        in_sq[ref.name] = torch.zeros(ref.cols, dtype=torch.float64, device=device)

        def hook(mod, inp, out, name=ref.name):
            if not forward_pass[0]:  # a checkpointed block recomputed in the backward pass: inputs already counted
                return
            # float32 sums over one window's tokens, float64 running sums over windows
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()  # [tokens, cols]
            in_sum[name] += x.sum(0).to(in_sum[name].device)
            in_sq[name] += (x * x).sum(0).to(in_sq[name].device)

        hooks.append(module.register_forward_hook(hook))

    if checkpointing is None:
        checkpointing = use_checkpointing(loaded, int(windows.shape[1]), device)
    grads = _GradSquares(loaded, refs, settings.row_group, device)
    gen = torch.Generator(device="cpu").manual_seed(settings.seed)
    rank, world = dist.rank(), dist.world_size()
    try:
        with (_head_replaced(head, project_through_head) if projected_head else nullcontext(),
              _activation_checkpointing(model, checkpointing)):
            bar = tqdm(windows, desc="calibrate", unit="window", disable=not progress or not dist.is_main())
            for i, row in enumerate(bar):
                # Every rank draws every window's signs in order, so a window gets
                # the same signs whichever rank (or how many ranks) runs it.
                signs = [(torch.randint(0, 2, (len(row), k), generator=gen) * 2 - 1) for _ in range(settings.probes)]
                if i % world != rank:
                    continue
                ids = torch.as_tensor(row, device=in_device)[None]
                if moments is not None:
                    moments.start_window(active=i < moment_windows)
                forward_pass[0] = True
                out = model(input_ids=ids, use_cache=False).logits[0].float()  # [T, k] projected, or [T, V] logits
                forward_pass[0] = False
                projected = out if projected_head else out @ directions.to(out.device)  # [T, k]
                n_tokens += ids.shape[1]
                for probe in range(settings.probes):
                    # the hooks of _GradSquares square and free each weight's gradient during this call
                    (projected * signs[probe].to(projected)).sum().backward(retain_graph=probe + 1 < settings.probes)
                del out, projected
    finally:
        grads.close()
        for h in hooks:
            h.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(saved_flags[name])
            p.grad = None

    # Sums and counts over all ranks' windows; with one process these are no-ops.
    for table in (grads.grad_sum, grads.row_sum, in_sum, in_sq):
        for t in table.values():
            dist.all_reduce_sum(t)
    dist.all_reduce_sum(n_tokens)
    n_samples = len(windows) * settings.probes
    tokens = float(n_tokens.item())
    stats: dict[str, WeightStats] = {}
    for ref in refs:
        grad_sq = (grads.grad_sum[ref.name] / n_samples).float().cpu().numpy()
        if ref.kind == "embedding":
            grad_sq = _floor_unseen_rows(grad_sq)
        mean = sq = None
        if ref.name in in_sum:
            mean = (in_sum[ref.name] / tokens).float().cpu().numpy()
            sq = (in_sq[ref.name] / tokens).float().cpu().numpy()
        if not np.isfinite(grad_sq).all():
            raise CvxqError(f"calibration gave {ref.name} non-finite sensitivities: the model's outputs or gradients "
                            "overflow on the calibration text", "check the model's weights (a damaged file?); calibrate in "
                            "float32 (--dtype float32) if it ran in 16 bits")
        stats[ref.name] = WeightStats(grad_sq, (grads.row_sum[ref.name] / n_samples).float().cpu().numpy(), mean, sq)
    return Sensitivities(stats, settings, model_fingerprint(loaded), time.perf_counter() - start,
                         [float(v) for v in variances[:k].tolist()],
                         _float32(moments.means(moments.outer_sums, dist.all_reduce_sum)) if moments is not None else None)


def _float32(means: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """float32 copies, one per shared array (q/k/v keep sharing one)."""
    done: dict[int, np.ndarray] = {}
    return {name: done.setdefault(id(a), a.astype(np.float32)) for name, a in means.items()}


def _floor_unseen_rows(grad_sq: np.ndarray) -> np.ndarray:
    """An input-only embedding gets no gradient for tokens absent from the
    calibration text; a zero would let the allocator erase those rows. Floor
    each column at a small fraction of its median so unseen tokens keep bits."""
    positive = np.where(grad_sq > 0, grad_sq, np.nan)
    floor = np.nan_to_num(np.nanmedian(positive, axis=0), nan=0.0) * 0.01  # [cols]
    return np.maximum(grad_sq, floor[None, :]).astype(np.float32)
