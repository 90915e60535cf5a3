"""The one Python verb behind ``cvxq-export fit`` and ``plan``.

    from cvxq_export import api
    result = api.fit("path/to/model", budget="90MB", formats=["gguf"], output="out/")
    result.formats["gguf"].file        # out/model.gguf

``fit`` is one loop over the requested formats from one calibration:
check every input and each format's reachable sizes (seconds), load and
calibrate (cached), then per format: menu (cached) -> plan -> write and read
back -> evaluate in its runtime; at the end the compressibility analysis and
one report covering every format. ``write=False`` stops after the plans.

With one format its files go into ``output``; with several each format gets
``output/<format>/`` and the report stays at the top.
"""
from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .checks import check_output_dir, check_positive, check_ratio, check_seed, check_text
from .errors import CvxqError, InfeasibleBudget
from .formats.base import FitContext, FitOptions, FormatMenu, Written
from .formats.registry import get_format, parse_formats
from .formats.registry import names as registry_names

PLAN_FILE = "plan.json"
DEFAULT_FORMAT = "gguf"  # with --budget only: llama.cpp runs on every device profile we ship


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


@dataclass
class FormatOutcome:
    """What ``fit`` made for one format."""

    format: str
    directory: str
    plan_path: str
    plan: dict  # Plan.summary()
    file: str | None = None  # the model file, when written
    file_bytes: int | None = None
    info: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    menu_cached: bool = False
    timings: dict = field(default_factory=dict)


@dataclass
class FitResult:
    output: str
    formats: dict[str, FormatOutcome]
    budget_bytes: int
    device_budgets: dict[str, dict] | None  # format -> the device's memory split (with --device)
    sensitivities: str
    calibration_cached: bool
    timings: dict
    report: str | None = None
    report_html: str | None = None
    analysis: dict = field(default_factory=dict)  # format -> compact summary (best codec, devices that gain)
    compressed: dict | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- checks before long work


def resolve_budget(budget: int | str | None, device: str | None, loaded=None,
                   context: int | None = None, kv_dtype: str | None = None) -> tuple[int, dict | None]:
    """Bytes for the model file, and the device breakdown when it came from a profile.
    Without ``loaded`` a device only validates (the budget needs the model's shape): -1."""
    from .devices import load_device, model_shape_from_config, weight_budget
    from .sizes import parse_size

    if budget is not None and device:
        raise CvxqError("both --budget and --device given", "pass one: --budget overrides the device's budget, so drop --device")
    if budget is not None:
        return (parse_size(budget) if isinstance(budget, str) else int(budget)), None
    if device:
        profile = load_device(device)
        if loaded is None:
            return -1, None
        bd = weight_budget(profile, model_shape_from_config(loaded.config), context, kv_dtype)
        return bd.weights, bd.to_dict()
    raise CvxqError("no budget given", "pass --budget SIZE (e.g. 90MB) or --device NAME (see `cvxq-export devices`)")


def default_formats(device: str | None) -> list[str]:
    """The device profile's own format, or GGUF when only a byte budget is given."""
    if device:
        from .devices import load_device

        return [load_device(device).default_format]
    return [DEFAULT_FORMAT]


def check_compress(compress: str, formats: Sequence[str], analysis: bool) -> None:
    if compress == "none":
        return
    if "packed" not in formats:
        raise CvxqError(f"--compress {compress} needs the packed format", "add --format packed, or drop --compress")
    if compress == "auto":
        if not analysis:
            raise CvxqError("--compress auto decides from the analysis, which --no-analysis turns off",
                            "drop --no-analysis, or name the codec: --compress zstd-3")
        return
    from .formats.packed.compressed import parse_codec

    parse_codec(compress)  # raises a CvxqError naming the codecs the container holds


def _load_plan(path: str | Path, formats: list[str] | None):
    from .plan import Plan

    plan = Plan.load(path)
    if plan.format not in registry_names():
        raise CvxqError(f"{path} is a '{plan.format}' plan, which no file format writes",
                        "make the plan with `cvxq-export plan --format gguf|onnx|packed`")
    if formats and formats != [plan.format]:
        raise CvxqError(f"{path} is a {plan.format} plan, but --format asks for {','.join(formats)}",
                        f"pass --format {plan.format}, or re-plan for {','.join(formats)}")
    return plan


