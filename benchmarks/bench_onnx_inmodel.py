"""What each ONNX weight option costs ONNX Runtime per decode step *inside the whole model*.

``bench_onnx_kernels.py`` times each option on one matrix shape at a time; its
chains stay in the 32 MB L3 cache of this machine, while a decode step of the real
model streams 50-200 MB of weights from memory, and mixing options costs more than
uniform models suggest (measured: a 90 MB plan decodes 1.37x slower than a uniform
4-bit block-64 model of the same graph, where the isolated-kernel table predicts 1.11x;
random codes in the plan's options reproduce the real file's speed within 2 %).
So this benchmark times whole SmolLM2-shaped decoders built by our graph builder
with random codes (speed does not depend on the values):

* ``--mixed N`` random plans: each matrix takes an option drawn from the menu's
  linear options (or is dropped, so the total of weights varies and the graph's own
  time can be told apart), with per-model random proportions; the tied embedding /
  head takes a random embedding option;
* uniform plans at every linear option (head at uint4-b64-asym), and the all-dropped
  plans with the full and a quarter of the vocabulary (head time vs graph time).

All models are timed in rounds against an anchor model (uniform uint4-b64-asym) in
the same round: machine state moves whole steps by up to 1.3x here, a ratio to the
anchor a few %; a model's figure is its median ratio x the anchor's best step.
Then one least-squares fit (non-negative) over all models:

    step_us = graph + sum_o linear_weights[o] * ns[o] + head_weights * head_ns[option]
              + calls * call_us + offset_products * offset_us + dropped * dropped_us

``--write-table`` writes ``ns_per_weight`` per option, ``head`` per embedding option,
one ``call_us`` per MatMulNBits call (plus ``offset_us`` for the offset kind's product)
and ``graph_us_per_layer`` into ``cvxq_export/formats/onnx/decode_costs.json``.

    python benchmarks/bench_onnx_inmodel.py --mixed 48       # -> docs/results/onnx/decode_costs_whole_model.json
    python benchmarks/bench_onnx_inmodel.py --plan-variants PLAN.json --rounds 12
                                                             # -> docs/results/onnx/decode_costs_plan_variants.json
    python benchmarks/bench_onnx_inmodel.py --refit docs/results/onnx/decode_costs_whole_model.json \
        --extra docs/results/onnx/decode_costs_plan_variants.json --extra-weight 3 --call-us 3 \
        --write-table cvxq_export/formats/onnx/decode_costs.json   # -> docs/results/onnx/decode_costs_fit.json
    python benchmarks/bench_onnx_inmodel.py --validate A.onnx B.onnx ...   # measured step times of real files

``--plan-variants PLAN.json`` times a real fit's plan (random codes) against the anchor
with its 8-bit linears, its offset linears or its head moved to the anchor's option,
and a uniform 4-bit block-32 plan: what each choice the planner made costs. Those
models are where the table must be right (the planner goes where the table says time
is cheap: with a per-call cost set too high, the 108.8 MB plan buys fused calls with
offsets and measures 0.86x RTN where it models 0.95x). ``--refit OLD.json
--extra VARIANTS.json`` fits them with the others, each ``--extra-weight`` times.
"""
from __future__ import annotations

import argparse
import base64
import gc
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import protocol  # benchmarks/protocol.py
from cvxq_export.formats.onnx.graph import QdqEmbedding, QdqLinear, QdqSplit, build_decoder
from cvxq_export.formats.onnx.qdq import OPTIONS, ZERO, QdqOption, legal_options
from cvxq_export.formats.onnx.target import OrtDecoder, layer_weight_names, decoder_spec

PROMPT = 64  # tokens of KV cache before the timed steps (bench_onnx_speed.py's decode setting)


def _random_blocks(rng, option: QdqOption, k: int, n: int):
    """Codes [K, N], fp16 scales / zero points / offsets [K / b, N] for ``option``."""
    lo, hi = (-(1 << (option.bits - 1)), 1 << (option.bits - 1)) if option.signed else (0, 1 << option.bits)
    codes = rng.integers(lo, hi, (k, n), dtype=np.int16)
    nb = k // option.block
    scale = (rng.random((nb, n), dtype=np.float32) * 1e-3 + 1e-4).astype(np.float16)
    zero = rng.integers(0, 1 << option.bits, (nb, n), dtype=np.int16) if option.kind == "asym" else None
    offset = (rng.standard_normal((nb, n), dtype=np.float32) * 1e-3).astype(np.float16) if option.kind == "offset" else None
    return codes, scale, zero, offset


