"""ONNX with QDQ nodes for ONNX Runtime behind the format interface
(:class:`~cvxq_export.formats.base.Format`).

Per tensor and group of input columns an option of bits x block x kind
(:mod:`.qdq`); the planner with its splits and decode-time model (:mod:`.target`,
:mod:`.speed`); the graph (:mod:`.graph`); the file judged in ONNX Runtime.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ...errors import CvxqError
from ...plan import Plan
from ..base import FitContext, FitOptions, FormatMenu, Written
from . import qdq, target


class OnnxFormat:
    name = "onnx"
    file_name = target.MODEL_FILE
    # decode at least 0.9 x as fast as ONNX Runtime's own 4-bit RTN file of about the same size
    default_decode_speed = 0.9
    kv_cache_dtype = "f32"  # the graph's past_key_values / present tensors are float32

    def check_supported(self, loaded, options: FitOptions) -> None:
        if options.scope != "all":
            raise CvxqError("the ONNX target quantizes every weight matrix, embedding included (--scope blocks is for "
                            "the packed format)", "drop --scope blocks, or use --format packed")
        target.check_supported(loaded)

    def size_range(self, loaded, options: FitOptions) -> tuple[int, int]:
        return target.size_range(loaded)

    def menu_key(self, options: FitOptions) -> str:
        return (f"col_group={qdq.DEFAULT_COL_GROUP};blocks={qdq.BLOCKS};options={len(qdq.OPTIONS)};"
                f"int2={qdq.int2_supported()}")

    def build_menu(self, ctx: FitContext, distortion: np.ndarray | None = None) -> FormatMenu:
        t0 = time.perf_counter()
        qmenu = qdq.build_menu(ctx.loaded, ctx.sens, ctx.loaded.weights, progress=ctx.options.progress,
                               distortion=distortion)
        return FormatMenu(qmenu.menu, qmenu, time.perf_counter() - t0, distortion is not None)

    def plan(self, ctx: FitContext, budget: int, menu: FormatMenu) -> Plan:
        plan, _ = target.plan_onnx(ctx.loaded, ctx.sens, budget, progress=ctx.options.progress, qmenu=menu.detail,
                                   decode_speed=ctx.options.speed_for(self))
        return plan

    def write(self, ctx: FitContext, plan: Plan, menu: FormatMenu | None, out_dir: Path) -> Written:
        t0 = time.perf_counter()
        info = target.write_and_verify(ctx.loaded, ctx.sens, plan, out_dir, progress=ctx.options.progress,
                                       hessians=ctx.hessians())
        v = info["verify"]
        ctx.log(f"onnx: ONNX Runtime fused {v['fusion']['matmulnbits']} MatMulNBits (bits {v['fusion']['bits']}) + "
                f"GatherBlockQuantized; greedy generation (fp32 compute) "
                f"{'identical to' if v['greedy_identical'] else 'DIFFERS from'} PyTorch")
        return Written(self.name, plan, Path(info["path"]), info["file_bytes"], info,
                       timings={"write_s": time.perf_counter() - t0})

    def evaluate(self, ctx: FitContext, written: Written) -> dict:
        e = target.evaluate_onnx(ctx.loaded, written.path, ctx.eval_windows, progress=ctx.options.progress)
        ctx.log(f"perplexity: PyTorch (same weights) {e['torch_perplexity']:.3f}, ONNX Runtime fp32 compute "
                f"{e['onnxruntime_exact_perplexity']:.3f} ({100 * e['relative_difference']:.3f} %), ONNX Runtime "
                f"default (int8 activations) {e['onnxruntime_perplexity']:.3f}")
        return e

    def curve(self, ctx: FitContext, plan: Plan, menu: FormatMenu):
        from ...analysis.rd_curve import rd_curve

        qmenu = menu.detail
        chosen = np.concatenate([np.asarray(plan.tensor(t.ref.name).unit_map, dtype=np.intp) for t in qmenu.tensors])
        return rd_curve(qmenu.menu, plan.fixed_bytes, plan.budget_bytes, chosen=chosen)