# --------------------------------------------------------------------------- the verb


def fit(model: str | None = None, *, budget: int | str | None = None, device: str | None = None,
        formats: Sequence[str] | str | None = None, output: str | Path, options: FitOptions | None = None,
        calibration: str | None = None, settings=None, eval_text: str | None = None, eval_windows: int = 20,
        context: int | None = None, plan: str | Path | None = None, write: bool = True, analysis: bool = True,
        compress: str = "none", force: bool = False, torch_device: str | None = None, use_cache: bool = True,
        dtype: str = "auto", offload_dir: str | None = None,
        log: Callable[[str], None] = _stderr) -> FitResult:
    """Fit ``model`` (an HF directory, a .gguf file, a cached hub id, or None for the default
    model) into ``budget`` bytes (or a ``device`` profile's budget) and write each of
    ``formats`` into ``output``. See the module docstring."""
    from .calibrate import CalibrationSettings

    t_start = time.perf_counter()
    options = options or FitOptions()
    settings = settings or CalibrationSettings()
    # ---- everything that can fail fast, before loading or calibrating
    names = parse_formats(",".join(formats) if isinstance(formats, (list, tuple)) else formats)
    reused = _load_plan(plan, names) if plan else None
    if reused is not None:
        names = [reused.format]
    else:
        resolve_budget(budget, device)  # validates the size text or the device profile; raises with neither
    if not names:
        names = default_formats(device)
        log(f"format: {names[0]} ({f'the default of device {device}' if device else 'the default with --budget'}; "
            f"--format gguf,onnx,packed chooses)")
    check_text(calibration, "calibration")
    check_text(eval_text, "eval-text")
    check_positive(windows=settings.n_windows, seq_len=settings.seq_len, n_pcs=settings.n_pcs, eval_windows=eval_windows,
                   max_row_group=options.max_row_group, context=context, probes=settings.probes,
                   pca_windows=settings.pca_windows)
    check_seed(settings.seed)
    check_ratio("decode-speed", options.decode_speed, hint="pass a ratio such as 0.9, or 0 for no limit")
    check_compress(compress, names, analysis)
    fmts = {n: get_format(n) for n in names}
    out = check_output_dir(output, force)
    dirs = {n: (out if len(names) == 1 else out / n) for n in names}
    timings: dict[str, Any] = {}

    check_architecture(model, names)

    # ---- load, then every format's reachable sizes from the shapes alone
    t = time.perf_counter()
    loaded, tdev = load(model, torch_device, dtype=dtype, offload_dir=offload_dir, log=log)
    timings["load_s"] = time.perf_counter() - t
    for fmt in fmts.values():
        fmt.check_supported(loaded, options)
    budgets: dict[str, int] = {}
    breakdowns: dict[str, dict] = {}  # per format: its runtime's KV cache differs
    if reused is not None:
        budgets[reused.format] = reused.budget_bytes
    else:
        for n, fmt in fmts.items():
            b, breakdown = resolve_budget(budget, device, loaded, context, fmt.kv_cache_dtype)
            if breakdown is not None:
                breakdowns[n] = breakdown
            lo, hi = fmt.size_range(loaded, options)
            if breakdown is not None and b > hi:  # a device with room to spare: the largest file fits
                from .sizes import format_size

                log(f"{n}: device budget {format_size(b)} exceeds the largest plan ({format_size(hi)}); using that")
                b = hi
            if not lo <= b <= hi:
                raise InfeasibleBudget(b, lo, hi) if len(fmts) == 1 else _infeasible_for(n, b, lo, hi)
            budgets[n] = b

    # ---- calibrate once for every format (cached)
    from .pipeline import calibrate_cached, input_hessians_cached, moments_fit_alone

    t = time.perf_counter()
    outcome = calibrate_cached(loaded, calibration, settings, device=tdev, progress=options.progress, use_cache=use_cache,
                               moments=write and options.error_feedback)
    timings["calibration_s"] = time.perf_counter() - t
    timings["calibration_cached"] = outcome.cached
    log(f"sensitivities: {outcome.path} ({'cached' if outcome.cached else f'{outcome.sens.seconds:.0f} s'})")
    windows = None
    if eval_text and write:
        from .textdata import evaluation_windows

        windows = evaluation_windows(loaded.tokenizer, eval_text, eval_windows, settings.seq_len).ids

    def hessian_source():
        if outcome.moments is not None:
            timings["input_moments_s"] = 0.0  # their cost is inside calibration_s
            timings["input_moments_during_calibration"] = True
            log("error feedback: input second moments collected during calibration (turn off with --no-error-feedback)")
            return outcome.moments
        t0 = time.perf_counter()
        h, cached = input_hessians_cached(loaded, calibration, settings, progress=options.progress, use_cache=use_cache)
        timings["input_moments_s"] = time.perf_counter() - t0
        if h is None:
            from .sizes import format_size

            _, need, free = moments_fit_alone(loaded, tdev)
            log(f"error feedback: off: the input second moments of this model take {format_size(need)}, more than "
                f"half the free memory ({format_size(free)}); each block is rounded on its own (--no-error-feedback "
                "says so up front)")
            return None
        log(f"error feedback: input second moments {'from the cache' if cached else 'collected and cached'} "
            f"(turn off with --no-error-feedback)")
        return h

    ctx = FitContext(loaded, outcome.sens, options, sens_key=outcome.path.stem, eval_windows=windows,
                     eval_text=eval_text, hessian_source=hessian_source, log=log)
    # Each format leaves the model holding its file's weights; the next one starts from the original.
    original = _snapshot(loaded, out) if write and len(fmts) > 1 else None
    if windows is not None and any(n == "packed" for n in fmts):
        ctx.reference = copy.deepcopy(loaded.model)  # packed reports KL against the original model

    results: dict[str, FormatOutcome] = {}
    sections = []
    notes: list[str] = []
    try:
        for i, (n, fmt) in enumerate(fmts.items()):
            if i and original is not None:
                _restore(loaded, original)
            outcome_n, section = _one_format(ctx, fmt, budgets[n], dirs[n], reused, write, outcome.path.parent, log)
            results[n] = outcome_n
            sections.append(section)
            notes += [f"{n} plan: {x}" for x in section.plan.notes]
            timings[n] = outcome_n.timings
    finally:
        if original is not None:
            original.close()
    result = FitResult(str(out), results, budgets[names[0]], breakdowns or None, str(outcome.path), outcome.cached, timings,
                       notes=notes)
    if write:
        _finish(result, sections, loaded, outcome.sens, out, compress, analysis, options, log)
    result.timings["total_s"] = time.perf_counter() - t_start
    return result


