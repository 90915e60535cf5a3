"""``report.md`` + ``report.json``: what was planned, what it cost, how good it is."""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .io import write_json, write_text
from .native import decode_map
from .plan import Plan
from .sizes import format_size


def tensor_type(name: str) -> str:
    """"model.layers.3.mlp.up_proj.weight" -> "mlp.up_proj"; embeddings keep their name."""
    m = re.search(r"\.(?:layers|h)\.\d+\.(.+?)(?:\.weight)?$", name)
    return m.group(1) if m else name.removesuffix(".weight")


def layer_index(name: str) -> int | None:
    m = re.search(r"\.(?:layers|h)\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def bits_table(plan: Plan) -> dict[str, Any]:
    """Bits per weight (including side information) by tensor type and layer."""
    by_type: dict[str, list[float]] = defaultdict(lambda: [0, 0])
    by_layer: dict[int, list[float]] = defaultdict(lambda: [0, 0])
    depth_hist = np.zeros(9, dtype=np.int64)
    for t in plan.tensors:
        n = t.rows * t.cols
        by_type[tensor_type(t.name)][0] += 8 * t.bytes
        by_type[tensor_type(t.name)][1] += n
        li = layer_index(t.name)
        if li is not None:
            by_layer[li][0] += 8 * t.bytes
            by_layer[li][1] += n
        if t.unit_map is not None:
            bits, _ = decode_map(t.unit_map)
            depth_hist += np.bincount(bits, minlength=9)[:9] * (t.row_group * t.col_group)
    return {
        "by_type": {k: v[0] / v[1] for k, v in by_type.items()},
        "by_layer": {k: v[0] / v[1] for k, v in sorted(by_layer.items())},
        "weights_at_depth": depth_hist.tolist(),
    }


def write_report(out: Path, plan: Plan, loaded, sens, evaluation: dict, breakdown: dict | None,
                 timings: dict, formats: list[str]) -> Path:
    table = bits_table(plan)
    data = {"plan": plan.summary(), "bits": table, "evaluation": evaluation, "device_budget": breakdown,
            "timings": timings, "calibration": sens.settings.__dict__, "formats_requested": formats}
    write_json(out / "report.json", data)
    s = plan.summary()
    lines = [f"# cvxq-export report: {plan.model}", ""]
    lines += ["## Budget", "",
              f"- budget: **{format_size(plan.budget_bytes)}** ({plan.budget_bytes:,} bytes)",
              f"- weights as planned: **{format_size(plan.total_bytes)}** ({plan.total_bytes:,} bytes), "
              f"of which {format_size(plan.fixed_bytes)} unquantized tensors (fp16) and alignment allowance",
              f"- quantized: {s['quantized_weights']:,} weights in {format_size(s['quantized_bytes'])}, "
              f"**{s['bits_per_weight']:.3f} bits/weight** including scales, offsets and the bit-depth map",
              f"- achievable range for this model: {format_size(plan.min_bytes)} .. {format_size(plan.max_bytes)}",
              f"- certificate: lambda = {plan.lam:.4e}, total sensitivity-weighted distortion = {plan.distortion:.4e}", ""]
    if breakdown:
        lines += ["### Device", "", "| item | bytes |", "|---|---:|"]
        lines += [f"| {k} | {format_size(v) if isinstance(v, int) and k != 'context' else v} |" for k, v in breakdown.items()]
        lines.append("")
    lines += ["## Bits per weight by tensor type", "", "| tensor | bits/weight |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in table["by_type"].items()]
    lines += ["", "## Weights at each bit depth", "", "| bits | weights |", "|---:|---:|"]
    lines += [f"| {b} | {n:,} |" for b, n in enumerate(table["weights_at_depth"]) if n]
    lines.append("")
    if "eval" in evaluation:
        e = evaluation["eval"]
        o, q = e["original"], e["quantized"]
        lines += ["## Quality (PyTorch, dequantized weights)", "",
                  f"Text: `{e['text']}`, {q['windows']} windows of {q['seq_len']} tokens, each from an empty cache.", "",
                  "| model | perplexity | KL vs original (nats/token) | top-1 agreement |", "|---|---:|---:|---:|",
                  f"| original | {o['perplexity']:.3f} | 0 | 1 |",
                  f"| quantized | {q['perplexity']:.3f} | {q['kl']:.4f} | {q['top1_agreement']:.3f} |", ""]
    if evaluation.get("bias_corrected"):
        lines += [f"Bias correction applied to {len(evaluation['bias_corrected'])} layers with a bias.", ""]
    else:
        lines += ["Bias correction: the model's linear layers carry no bias, so the correction is kept as data "
                  "(sensitivities file, `input_mean`) and not applied.", ""]
    if formats:
        lines += [f"Formats requested but not yet implemented: {', '.join(formats)}.", ""]
    lines += ["## Timings", ""] + [f"- {k}: {v:.1f} s" if isinstance(v, float) else f"- {k}: {v}" for k, v in timings.items()]
    write_text(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"
