"""GGUF for llama.cpp behind the format interface (:class:`~cvxq_export.formats.base.Format`).

One ggml type per tensor (:mod:`.target`: menu, planner, writer, read-back);
llama.cpp's speed per type (:mod:`.speed`); the file judged in llama.cpp itself
(:mod:`.llama_eval`).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ...errors import CvxqError
from ...plan import Plan
from ..base import FitContext, FitOptions, FormatMenu, Written
from . import target


class GGUFFormat:
    name = "gguf"
    file_name = "model.gguf"
    # the speed limit's default: at 0.95 the files decode as fast as llama.cpp's presets at
    # 74 MB and faster above on SmolLM2 (docs/benchmarks.md, GGUF speed)
    default_decode_speed = 0.95
    kv_cache_dtype = "f16"  # llama.cpp's default cache type (--cache-type-k/v f16)

    def check_supported(self, loaded, options: FitOptions) -> None:
        if options.scope != "all":
            raise CvxqError("the GGUF target quantizes every weight matrix, embedding included (--scope blocks is for "
                            "the packed format)", "drop --scope blocks, or use --format packed")
        target.gguf_name_map(loaded)  # raises with the reason for an architecture it cannot name

    def size_range(self, loaded, options: FitOptions) -> tuple[int, int]:
        return target.size_range(loaded)

    def menu_key(self, options: FitOptions) -> str:
        return f"types={','.join(target.CANDIDATE_TYPES)}"

    def build_menu(self, ctx: FitContext, distortion: np.ndarray | None = None) -> FormatMenu:
        t0 = time.perf_counter()
        inputs = target.tensor_inputs(ctx.loaded, ctx.sens, ctx.loaded.weights)
        gmenu = target.build_menu(inputs, progress=ctx.options.progress, distortion=distortion)
        return FormatMenu(gmenu.menu, gmenu, time.perf_counter() - t0, distortion is not None)

    def plan(self, ctx: FitContext, budget: int, menu: FormatMenu) -> Plan:
        plan, _ = target.plan_gguf(ctx.loaded, ctx.sens, budget, progress=ctx.options.progress, gmenu=menu.detail,
                                   speed=ctx.options.speed_for(self), bias_correction=ctx.options.bias_correction)
        return plan

    def write(self, ctx: FitContext, plan: Plan, menu: FormatMenu | None, out_dir: Path) -> Written:
        loaded, options = ctx.loaded, ctx.options
        t0 = time.perf_counter()
        # the writer needs the weights in llama.cpp's order, not the menu's distortions
        inputs = menu.detail.inputs if menu is not None else target.tensor_inputs(loaded, ctx.sens, loaded.weights)
        hessians = ctx.hessians()
        result = target.write_gguf(loaded, plan, inputs, Path(out_dir) / self.file_name, progress=options.progress,
                                   hessians=hessians,
                                   input_means=target.input_means(loaded, ctx.sens) if options.bias_correction else None)
        checked = target.read_back_check(result, inputs)["llama_cpp_dequantizer"]
        target.set_torch_weights(loaded, result, inputs)
        types: dict[str, int] = {}
        for t in plan.tensors:
            types[t.option] = types.get(t.option, 0) + 1
        info = {"path": str(result.path), "file_bytes": result.size, "budget_bytes": plan.budget_bytes, "types": types,
                "source": loaded.source.kind, "notes": target.skeleton_notes(loaded),
                "readback_tensors_bit_exact": checked, "plan": plan.summary(), "error_feedback": bool(hessians),
                "source_grid_note": ("Q4_1 reproduces SmolLM2's source grid (lossless for Q4_1 tensors)"
                                     if "Q4_1" in types else None),
                "bias_correction": target.bias_note(result, options.bias_correction, loaded),
                "modeled_llama_cpp_us": target.modeled_speed(inputs, plan)}
        return Written(self.name, plan, result.path, result.size, info,
                       timings={"write_s": time.perf_counter() - t0})

    def evaluate(self, ctx: FitContext, written: Written) -> dict:
        """llama.cpp's perplexity against PyTorch's on the same (dequantized) weights, and a greedy sample."""
        from ...evaluate import evaluate
        from .llama_eval import llama_generate, llama_perplexity

        progress = ctx.options.progress
        path = str(written.path)
        torch_ppl = evaluate(ctx.loaded.model, ctx.eval_windows, progress=progress, desc="eval torch (gguf weights)")
        llama_ppl = llama_perplexity(path, ctx.eval_windows, progress=progress)
        rel = abs(llama_ppl.perplexity - torch_ppl.perplexity) / torch_ppl.perplexity
        result = {"torch_perplexity": torch_ppl.perplexity, "llama_cpp_perplexity": llama_ppl.perplexity,
                  "relative_difference": rel, "within_0.5_percent": rel <= 0.005}
        text, tps = llama_generate(path, "The capital of France is", 16)
        result["generation"] = {"prompt": "The capital of France is", "text": text, "decode_tokens_per_s": tps}
        ctx.log(f"perplexity: llama.cpp {llama_ppl.perplexity:.3f}, PyTorch (same weights) {torch_ppl.perplexity:.3f}, "
                f"difference {100 * rel:.3f} %")
        return result

    def curve(self, ctx: FitContext, plan: Plan, menu: FormatMenu):
        gmenu = menu.detail
        if ctx.options.bias_correction:  # the plan was made on the menu with the bias bytes charged
            gmenu = target.with_bias_bytes(gmenu, set(target.new_bias_names(ctx.loaded)))
        return target.rd_curve_of(gmenu, plan)