def check_architecture(model, formats: list[str]):
    """Read the source's header (no weights) and refuse an architecture no requested
    format writes; returns the header."""
    from .architectures import check_source, read_header
    from .model import resolve_source

    source = resolve_source(model)
    header = read_header(source)
    check_source(header, formats, source.display)
    if "gguf" in formats and header.kind != "gguf" and header.architecture is not None:
        # the hyperparameters llama.cpp would misread are visible in config.json alone
        from transformers import AutoConfig

        from .formats.gguf.hparams import hyperparameters

        config = AutoConfig.from_pretrained(source.path, local_files_only=True)
        hyperparameters(config, header.architecture, source.display)
    return header


def _infeasible_for(name: str, budget: int, lo: int, hi: int) -> CvxqError:
    err = InfeasibleBudget(budget, lo, hi)
    return CvxqError(f"{name}: {err.problem}", err.fix)


def load(model, torch_device: str | None = None, *, dtype: str = "auto", offload_dir: str | None = None,
         log: Callable[[str], None] = _stderr):
    """(LoadedModel, torch device). ``dtype`` "auto" calibrates in float32 when that fits
    this machine's memory, else bfloat16; ``offload_dir`` spreads a model larger than
    memory over the devices, the CPU and that directory (accelerate's big-model loading)."""
    from .model import load_model

    if torch_device is None:
        import torch

        torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    from .distributed import init_from_environment

    init_from_environment(torch_device)
    log(f"loading {model or 'default model (SmolLM2-135M-Instruct)'} ...")
    if offload_dir:
        Path(offload_dir).mkdir(parents=True, exist_ok=True)
        return load_model(model, device=torch_device, dtype=dtype, device_map="auto",
                          offload_folder=str(offload_dir)), torch_device
    return load_model(model, device=torch_device, dtype=dtype), torch_device


