"""The format interface: what every output format gives ``fit``.

One allocator, many menus. A format says which sizes it can reach from the
model's shapes alone (``size_range``, before any long work), builds its menu
(per-unit options with exact costs and measured distortions), turns a budget
into a :class:`~cvxq_export.plan.Plan`, writes the file and reads it back, and
evaluates it in its own runtime. ``fit`` is one loop over the requested formats
(:mod:`cvxq_export.api`); the registry (:mod:`.registry`) maps names to them.

Stages hand each other plain data: :class:`FitOptions` (what the user asked),
:class:`FitContext` (model, sensitivities, shared inputs), :class:`FormatMenu`,
:class:`~cvxq_export.plan.Plan`, :class:`Written`.

Importing this module pulls in no torch, onnx, gguf or llama.cpp.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:  # only for annotations: keeps `import cvxq_export` light
    import numpy as np

    from ..allocate import Menu
    from ..calibrate import Sensitivities
    from ..model import LoadedModel
    from ..plan import Plan


@dataclass(frozen=True)
class FitOptions:
    """The user's choices that shape a plan or a file (every format reads what applies to it)."""

    scope: str = "all"  # "all" weight matrices, or only the transformer "blocks" (native / packed)
    max_row_group: int = 256  # rows per native unit, at most
    decode_speed: float | None = None  # None: the format's default; 0: no speed limit
    error_feedback: bool = True  # GPTQ-style error feedback while rounding
    bias_correction: bool = False  # GGUF: write CVXQ's bias correction as optional bias tensors
    progress: bool = True

    def speed_for(self, fmt: "Format") -> float | None:
        """``decode_speed`` for ``fmt``: its default when not given; None means no limit."""
        r = fmt.default_decode_speed if self.decode_speed is None else self.decode_speed
        return r or None


@dataclass
class FitContext:
    """What every format's menu, plan, writer and evaluation read."""

    loaded: "LoadedModel"
    sens: "Sensitivities"
    options: FitOptions
    sens_key: str = ""  # identifies the sensitivities (their cache key): menus are cached under it
    eval_windows: "np.ndarray | None" = None  # [n, seq_len] token ids, or None for no evaluation
    eval_text: str | None = None  # where the evaluation windows came from (for the report)
    hessian_source: Callable[[], dict] | None = None  # collects E[x x^T] per weight (error feedback)
    log: Callable[[str], None] = lambda msg: None
    reference: Any = None  # the original model (torch), kept when evaluating formats that report KL against it
    _hessians: dict | None = field(default=None, repr=False)

    def hessians(self) -> dict | None:
        """Input second moments for error feedback, collected once and shared by every format;
        None when error feedback is off."""
        if not self.options.error_feedback or self.hessian_source is None:
            return None
        if self._hessians is None:
            self._hessians = self.hessian_source()
        return self._hessians


@dataclass
class FormatMenu:
    """A format's menu: the allocator's arrays plus the format's own description of its units."""

    menu: "Menu"  # cost (in ``menu.unit``: "bits" or "bytes") and distortion per unit x option
    detail: Any  # the format's own menu object (units, legal options, the inputs it quantized)
    built_s: float = 0.0
    cached: bool = False


@dataclass
class Written:
    """One format's output: its plan, its file on disk, what its checks found."""

    format: str
    plan: "Plan"
    path: Path
    file_bytes: int
    info: dict  # format-specific results: read-back, types, splits, runtime checks
    evaluation: dict = field(default_factory=dict)
    curve: Any = None  # size-vs-distortion curve (analysis.rd_curve.RDCurve) or None
    timings: dict = field(default_factory=dict)


class Format(Protocol):
    """An output format. ``fit`` calls these in order; each returns plain data."""

    name: str  # registry name, e.g. "gguf"
    file_name: str  # the model file it writes inside the output directory
    default_decode_speed: float | None  # --decode-speed when not given (None: no speed model)
    # The KV cache element type its runtime allocates (a device budget charges that cache);
    # None: the device profile's kv_cache_dtype (a format with no runtime of its own).
    kv_cache_dtype: str | None

    def check_supported(self, loaded: "LoadedModel", options: FitOptions) -> None:
        """Raise CvxqError (with the fix) when this model or these options cannot be exported."""

    def size_range(self, loaded: "LoadedModel", options: FitOptions) -> tuple[int, int]:
        """Smallest and largest achievable file sizes in bytes, from shapes alone."""

    def menu_key(self, options: FitOptions) -> str:
        """The menu settings its cache entry depends on (besides the sensitivities)."""

    def build_menu(self, ctx: FitContext, distortion: "np.ndarray | None" = None) -> FormatMenu:
        """Every unit's options with exact cost and measured distortion; with ``distortion``
        (a cached ``[n_units, n_options]`` array) only the cheap layout is rebuilt."""

    def plan(self, ctx: FitContext, budget: int, menu: FormatMenu) -> "Plan":
        """Allocate under ``budget`` bytes of file on disk."""

    def write(self, ctx: FitContext, plan: "Plan", menu: FormatMenu | None, out_dir: Path) -> Written:
        """Quantize under ``plan``, write the file atomically, read it back and check it.
        Leaves ``ctx.loaded.model`` holding the weights the file decodes to."""

    def evaluate(self, ctx: FitContext, written: Written) -> dict:
        """Run the file in its runtime against PyTorch on ``ctx.eval_windows``."""

    def curve(self, ctx: FitContext, plan: "Plan", menu: FormatMenu) -> Any:
        """The plan's size-vs-distortion curve from its menu (or None)."""