def random_linear(rng, ref, option: QdqOption) -> QdqLinear:
    n, k = ref.rows, ref.cols
    codes, scale, zero, offset = _random_blocks(rng, option, k, n)
    split = QdqSplit(option, np.arange(k), codes, scale, zero, offset)
    return QdqLinear(ref, [split], np.zeros(0), None, full_input=True)


def random_embedding(rng, ref, option: QdqOption) -> QdqEmbedding:
    v, k = ref.rows, ref.cols
    codes, scale, zero, offset = _random_blocks(rng, option, k, v)  # [K, V] layout, transposed below
    t = lambda a: None if a is None else np.ascontiguousarray(a.T)  # noqa: E731
    zero_t = t(zero)
    if zero_t is None and option.bits == 8 and option.signed:
        zero_t = np.full((v, k // option.block), 128, np.int16)  # the tied head's DQ has no implicit 128
    return QdqEmbedding(ref, option, codes.T.copy(), scale.T.copy(), zero_t, t(offset), np.zeros(0), np.zeros(0))


def _step_times(dec: OrtDecoder, steps: int) -> float:
    """Median seconds of one decode step after a PROMPT-token prompt."""
    ids = np.arange(1000, 1000 + PROMPT, dtype=np.int64)[None]
    logits, past = dec.forward(ids)
    token = np.array([[int(logits[0, -1].argmax())]])
    for _ in range(2):  # warm-up steps (first runs allocate)
        _, past = dec.forward(token, past)
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        _, past = dec.forward(token, past)
        out.append(time.perf_counter() - t)
    return float(np.median(out))


def time_models(paths: dict[str, Path], rounds: int, steps: int, threads: int) -> dict[str, dict]:
    """Open every model, then time them in alternating rounds."""
    decoders = {name: OrtDecoder(p, threads=threads) for name, p in tqdm(paths.items(), desc="sessions", unit="model")}
    per = {name: [] for name in paths}
    for _ in tqdm(range(rounds), desc="rounds", unit="round"):
        for name, dec in decoders.items():
            per[name].append(_step_times(dec, steps) * 1e6)
    del decoders
    gc.collect()
    # the best round: interference from other load only ever adds time, so the least
    # disturbed round is the best estimate of the model's own speed (medians kept too)
    return {name: {"step_us": min(v), "median_us": statistics.median(v), "rounds_us": [round(x, 1) for x in v]}
            for name, v in per.items()}


def random_plan(rng, loaded, lin_options: list[QdqOption], head_options: list[QdqOption],
                p_zero: float) -> tuple[dict[str, QdqOption], QdqOption]:
    """Per linear matrix an option (ZERO with probability ``p_zero``), drawn with random
    per-model proportions over a random subset of ``lin_options``; a head option."""
    subset = rng.choice(len(lin_options), size=int(rng.integers(1, 5)), replace=False)
    weights = rng.dirichlet(np.ones(len(subset)))
    out = {}
    for ref in loaded.weights:
        if ref.kind == "embedding":
            continue
        out[ref.name] = ZERO if rng.random() < p_zero else lin_options[int(subset[rng.choice(len(subset), p=weights)])]
    return out, head_options[int(rng.integers(len(head_options)))]


def plan_variants(plan_path: Path, anchor: QdqOption) -> list[tuple[str, dict[str, QdqOption], QdqOption, int]]:
    """A real fit's plan (one option per matrix, as the speed-limited planner writes) and
    the variants that say what each of its choices costs: its 8-bit linears, its offset
    linears, its head at ``anchor``; and a uniform 4-bit block-32 asymmetric plan (ORT's
    RTN grid in our graph)."""
    plan = json.loads(plan_path.read_text())
    opts, head = {}, None
    for t in plan["tensors"]:
        used = set(np.frombuffer(base64.b64decode(t["unit_map"]), np.uint8).tolist())
        if len(used) != 1:
            raise SystemExit(f"{t['name']} is split ({sorted(used)}): variants need one option per matrix")
        o = OPTIONS[used.pop()]
        if t["name"].endswith("embed_tokens.weight"):
            head = o
        else:
            opts[t["name"]] = o

    def swap(pred) -> dict[str, QdqOption]:
        return {k: anchor if pred(o) else o for k, o in opts.items()}

    b32 = QdqOption(4, 32, "asym")
    return [("variant:plan", opts, head, 1), ("variant:head-at-anchor", opts, anchor, 1),
            ("variant:8bit-at-anchor", swap(lambda o: o.bits == 8), head, 1),
            ("variant:offsets-at-anchor", swap(lambda o: o.kind == "offset"), head, 1),
            ("variant:uniform-uint4-b32-asym", {k: b32 for k in opts}, b32, 1)]


def build_plan_model(loaded, options: dict[str, QdqOption], head_option: QdqOption, seed: int = 0,
                     vocab_fraction: int = 1):
    """A SmolLM2-shaped decoder with one option per matrix (ZERO: dropped), random codes."""
    rng = np.random.default_rng(seed)
    linears, embedding = {}, None
    spec = decoder_spec(loaded)
    for ref in loaded.weights:
        if ref.kind == "embedding":
            ref = replace(ref, rows=ref.rows // vocab_fraction)
            spec = replace(spec, vocab=ref.rows)
            embedding = random_embedding(rng, ref, head_option)
        elif options[ref.name] == ZERO:
            linears[ref.name] = QdqLinear(ref, [], np.zeros(0), None)
        else:
            linears[ref.name] = random_linear(rng, ref, options[ref.name])
    return build_decoder(spec, embedding, linears, layer_weight_names(loaded), None)


def features(model, loaded, options: dict[str, QdqOption], head_option: QdqOption, vocab_fraction: int,
             lin_names: list[str], head_names: list[str]) -> np.ndarray:
    """The fit's columns for one model: 1 (graph), linear weights per option (millions),
    head weights per embedding option (millions), MatMulNBits calls, offset products,
    dropped matrices."""
    lin = np.zeros(len(lin_names))
    for ref in loaded.weights:
        if ref.kind != "embedding" and options[ref.name] != ZERO:
            lin[lin_names.index(options[ref.name].name)] += ref.rows * ref.cols / 1e6
    head = np.zeros(len(head_names))
    emb = next(r for r in loaded.weights if r.kind == "embedding")
    head[head_names.index(head_option.name)] = emb.rows // vocab_fraction * emb.cols / 1e6
    calls = sum(1 for n in model.graph.node if n.op_type == "DequantizeLinear")
    offsets = sum(1 for n in model.graph.node if n.name.endswith("/OffsetMatMul"))
    dropped = sum(1 for o in options.values() if o == ZERO)
    return np.concatenate([[1.0], lin, head, [calls, offsets, dropped]])


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-negative least squares by an active set: refit without the negative
    coefficients until none is left (numpy only; the fit is small)."""
    keep = np.ones(a.shape[1], bool)
    x = np.zeros(a.shape[1])
    for _ in range(a.shape[1]):
        sol, *_ = np.linalg.lstsq(a[:, keep], b, rcond=None)
        x[:] = 0.0
        x[keep] = sol
        if (sol >= 0).all():
            break
        keep[np.flatnonzero(keep)[sol < 0]] = False
    return x


def fit_costs(keys: list[str], x: np.ndarray, y: np.ndarray, lin_names: list[str], head_names: list[str],
              weights: np.ndarray | None = None, call_us: float | None = None) -> dict:
    """The non-negative least-squares fit of the step times ``y`` on the features ``x``,
    on relative errors (step times span 2x; a ratio to the anchor is what was measured),
    each model's row scaled by ``weights`` (default 1); ``call_us`` pins the per-call cost."""
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=float)
    ci = x.shape[1] - 3  # the calls column
    if call_us is None:
        coef = nnls(x / y[:, None] * w[:, None], w)
    else:  # the per-call cost pinned: it and the per-weight costs are nearly collinear
        rest = np.delete(x, ci, axis=1)
        coef = np.insert(nnls(rest / y[:, None] * w[:, None], (y - call_us * x[:, ci]) / y * w), ci, call_us)
    pred = x @ coef
    n_l, n_h = len(lin_names), len(head_names)
    fit = {"graph_us": coef[0],
           # features are millions of weights: a coefficient is us per million = ns per 1000 weights
           "linear_ns_per_weight": {n: coef[1 + i] / 1000 for i, n in enumerate(lin_names)},
           "head_ns_per_weight": {n: coef[1 + n_l + i] / 1000 for i, n in enumerate(head_names)},
           "call_us": coef[1 + n_l + n_h], "offset_us": coef[2 + n_l + n_h], "dropped_us": coef[3 + n_l + n_h],
           "relative_residuals": {k: round(float((p - t) / t), 4) for k, p, t in zip(keys, pred, y)}}
    res = np.abs((pred - y) / y)
    print(f"graph {fit['graph_us']:.0f} us, per call {fit['call_us']:.2f} us, offset product {fit['offset_us']:.2f} us, "
          f"dropped matrix {fit['dropped_us']:.2f} us; |residual| median {np.median(res):.3f}, max {res.max():.3f}")
    for kind in ("linear_ns_per_weight", "head_ns_per_weight"):
        for name, v in sorted(fit[kind].items(), key=lambda kv: kv[1]):
            print(f"{kind[:6]:7s} {name:18s} {v:.5f} ns/weight")
    return fit


def fit_measurements(rows: dict[str, dict], x_rows: dict[str, np.ndarray], lin_names: list[str],
                     head_names: list[str], weights: dict[str, float] | None = None,
                     call_us: float | None = None) -> dict:
    """Step times from the measured ratios (x the anchor's best step) -> :func:`fit_costs`."""
    anchor_us = min(rows["anchor"]["best_us"])
    keys = list(x_rows)
    y = np.array([anchor_us if k == "anchor" else rows[k]["ratio"] * anchor_us for k in keys])
    w = np.array([(weights or {}).get(k, 1.0) for k in keys])
    fit = fit_costs(keys, np.stack([x_rows[k] for k in keys]), y, lin_names, head_names, w, call_us)
    fit["anchor_us"] = anchor_us
    return fit


def write_table(path: Path, fit: dict, meta: dict) -> None:
    table = json.loads(path.read_text())
    for name, ns in fit["linear_ns_per_weight"].items():
        entry = table["options"].setdefault(name, {})
        entry.setdefault("isolated_call_us", entry.get("call_us", 0.0))
        entry.setdefault("isolated_ns_per_weight", entry.get("ns_per_weight", 0.0))
        off = fit["offset_us"] if name.endswith("-offset") else 0.0
        entry.update(call_us=round(fit["call_us"] + off, 4), ns_per_weight=round(ns, 6))
    # options not in the fit (2-bit blocks of 16: ~100x slower, never worth timing in a
    # whole model; blocks of 128: not legal for 64-column groups, but ORT's RTN reference
    # uses them): the fitted figure of the same bits and kind at the nearest block, times
    # the isolated kernels' ratio between the two
    fitted = fit["linear_ns_per_weight"]
    for name, entry in table["options"].items():
        if name in fitted:
            continue
        o = next(x for x in OPTIONS if x.name == name)
        near = min((x for x in OPTIONS if x.name in fitted and x.bits == o.bits and x.kind == o.kind),
                   key=lambda x: abs(np.log2(x.block) - np.log2(o.block)))
        entry.setdefault("isolated_call_us", entry.get("call_us", 0.0))
        entry.setdefault("isolated_ns_per_weight", entry["ns_per_weight"])
        iso_near = table["options"][near.name]["isolated_ns_per_weight"]
        off = fit["offset_us"] if name.endswith("-offset") else 0.0
        entry.update(call_us=round(fit["call_us"] + off, 4),
                     ns_per_weight=round(fitted[near.name] * entry["isolated_ns_per_weight"] / iso_near, 6),
                     scaled_from=near.name)
    table["head"] = {n: {"ns_per_weight": round(v, 6)} for n, v in fit["head_ns_per_weight"].items()}
    table["graph_us_per_layer"] = round(fit["graph_us"] / meta["layers"], 1)
    table["graph_us_note"] = ("decode time of everything but the weight products, per layer: the constant of the "
                              "whole-model least-squares fit (benchmarks/bench_onnx_inmodel.py)")
    table["dropped_matrix_us"] = round(fit["dropped_us"], 3)
    table.pop("head_factor", None)
    table.pop("head_factor_note", None)
    table["call_us"] = round(fit["call_us"], 4)
    table["offset_us"] = round(fit["offset_us"], 4)
    table["_about"] = ("decode us per token in ONNX Runtime: graph_us_per_layer x layers + per MatMulNBits call call_us "
                       "(+ offset_us per offset product) + weights x ns_per_weight / 1000 (head: the head entry); "
                       "fitted over whole models by benchmarks/bench_onnx_inmodel.py (isolated_*: the kernel table "
                       "of benchmarks/bench_onnx_kernels.py)")
    table["in_model"] = meta
    path.write_text(json.dumps(table, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=12, help="timed decode steps per model per round")
    ap.add_argument("--mixed", type=int, default=48, help="random mixed plans")
    ap.add_argument("--p-zero", type=float, default=0.15, help="chance a matrix is dropped in a mixed plan")
    ap.add_argument("--batch", type=int, default=8, help="models open at once (the anchor included)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None,
                    help="result file (default docs/results/onnx/: decode_costs_whole_model.json, with --refit "
                         "decode_costs_fit.json, with --plan-variants decode_costs_plan_variants.json, with "
                         "--validate decode_step_times.json)")
    ap.add_argument("--write-table", default=None)
    ap.add_argument("--refit", default=None, help="a JSON this script wrote: fit again from its measurements")
    ap.add_argument("--extra", nargs="*", default=[], help="with --refit: JSONs of --plan-variants runs to fit too")
    ap.add_argument("--extra-weight", type=float, default=3.0,
                    help="weight of each --extra model in the fit (they probe what the planner exploits)")
    ap.add_argument("--call-us", type=float, default=None,
                    help="pin the per-MatMulNBits-call cost (us) instead of fitting it: calls and per-weight costs "
                         "are nearly collinear and a free fit puts per-weight time into calls (18 us, where ORT's "
                         "unfused RTN graph, 90 calls more than our fused one, is only ~3 %% slower: ~3 us a call)")
    ap.add_argument("--plan-variants", default=None,
                    help="a plan.json of a real ONNX fit: time it (random codes) and variants with its 8-bit "
                         "linears / offsets / head at the anchor's option against the anchor")
    ap.add_argument("--validate", nargs="*", default=None, help="real .onnx files: measured step time only")
    args = ap.parse_args()
    default = ("decode_step_times.json" if args.validate else "decode_costs_fit.json" if args.refit
               else "decode_costs_plan_variants.json" if args.plan_variants else "decode_costs_whole_model.json")
    args.json = args.json or str(protocol.result_path("onnx", default))

    if args.validate:
        rows = time_models({p: Path(p) for p in args.validate}, args.rounds, args.steps, args.threads)
        for p, r in rows.items():
            print(f"{r['step_us'] / 1000:7.2f} ms/step  {1e6 / r['step_us']:6.1f} tok/s  {p}")
        protocol.write_results(args.json, {"rounds": args.rounds, "steps": args.steps, "threads": args.threads,
                                           "files": rows})
        return

    if args.refit:
        old = json.loads(Path(args.refit).read_text())
        names = old["feature_names"]
        lin_names = [n for n in names[1:] if not n.startswith("head:") and n not in ("calls", "offset_products", "dropped")]
        head_names = [n[5:] for n in names if n.startswith("head:")]
        rows, x_rows, weights = dict(old["rows"]), {k: np.array(v) for k, v in old["features"].items()}, {}
        for path in args.extra:  # measured against their own anchor: the ratios carry over
            extra = json.loads(Path(path).read_text())
            assert extra["feature_names"] == names, f"{path}: other feature columns"
            for k, v in extra["features"].items():
                if k != "anchor":
                    rows[k], x_rows[k], weights[k] = extra["rows"][k], np.array(v), args.extra_weight
        fit = fit_measurements(rows, x_rows, lin_names, head_names, weights, args.call_us)
        meta = {k: old[k] for k in ("about", "models", "mixed", "rounds", "steps", "threads", "layers")}
        meta.update(models=len(x_rows), extra=[str(p) for p in args.extra], extra_weight=args.extra_weight,
                    call_us_pinned=args.call_us)
        protocol.write_results(args.json, {**old, "fit": fit, "extra": meta["extra"], "extra_weight": args.extra_weight})
        if args.write_table:
            write_table(Path(args.write_table), fit, meta)
        return

    import onnx

    loaded = protocol.load_default_model()
    emb_ref = next(r for r in loaded.weights if r.kind == "embedding")
    lin_opts = [OPTIONS[j] for j in legal_options("linear", 576, 64) if OPTIONS[j] != ZERO
                and not (OPTIONS[j].bits == 2 and OPTIONS[j].block == 16)]
    head_opts = [OPTIONS[j] for j in legal_options("embedding", emb_ref.cols, emb_ref.cols)]
    lin_names, head_names = [o.name for o in lin_opts], [o.name for o in head_opts]
    anchor_opt = QdqOption(4, 64, "asym")
    rng = np.random.default_rng(args.seed)
    every = {r.name: None for r in loaded.weights if r.kind != "embedding"}
    specs = [("anchor", {n: anchor_opt for n in every}, anchor_opt, 1)]
    specs += [(f"uniform:{o.name}", {n: o for n in every}, anchor_opt, 1) for o in lin_opts if o != anchor_opt]
    specs += [("zero", {n: ZERO for n in every}, anchor_opt, 1), ("zero-small", {n: ZERO for n in every}, anchor_opt, 4)]
    specs += [(f"uniform-head:{o.name}", {n: anchor_opt for n in every}, o, 1) for o in head_opts if o != anchor_opt]
    for i in range(args.mixed):
        opts, ho = random_plan(rng, loaded, lin_opts, head_opts, args.p_zero)
        specs.append((f"mixed:{i}", opts, ho, 1))
    if args.plan_variants:  # only the anchor and the plan's variants
        specs = specs[:1] + plan_variants(Path(args.plan_variants), anchor_opt)
    rows: dict[str, dict] = {}
    x_rows = {}
    with tempfile.TemporaryDirectory(prefix="cvxq-inmodel-") as tmp:
        anchor_path = Path(tmp) / "anchor.onnx"
        m = build_plan_model(loaded, *specs[0][1:3])
        onnx.save_model(m, str(anchor_path))
        x_rows["anchor"] = features(m, loaded, specs[0][1], specs[0][2], 1, lin_names, head_names)
        rest = specs[1:]
        per = args.batch - 1
        for start in tqdm(range(0, len(rest), per), desc="batches", unit="batch"):
            paths = {"anchor": anchor_path}
            for key, opts, ho, frac in rest[start:start + per]:
                m = build_plan_model(loaded, opts, ho, vocab_fraction=frac)
                x_rows[key] = features(m, loaded, opts, ho, frac, lin_names, head_names)
                paths[key] = Path(tmp) / f"{key.replace(':', '_')}.onnx"
                onnx.save_model(m, str(paths[key]))
                del m
            got = time_models(paths, args.rounds, args.steps, args.threads)
            a = np.array(got["anchor"]["rounds_us"])
            rows.setdefault("anchor", {"best_us": [], "rounds_us": []})
            rows["anchor"]["best_us"].append(got["anchor"]["step_us"])
            for key, r in got.items():
                if key != "anchor":
                    rows[key] = {"ratio": float(np.median(np.array(r["rounds_us"]) / a)), "rounds_us": r["rounds_us"]}
            for key, p in paths.items():
                if key != "anchor":
                    p.unlink()
    fit = fit_measurements(rows, x_rows, lin_names, head_names, None, args.call_us)
    keys = list(x_rows)
    meta = {"about": "costs fitted over whole SmolLM2-shaped decoders (benchmarks/bench_onnx_inmodel.py)",
            "models": len(keys), "mixed": 0 if args.plan_variants else args.mixed, "rounds": args.rounds, "steps": args.steps,
            "threads": args.threads, "layers": loaded.config.num_hidden_layers}
    protocol.write_results(args.json, {**meta, "fit": fit, "rows": rows,
                                       "features": {k: x_rows[k].tolist() for k in keys},
                                       "feature_names": ["graph", *lin_names, *[f"head:{n}" for n in head_names],
                                                         "calls", "offset_products", "dropped"]})
    if args.write_table:
        write_table(Path(args.write_table), fit, meta)


if __name__ == "__main__":
    main()