@dataclass
class WeightSnapshot:
    """The model's parameters before a format wrote its weights into them, kept on disk
    one file per tensor (written and read back one tensor at a time), so that fitting
    several formats never holds a second copy of the weights in memory."""

    directory: Path
    files: dict[str, str]  # state_dict name -> file (tied names share one)
    biasless: set[str]  # modules without a bias (a GGUF export may add one)

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.directory, ignore_errors=True)


def _snapshot(loaded, parent: Path) -> WeightSnapshot:
    import tempfile

    import torch

    directory = Path(tempfile.mkdtemp(prefix=".weights-", dir=parent))
    files: dict[str, str] = {}
    seen: dict[tuple[int, int], str] = {}  # (data pointer, numel) -> file: tied parameters stored once
    for i, (name, t) in enumerate(loaded.model.state_dict().items()):
        key = (t.data_ptr(), t.numel())
        if key not in seen:
            seen[key] = str(directory / f"{i}.pt")
            torch.save(t.detach().cpu().clone(), seen[key])
        files[name] = seen[key]
    biasless = {name for name, m in loaded.model.named_modules() if hasattr(m, "bias") and getattr(m, "bias", None) is None}
    return WeightSnapshot(directory, files, biasless)


def _restore(loaded, snap: WeightSnapshot) -> None:
    import torch

    with torch.no_grad():
        for name in snap.biasless:
            m = loaded.model.get_submodule(name)
            if getattr(m, "bias", None) is not None:
                m.bias = None
        state = loaded.model.state_dict()
        for name, path in snap.files.items():
            state[name].copy_(torch.load(path, mmap=True, weights_only=True))


def _built_menu(ctx: FitContext, fmt, **kwargs) -> FormatMenu:
    """``fmt.build_menu``, with a menu that overflows (a damaged model) as a clear error."""
    from .allocate import NonFiniteDistortion

    try:
        return fmt.build_menu(ctx, **kwargs)
    except NonFiniteDistortion as exc:
        largest = max(float(p.detach().abs().max()) for p in ctx.loaded.model.parameters() if p.numel())
        raise CvxqError(f"the {fmt.name} menu of {ctx.loaded.source.display} has a NaN or infinite distortion "
                        f"(unit {exc.unit}): its errors overflow float32 (largest |weight| {largest:.3g})",
                        "check the model file; it is probably damaged") from None


def menu_for(ctx: FitContext, fmt, cache_dir: Path, log=_stderr) -> FormatMenu:
    """The format's menu, from the cache next to the sensitivities when it is there."""
    from .menu_cache import load_distortion, menu_path, save_distortion

    path = menu_path(cache_dir, ctx.sens_key, fmt.name, fmt.menu_key(ctx.options))
    cached = load_distortion(path) if ctx.sens_key else None
    if cached is not None:
        try:
            menu = fmt.build_menu(ctx, distortion=cached)
            log(f"{fmt.name} menu: cached ({path.name})")
            return menu
        except ValueError:  # a stale entry (another model layout): rebuild it
            pass
    menu = _built_menu(ctx, fmt)
    if ctx.sens_key:
        save_distortion(path, menu.menu.distortion)
    log(f"{fmt.name} menu: {menu.built_s:.0f} s, {menu.menu.n_units:,} units x {menu.menu.n_options} options "
        f"(cached for the next budget)")
    return menu


