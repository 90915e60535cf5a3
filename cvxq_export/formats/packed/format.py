"""The packed container behind the format interface (:class:`~cvxq_export.formats.base.Format`).

CVXQ's own menu (bit depth 0-8 x uniform / companded per row group x column,
:mod:`cvxq_export.native`), stored exactly as costed (:mod:`.container`; spec in
``docs/packed-format.md``), read back by an independent NumPy reader and a C decoder.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ...plan import Plan
from ..base import FitContext, FitOptions, FormatMenu, Written
from . import container


class PackedFormat:
    name = "packed"
    file_name = container.FILE_NAME
    default_decode_speed = None  # no runtime kernels to time: the plan minimises distortion only
    kv_cache_dtype = None  # the runtime that reads it is the user's: the device profile's cache type

    def check_supported(self, loaded, options: FitOptions) -> None:
        from ...pipeline import select_weights

        select_weights(loaded, options.scope)  # raises on an unknown scope

    def _geometry(self, options: FitOptions):
        from ...native import Geometry

        return Geometry(max_row_group=options.max_row_group)

    def size_range(self, loaded, options: FitOptions) -> tuple[int, int]:
        from ...pipeline import native_size_range, select_weights

        # the file's own header and alignment come on top of the native plan's range (calibration
        # may store a few biases corrected, which moves the exact figure by a few bytes: the
        # planner checks the exact one)
        refs = select_weights(loaded, options.scope)
        geometry = self._geometry(options)
        lo, hi = native_size_range(loaded, refs, geometry, 32)
        reserve = container.header_reserve(loaded, refs, geometry, 32, set(), scope=options.scope)
        return lo + reserve, hi + reserve

    def menu_key(self, options: FitOptions) -> str:
        from ...native import OPTIONS

        g = self._geometry(options)
        return f"scope={options.scope};max_row_group={g.max_row_group};col_group={g.col_group};options={OPTIONS}"

    def build_menu(self, ctx: FitContext, distortion: np.ndarray | None = None) -> FormatMenu:
        from ...native import build_menu
        from ...pipeline import select_weights

        t0 = time.perf_counter()
        nmenu = build_menu(ctx.loaded, ctx.sens, select_weights(ctx.loaded, ctx.options.scope),
                           self._geometry(ctx.options), progress=ctx.options.progress, distortion=distortion)
        return FormatMenu(nmenu.menu, nmenu, time.perf_counter() - t0, distortion is not None)

    def plan(self, ctx: FitContext, budget: int, menu: FormatMenu) -> Plan:
        return container.plan_packed(ctx.loaded, ctx.sens, budget, scope=ctx.options.scope,
                                     geometry=self._geometry(ctx.options), progress=ctx.options.progress,
                                     menu=menu.detail)

    def write(self, ctx: FitContext, plan: Plan, menu: FormatMenu | None, out_dir: Path) -> Written:
        t0 = time.perf_counter()
        # the model holds the weights as read back from the file (what evaluating it evaluates):
        # the read-back that verifies the file also loads it
        info = container.export_packed(ctx.loaded, ctx.sens, plan, out_dir, progress=ctx.options.progress,
                                       hessians=ctx.hessians(), load_into_model=True)
        ctx.log(f"packed: {info['path']} read back bit-exact")
        return Written(self.name, plan, Path(info["path"]), info["file_bytes"], info,
                       evaluation={"bias_corrected": info["bias_corrected"]},
                       timings={"write_s": time.perf_counter() - t0})

    def evaluate(self, ctx: FitContext, written: Written) -> dict:
        """Perplexity of the weights read from the file and of the original, and the KL between them."""
        from ...evaluate import evaluate

        device = str(next(ctx.loaded.model.parameters()).device)
        progress = ctx.options.progress
        reference = ctx.reference
        base = evaluate(reference, ctx.eval_windows, device=device, progress=progress, desc="eval original")
        quant = evaluate(ctx.loaded.model, ctx.eval_windows, reference, device=device, progress=progress,
                         desc="eval packed")
        ctx.log(f"perplexity: original {base.perplexity:.3f}, packed {quant.perplexity:.3f}, KL {quant.kl:.4f} nats/token")
        return {"original": base.to_dict(), "quantized": quant.to_dict()}

    def curve(self, ctx: FitContext, plan: Plan, menu: FormatMenu):
        from ...analysis.rd_curve import native_rd_curve

        return native_rd_curve(plan, menu.detail)