def _one_format(ctx: FitContext, fmt, budget: int, out_dir: Path, reused, write: bool, cache_dir: Path, log):
    from .report import Artifact, FormatSection
    from .sizes import format_size

    timings: dict[str, Any] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    menu = None
    if reused is None:
        t = time.perf_counter()
        menu = menu_for(ctx, fmt, cache_dir, log)
        timings["menu_s"] = time.perf_counter() - t
        t = time.perf_counter()
        plan = fmt.plan(ctx, budget, menu)
        timings["plan_s"] = time.perf_counter() - t
    else:
        plan = reused
    plan_path = out_dir / PLAN_FILE
    plan.save(plan_path)
    s = plan.summary()
    gap = f", within {100 * s['gap']:.2f} % of the best plan of its menu" if s.get("gap") is not None else ""
    log(f"{fmt.name} plan: {format_size(plan.total_bytes)} of {format_size(plan.budget_bytes)} budget, "
        f"{s['bits_per_weight']:.3f} bits/weight{gap}")
    for note in plan.notes:
        log(f"{fmt.name} plan: {note}")
    outcome = FormatOutcome(fmt.name, str(out_dir), str(plan_path), s, menu_cached=bool(menu and menu.cached),
                            timings=timings)
    section = FormatSection(fmt.name, plan)
    if not write:
        if menu is not None:
            section.curve = fmt.curve(ctx, plan, menu)
        return outcome, section
    t = time.perf_counter()
    written: Written = fmt.write(ctx, plan, menu, out_dir)
    timings["write_s"] = time.perf_counter() - t
    log(f"{fmt.name}: {written.path} {format_size(written.file_bytes)} (budget {format_size(plan.budget_bytes)})")
    if written.file_bytes > plan.budget_bytes:  # each writer checks this too; the promise is the file on disk
        raise AssertionError(f"{written.path} is {written.file_bytes} bytes, over the budget {plan.budget_bytes}")
    evaluation = dict(written.evaluation)
    if ctx.eval_windows is not None:
        t = time.perf_counter()
        evaluation["eval"] = {"text": ctx.eval_text, **fmt.evaluate(ctx, written)}
        timings["evaluate_s"] = time.perf_counter() - t
    curve = fmt.curve(ctx, plan, menu) if menu is not None else None
    outcome.file, outcome.file_bytes, outcome.info, outcome.evaluation = (str(written.path), written.file_bytes,
                                                                          written.info, evaluation)
    section.artifact = Artifact(fmt.name, str(written.path), written.file_bytes)
    section.evaluation, section.curve, section.info = evaluation, curve, written.info
    return outcome, section


def _finish(result: FitResult, sections, loaded, sens, out: Path, compress: str, run_analysis_: bool,
            options: FitOptions, log) -> None:
    """The compressibility analysis of every file, the compressed container when asked, the report."""
    from .analysis.advice import Artifact, container_choice, run_analysis
    from .report import write_report

    notes = result.notes
    if any(s.curve is None for s in sections):
        notes.append("size-vs-distortion curve: it is traced from the allocator's menu, which a plan reused with "
                     "--plan does not have")
    artifacts = [s.artifact for s in sections if s.artifact is not None]
    analysis: dict[str, dict] = {}
    if not run_analysis_:
        notes.append("analysis: skipped (--no-analysis)")
    elif artifacts:
        t = time.perf_counter()
        analysis = run_analysis(artifacts, progress=options.progress, log=log)
        result.timings["analysis_s"] = time.perf_counter() - t
    extra = []
    packed = next((a for a in artifacts if a.format == "packed"), None)
    if compress != "none" and packed is not None:
        from .formats.packed.compressed import DEFAULT_CHUNK_BYTES
        from .formats.packed.container import write_compressed_packed

        choice = container_choice(analysis["packed"], force_codec=None if compress == "auto" else compress) \
            if "packed" in analysis else None
        if compress == "auto" and choice is None:
            notes.append("compressed container: not written: the analysis predicts no device on which the packed file "
                         "would load at least 5 % faster compressed (--compress zstd-3 writes one anyway)")
        else:
            codec = choice["codec"] if choice else compress
            chunk = choice["chunk_bytes"] if choice else DEFAULT_CHUNK_BYTES
            info = write_compressed_packed(packed.path, codec=codec, chunk_size=chunk, progress=options.progress)
            if choice and not choice["forced"]:
                reason = (f"Chosen by the analysis: on {choice['device']} it is predicted to load "
                          f"{1000 * choice['saving_s']:.0f} ms ({100 * choice['saving_fraction']:.0f} %) faster.")
            elif choice:
                reason = (f"Forced with --compress {compress}; the analysis predicts at best {1000 * choice['saving_s']:.0f} ms "
                          f"({100 * choice['saving_fraction']:.1f} %) on {choice['device']}, not enough to recommend it.")
            else:
                reason = f"Forced with --compress {compress} (no analysis)."
            result.compressed = {**info, "reason": reason}
            extra.append(Artifact("packed-compressed", info["path"], info["file_bytes"]))
            log(f"compressed container: {info['path']} {info['file_bytes']:,} bytes ({100 * info['ratio']:.1f} %), "
                f"{codec} in {chunk >> 10} KiB chunks, read back through the packed reader")
    for fmt, r in analysis.items():
        best = min(r["codecs"], key=lambda c: c["ratio"]) if r["codecs"] else None
        result.analysis[fmt] = {"best_codec": best["name"] if best else None, "best_ratio": best["ratio"] if best else None,
                                "compress_on": [d["device"] for d in r["devices"] if d["compress"]]}
        if best:
            log(f"analysis {fmt}: best codec {best['name']} ({100 * best['ratio']:.1f} %); compressing helps on "
                f"{', '.join(result.analysis[fmt]['compress_on']) or 'no device'}")
    path = write_report(out, sections, model=loaded.source.display, sens=sens, device_budgets=result.device_budgets,
                        timings=result.timings, analysis=analysis, compressed=result.compressed, extra_artifacts=extra,
                        notes=notes)
    result.report, result.report_html = str(path), str(out / "report.html")
    log(f"report: {path} and {out / 'report.html'}")


# --------------------------------------------------------------------------- one format, for tests and benchmarks


def export_one(name: str, loaded, sens, budget: int, out_dir: str | Path, *, options: FitOptions | None = None,
               eval_windows=None, plan=None, menu: FormatMenu | None = None, hessians: dict | None = None) -> Written:
    """One format from an already loaded and calibrated model: menu (unless ``plan`` or ``menu``
    is given), plan, write and read back, and with ``eval_windows`` the runtime evaluation
    (in ``Written.evaluation["eval"]``). ``hessians`` turns on error feedback."""
    fmt = get_format(name)
    options = options or FitOptions(progress=False)
    ctx = FitContext(loaded, sens, options, eval_windows=eval_windows,
                     hessian_source=(lambda: hessians) if hessians is not None else None)
    if eval_windows is not None and name == "packed":
        ctx.reference = copy.deepcopy(loaded.model)
    fmt.check_supported(loaded, options)
    if plan is None:
        menu = menu or _built_menu(ctx, fmt)
        plan = fmt.plan(ctx, budget, menu)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan.save(out_dir / PLAN_FILE)
    written = fmt.write(ctx, plan, menu, out_dir)
    if eval_windows is not None:
        written.evaluation["eval"] = fmt.evaluate(ctx, written)
    if menu is not None:
        written.curve = fmt.curve(ctx, plan, menu)
    return written


# --------------------------------------------------------------------------- plans only, for tests and benchmarks


def plan_formats(model: str | None, cases: Sequence[tuple[str, int, float | None]], *, calibration: dict | None = None,
                 options: FitOptions | None = None, progress: bool = False, digest: Callable | None = None) -> dict:
    """Plans of ``model`` for each ``(format, budget bytes, decode speed or None)`` from one
    calibration (``calibration``: CalibrationSettings fields) and one menu per format;
    returns ``{"format@budget": plan or digest(plan)}``."""
    from dataclasses import replace

    from .calibrate import CalibrationSettings
    from .model import load_model
    from .pipeline import calibrate_cached

    options = options or FitOptions(progress=progress)
    loaded = load_model(model)
    outcome = calibrate_cached(loaded, None, CalibrationSettings(**(calibration or {})), progress=progress)
    menus: dict[str, FormatMenu] = {}
    out = {}
    for name, budget, speed in cases:
        fmt = get_format(name)
        ctx = FitContext(loaded, outcome.sens, replace(options, decode_speed=speed), sens_key=outcome.path.stem)
        if name not in menus:
            menus[name] = menu_for(ctx, fmt, outcome.path.parent, log=lambda m: None)
        plan = fmt.plan(ctx, budget, menus[name])
        out[f"{name}@{budget}"] = digest(plan) if digest else plan
    return out


def summary_json(result: FitResult) -> str:
    return json.dumps(result.to_dict(), indent=1, default=str)
