"""``report.md``, ``report.html`` and ``report.json``: what was planned, what it cost, how good it is,
and how fast each artifact loads on each device.

The report is assembled once as :class:`ReportData` (plain data, also what
``report.json`` holds), then rendered:

* PNG plots (matplotlib, Agg, no display needed) next to the report: bits per
  weight across layers x tensor types, the plan's size-vs-distortion curve, the
  budget breakdown, and per artifact the load time per device with and without
  compression. The numbers behind each plot are in ``report.json["plots"]``.
* ``report.md`` links the PNGs; ``report.html`` is the same document with
  every image embedded as a ``data:image/png;base64`` URI and inline CSS, so it
  opens offline as a single file.

matplotlib is optional (``pip install 'cvxq-export[report]'``): without it the
reports are written without plots and say so.
"""
from __future__ import annotations

import base64
import html
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .analysis.advice import Artifact
from .io import atomic_path, write_json, write_text
from .plan import Plan
from .sizes import format_size

PLOT_FILES = {"bits_heatmap": "bits_heatmap.png", "size_distortion": "size_distortion.png",
              "budget": "budget_breakdown.png"}


def tensor_type(name: str) -> str:
    """"model.layers.3.mlp.up_proj.weight" -> "mlp.up_proj"; embeddings keep their name."""
    m = re.search(r"\.(?:layers|h)\.\d+\.(.+?)(?:\.weight)?$", name)
    return m.group(1) if m else name.removesuffix(".weight")


def layer_index(name: str) -> int | None:
    m = re.search(r"\.(?:layers|h)\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def bits_table(plan: Plan) -> dict[str, Any]:
    """Bits per weight (including side information) by tensor type, by layer, and per layer x type."""
    from .native import decode_map

    by_type: dict[str, list[float]] = defaultdict(lambda: [0, 0])
    by_layer: dict[int, list[float]] = defaultdict(lambda: [0, 0])
    cell: dict[tuple[int, str], list[float]] = defaultdict(lambda: [0, 0])
    other: dict[str, float] = {}
    depth_hist = np.zeros(9, dtype=np.int64)
    for t in plan.tensors:
        n = t.rows * t.cols
        kind = tensor_type(t.name)
        by_type[kind][0] += 8 * t.bytes
        by_type[kind][1] += n
        li = layer_index(t.name)
        if li is not None:
            by_layer[li][0] += 8 * t.bytes
            by_layer[li][1] += n
            cell[(li, kind)][0] += 8 * t.bytes
            cell[(li, kind)][1] += n
        else:
            other[t.name] = 8 * t.bytes / n
        if t.unit_map is not None and t.option == "native":  # packed: bit depth | kind per unit
            bits, _ = decode_map(t.unit_map)
            depth_hist += np.bincount(bits, minlength=9)[:9] * (t.row_group * t.col_group)
        elif t.unit_map is not None and t.option == "qdq":  # ONNX: an option index per column group
            from .formats.onnx.qdq import OPTIONS

            bits = np.array([OPTIONS[int(i)].bits for i in t.unit_map], dtype=np.int64)
            depth_hist += np.bincount(bits, minlength=9)[:9] * (t.col_group * t.rows)
    layers = sorted(by_layer)
    types = sorted({k for _, k in cell}, key=lambda k: min(i for i, (_, kk) in enumerate(cell) if kk == k))
    grid = [[(cell[(li, k)][0] / cell[(li, k)][1]) if (li, k) in cell else None for k in types] for li in layers]
    return {
        "by_type": {k: v[0] / v[1] for k, v in by_type.items()},
        "by_layer": {k: v[0] / v[1] for k, v in sorted(by_layer.items())},
        "weights_at_depth": depth_hist.tolist(),
        "heatmap": {"layers": layers, "types": types, "bits_per_weight": grid, "outside_layers": other},
    }


def budget_breakdown(plan: Plan | None, device: dict | None, file_bytes: int | None) -> dict[str, Any]:
    """Where the bytes go: with a device profile, its RAM; otherwise the weight budget.

    ``file_bytes`` is the main artifact on disk (the plan's count when None).
    Returns ``{"total": bytes, "total_label": ..., "items": [{"name", "bytes"}]}``;
    the items add up to the total (headroom may be negative only if a budget was exceeded).
    """
    weights = int(file_bytes if file_bytes is not None else (plan.total_bytes if plan else 0))
    if device:
        items = [("OS and services", device["os_reserved"]), (f"KV cache ({device['context']} tokens)", device["kv_cache"]),
                 ("runtime", device["runtime"]), ("weights file", weights),
                 ("headroom", device["weights"] - weights)]
        return {"total": int(device["ram"]), "total_label": f"{device['device']} RAM",
                "weights_budget": int(device["weights"]), "items": [{"name": n, "bytes": int(b)} for n, b in items]}
    budget = int(plan.budget_bytes) if plan else weights
    quantized = int(plan.quantized_bytes) if plan else 0
    items = [("quantized weights", quantized), ("unquantized tensors and format overhead", weights - quantized),
             ("headroom", budget - weights)]
    return {"total": budget, "total_label": "weight budget", "weights_budget": budget,
            "items": [{"name": n, "bytes": int(b)} for n, b in items if plan or n != "quantized weights"]}


# =========================================================================== plots


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_bits_heatmap(heat: dict, path: Path) -> Path | None:
    layers, types, grid = heat["layers"], heat["types"], heat["bits_per_weight"]
    if not layers or not types:
        return None
    a = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    fig = _figure(max(5.0, 0.9 * len(types) + 2.5), max(3.0, 0.22 * len(layers) + 1.6))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(a, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(types)))
    ax.set_xticklabels(types, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([str(i) for i in layers], fontsize=6 if len(layers) > 20 else 8)
    ax.set_ylabel("layer")
    if a.size <= 400:  # annotate small grids; large ones would be unreadable
        for i in range(a.shape[0]):
            for j in range(a.shape[1]):
                if np.isfinite(a[i, j]):
                    ax.text(j, i, f"{a[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if a[i, j] < np.nanmean(a) else "black")
    fig.colorbar(im, ax=ax, label="bits / weight (all side info)")
    ax.set_title("Bits per weight by layer and tensor type", fontsize=9)
    return _save(fig, path)


def plot_size_distortion(curve: dict, path: Path) -> Path | None:
    if not curve or len(curve["bytes"]) < 2:
        return None
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    x = np.array(curve["bytes"]) / 1e6
    ax.plot(x, curve["distortion"], color="#3b7dd8", label="menu hull (Lagrangian frontier)")
    ax.axvline(curve["budget_bytes"] / 1e6, color="#888888", ls="--", lw=1, label="budget")
    if curve.get("chosen_bytes") is not None:
        ax.plot([curve["chosen_bytes"] / 1e6], [curve["chosen_distortion"]], "o", color="#d8453b", label="chosen plan")
    for p in curve.get("at_budgets", []):
        if p["factor"] != 1.0:
            ax.plot([p["bytes"] / 1e6], [p["distortion"]], ".", color="#3b7dd8")
    if min(curve["distortion"]) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("size (MB, as the allocator counts it)")
    ax.set_ylabel("total sensitivity-weighted distortion")
    ax.set_title("Size vs distortion", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_budget(breakdown: dict, path: Path) -> Path | None:
    items = breakdown["items"]
    if not items:
        return None
    fig = _figure(7.5, 2.3)
    ax = fig.add_subplot(1, 1, 1)
    colors = ["#9e9e9e", "#e39c37", "#8e6bbf", "#3b7dd8", "#6abf69", "#d8453b"]
    unit, div = ("MB", 1e6) if breakdown["total"] >= 1e6 else ("kB", 1e3)
    left = 0.0
    for k, it in enumerate(items):
        w = it["bytes"] / div
        ax.barh([0], [w], left=left, color=colors[k % len(colors)] if it["name"] != "headroom" or w >= 0 else "#d8453b",
                label=f"{it['name']}: {format_size(it['bytes'])}")
        left += max(w, 0.0)
    ax.set_yticks([])
    ax.set_xlabel(unit)
    ax.set_title(f"Budget breakdown ({breakdown['total_label']}: {format_size(breakdown['total'])})", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=min(3, len(items)))
    return _save(fig, path)


def load_time_rows(result: dict) -> list[dict]:
    """Per device: plain read vs compressed (best codec), serial and overlapped, in seconds."""
    return [{"device": d["device"], "read_MBps": d["read_MBps"], "plain_s": d["plain_s"], "serial_s": d["serial_s"],
             "overlapped_s": d["overlapped_s"], "codec": d["codec"], "chunk_bytes": d["chunk_bytes"],
             "compress": d["compress"]} for d in result.get("devices", [])]


# =========================================================================== the document


@dataclass
class FormatSection:
    """One written format in the report: its plan, file, evaluation and curve."""

    format: str
    plan: Plan | None
    artifact: Artifact | None = None
    evaluation: dict = field(default_factory=dict)
    curve: Any = None  # RDCurve or its dict
    info: dict = field(default_factory=dict)  # the format's own results (read-back, types, runtime checks)


@dataclass
class SectionData:
    """A :class:`FormatSection` as plain data (what report.json holds per format)."""

    format: str
    plan: dict | None
    bits: dict | None
    curve: dict | None
    breakdown: dict | None  # budget_breakdown(): the plot's data
    evaluation: dict
    artifact: dict | None


@dataclass
class ReportData:
    model: str
    sections: list[SectionData]
    device_budgets: dict[str, dict]  # format -> the device profile's breakdown, when --device was given
    artifacts: list[dict]
    analysis: dict[str, dict]  # format -> AnalysisResult dict
    compressed: dict | None  # the container written, if any
    timings: dict
    calibration: dict | None
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # per format its own results, kept at the top of report.json

    def to_json(self, plots: dict) -> dict:
        d = {**self.extra}
        d.update({k: v for k, v in asdict(self).items() if k not in ("extra", "sections")})
        d["formats"] = {s.format: asdict(s) for s in self.sections}
        d["plots"] = plots
        return d


def _timing(v) -> str:
    """A stage's seconds, or a format's stages ("menu_s 12.0 s, plan_s 0.4 s")."""
    if isinstance(v, dict):
        return ", ".join(f"{k.removesuffix('_s')} {_timing(x)}" for k, x in v.items())
    return f"{v:.1f} s" if isinstance(v, float) else str(v)


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def _plot_key(base: str, section: SectionData, data: ReportData) -> str:
    """Plot names: plain for a single format, suffixed by the format when there are several."""
    return base if len(data.sections) == 1 else f"{base}_{section.format}"


def _render_section(s: SectionData, data: ReportData, plots: dict[str, dict], h: str) -> list[str]:
    """Budget, bits, curve and quality of one format; ``h`` is its heading prefix ("##" or "###")."""
    p = s.plan
    lines: list[str] = []
    if p:
        lines += [f"{h} Budget", "",
                  f"- budget: **{format_size(p['budget_bytes'])}** ({p['budget_bytes']:,} bytes)",
                  f"- weights as planned: **{format_size(p['total_bytes'])}** ({p['total_bytes']:,} bytes), "
                  f"of which {format_size(p['fixed_bytes'])} unquantized tensors, format overhead and alignment",
                  f"- quantized: {p['quantized_weights']:,} weights in {format_size(p['quantized_bytes'])}, "
                  f"**{p['bits_per_weight']:.3f} bits/weight** including scales, offsets and maps",
                  f"- achievable range for this model: {format_size(p['min_bytes'])} .. {format_size(p['max_bytes'])}"]
        lines.append(_certificate_line(p))
        lines.append("")
    if s.breakdown:
        b = s.breakdown
        lines += [f"{h}# Budget breakdown", "", f"{b['total_label']}: {format_size(b['total'])}", "",
                  "| item | bytes | share |", "|---|---:|---:|"]
        lines += [f"| {it['name']} | {format_size(it['bytes'])} | {100 * it['bytes'] / b['total']:.1f} % |"
                  for it in b["items"]] if b["total"] else []
        lines.append("")
        lines += _image(plots, _plot_key("budget", s, data), "Budget breakdown")
    if s.bits:
        t = s.bits
        lines += [f"{h} Bits per weight", ""]
        lines += _image(plots, _plot_key("bits_heatmap", s, data), "Bits per weight by layer and tensor type")
        lines += ["| tensor type | bits/weight |", "|---|---:|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in t["by_type"].items()]
        lines.append("")
        if any(t["weights_at_depth"]):
            lines += ["Weights at each bit depth:", "", "| bits | weights |", "|---:|---:|"]
            lines += [f"| {b} | {n:,} |" for b, n in enumerate(t["weights_at_depth"]) if n]
            lines.append("")
    lines += [f"{h} Size vs distortion", ""]
    if s.curve:
        c = s.curve
        lines += _image(plots, _plot_key("size_distortion", s, data), "Size vs distortion")
        lines += [f"The curve is the {c['note']}. The chosen plan: {format_size(c['chosen_bytes']) if c['chosen_bytes'] else '-'}, "
                  f"distortion {c['chosen_distortion']:.4e}." if c.get("chosen_distortion") is not None else c["note"], "",
                  "| budget | size | distortion (hull) |", "|---:|---:|---:|"]
        lines += [f"| {100 * r['factor']:.0f} % | {format_size(r['bytes'])} | {r['distortion']:.4e} |" for r in c["at_budgets"]]
        lines.append("")
    else:
        lines += ["Not available for this run (" + next((n for n in data.notes if n.startswith("size-vs-distortion curve")),
                                                        "no menu") + ").", ""]
    lines += _render_quality(s.evaluation, h)
    return lines


def _certificate_line(p: dict) -> str:
    line = f"- certificate: lambda = {p['lam']:.4e}, total sensitivity-weighted distortion = {p['distortion']:.4e}"
    if p.get("dual_bound") is not None:
        gap = p.get("gap")
        scope = p.get("bound_scope") or "under the byte budget"
        line += (f"; no plan of this menu {scope} can have a distortion below {p['dual_bound']:.4e} "
                 f"(Lagrangian dual bound), so this plan is within **{100 * gap:.2f} %** of the best one"
                 if gap is not None else f"; dual bound {p['dual_bound']:.4e}")
    return line


def _render_quality(ev: dict, h: str) -> list[str]:
    lines: list[str] = []
    e = ev.get("eval") or {}
    if "original" in e:
        o, q = e["original"], e["quantized"]
        lines += [f"{h} Quality (PyTorch, the weights as stored)", "",
                  f"Text: `{e.get('text', '-')}`, {q['windows']} windows of {q['seq_len']} tokens, each from an empty cache.", "",
                  "| model | perplexity | KL vs original (nats/token) | top-1 agreement |", "|---|---:|---:|---:|",
                  f"| original | {o['perplexity']:.3f} | 0 | 1 |",
                  f"| quantized | {q['perplexity']:.3f} | {q['kl']:.4f} | {q['top1_agreement']:.3f} |", ""]
    elif "llama_cpp_perplexity" in e:
        lines += [f"{h} Quality", "", "| runtime | perplexity |", "|---|---:|",
                  f"| llama.cpp | {e['llama_cpp_perplexity']:.3f} |", f"| PyTorch, same weights | {e['torch_perplexity']:.3f} |",
                  "", f"Relative difference {100 * e['relative_difference']:.3f} %.", ""]
    elif "onnxruntime_perplexity" in e:
        lines += [f"{h} Quality", "", "| runtime | perplexity |", "|---|---:|",
                  f"| ONNX Runtime (default, int8 activations) | {e['onnxruntime_perplexity']:.3f} |",
                  f"| ONNX Runtime (accuracy level 0, fp32 compute) | {e['onnxruntime_exact_perplexity']:.3f} |",
                  f"| PyTorch, same weights | {e['torch_perplexity']:.3f} |",
                  "", f"Relative difference at fp32 compute {100 * e['relative_difference']:.3f} %.", ""]
    if "bias_corrected" in ev:
        if ev.get("bias_corrected"):
            lines += [f"Bias correction applied to {len(ev['bias_corrected'])} layers with a bias.", ""]
        else:
            lines += ["Bias correction: the model's linear layers carry no bias, so the correction is kept as data "
                      "(sensitivities file, `input_mean`) and not applied.", ""]
    return lines


def render(data: ReportData, plots: dict[str, dict]) -> str:
    """The Markdown report; images are referenced by file name (next to report.md)."""
    from .analysis.analyze import render_markdown

    lines = [f"# cvxq-export report: {data.model}", ""]
    if data.artifacts:
        lines += ["## Artifacts", "", "| format | file | size on disk | budget | fits |", "|---|---|---:|---:|---|"]
        budgets = {s.format: s.plan["budget_bytes"] for s in data.sections if s.plan}
        for a in data.artifacts:
            budget = budgets.get(a["format"])
            fits = "-" if not budget else ("yes" if a["file_bytes"] <= budget else "**no**")
            lines.append(f"| {a['format']} | `{Path(a['path']).name}` | {format_size(a['file_bytes'])} ({a['file_bytes']:,} bytes) | "
                         f"{format_size(budget) if budget else '-'} | {fits} |")
        lines.append("")
    single = len(data.sections) == 1
    for s in data.sections:
        if not single:
            lines += [f"## {s.format}", ""]
        lines += _render_section(s, data, plots, "##" if single else "###")
    if data.device_budgets:
        lines += _device_memory(data.device_budgets, {s.format: s.artifact for s in data.sections})
    lines += ["## Compressibility and load time", ""]
    if data.analysis:
        for fmt, result in data.analysis.items():
            lines += [render_markdown(result, heading_level=3, max_tensors=10).rstrip(), ""]
            lines += _image(plots, f"load_times_{fmt}", f"Load time per device: {fmt}")
    else:
        lines += ["Not run (" + next((n for n in data.notes if n.startswith("analysis:")), "no artifact") + ").", ""]
    if data.compressed:
        c = data.compressed
        lines += ["### Compressed container", "",
                  f"`{Path(c['path']).name}`: {c['codec']} in {c['chunk_bytes'] >> 10} KiB chunks, {format_size(c['file_bytes'])} "
                  f"({100 * c['ratio']:.1f} % of {format_size(c['raw_bytes'])}), read back through the packed reader. "
                  + (c.get("reason") or ""), ""]
    if data.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in data.notes] + [""]
    lines += ["## Timings", ""] + [f"- {k}: {_timing(v)}" for k, v in data.timings.items()]
    return "\n".join(lines) + "\n"


def _image(plots: dict, key: str, alt: str) -> list[str]:
    if key in plots and plots[key].get("file"):
        return [f"![{alt}]({plots[key]['file']})", ""]
    return []


# =========================================================================== Markdown -> HTML


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:72rem;margin:2rem auto;
padding:0 1rem;color:#222;line-height:1.45}table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.25rem .55rem}th{background:#f2f2f2}td.r,th.r{text-align:right}
code{background:#f4f4f4;padding:0 .2rem;border-radius:3px}img{max-width:100%;height:auto;display:block;margin:.8rem 0}
h1,h2,h3,h4{margin-top:1.6rem}"""


def _inline(text: str) -> str:
    """Escape, then `code` and **bold** (the only inline markup the reports use)."""
    parts = text.split("`")
    out = []
    for i, part in enumerate(parts):
        if i % 2 and i < len(parts) - 1:
            out.append(f"<code>{html.escape(part)}</code>")
        else:
            esc = html.escape(part if i % 2 == 0 else "`" + part)
            out.append(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", esc))
    return "".join(out)


def markdown_to_html(md: str, images: dict[str, bytes], title: str) -> str:
    """The subset of Markdown the reports emit (headings, pipe tables, lists, paragraphs, images on
    their own line) as one self-contained HTML page; images come from ``images`` (file name -> PNG
    bytes) as data URIs, and an image not in ``images`` is left out rather than linked."""
    body: list[str] = []
    lines = md.splitlines()
    i = 0
    para: list[str] = []

    def flush() -> None:
        if para:
            body.append(f"<p>{_inline(' '.join(para))}</p>")
            para.clear()

    while i < len(lines):
        line = lines[i]
        m_head = re.match(r"^(#{1,6})\s+(.*)$", line)
        m_img = re.match(r"^!\[([^\]]*)\]\(([^)]+)\)\s*$", line)
        if not line.strip():
            flush()
            i += 1
        elif m_head:
            flush()
            n = len(m_head.group(1))
            body.append(f"<h{n}>{_inline(m_head.group(2))}</h{n}>")
            i += 1
        elif m_img:
            flush()
            png = images.get(m_img.group(2))
            if png is not None:
                uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
                body.append(f'<img alt="{html.escape(m_img.group(1))}" src="{uri}">')
            i += 1
        elif line.startswith("|"):
            flush()
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            aligns = []
            if len(rows) >= 2 and all(re.fullmatch(r":?-+:?", c) for c in rows[1]):
                aligns = [' class="r"' if c.endswith(":") else "" for c in rows[1]]
                head, rows = rows[0], rows[2:]
            else:
                head = None
            out = ["<table>"]
            if head:
                out.append("<tr>" + "".join(f"<th{aligns[j] if j < len(aligns) else ''}>{_inline(c)}</th>"
                                            for j, c in enumerate(head)) + "</tr>")
            for r in rows:
                out.append("<tr>" + "".join(f"<td{aligns[j] if j < len(aligns) else ''}>{_inline(c)}</td>"
                                            for j, c in enumerate(r)) + "</tr>")
            body.append("\n".join(out + ["</table>"]))
        elif line.startswith("- "):
            flush()
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            body.append("<ul>" + "".join(items) + "</ul>")
        else:
            para.append(line.strip())
            i += 1
    flush()
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _device_memory(budgets: dict[str, dict], artifacts: dict[str, dict | None]) -> list[str]:
    """The device's memory split per written file: what the runtime will hold next to it."""
    first = next(iter(budgets.values()))
    lines = ["## Device memory", "",
             f"{first['device']}: {format_size(first['ram'])} RAM, {format_size(first['os_reserved'])} kept by the OS, "
             f"{format_size(first['usable'])} usable; context {first['context']} tokens.", "",
             "| format | weights file | KV cache (runtime's type) | runtime | headroom |", "|---|---:|---:|---:|---:|"]
    for fmt, b in budgets.items():
        art = artifacts.get(fmt)
        file_bytes = int(art["file_bytes"]) if art else None
        headroom = b["usable"] - b["kv_cache"] - b["runtime"] - (file_bytes or 0)
        kv = f"{format_size(b['kv_cache'])} ({b.get('kv_dtype', '?')})"
        lines.append(f"| {fmt} | {format_size(file_bytes) if file_bytes is not None else '-'} | {kv} | "
                     f"{format_size(b['runtime'])} | {format_size(headroom) if file_bytes is not None else '-'} |")
    return lines + [""]


# =========================================================================== writing


# What a rerun measures differently (stage times, tokens per second): kept out of
# report.json, which then holds only what the same inputs reproduce, byte for byte.
MEASURED_KEYS = frozenset({"timings", "decode_tokens_per_s", "decode_tok_s", "prefill_tok_s"})


def split_measured(doc: Any) -> tuple[Any, dict]:
    """``doc`` without the values under :data:`MEASURED_KEYS`, and those values under the
    same path of keys (list items by their index as a string)."""
    measured: dict = {}

    def walk(obj, into: dict):
        if isinstance(obj, dict):
            kept = {}
            for k, v in obj.items():
                if k in MEASURED_KEYS:
                    into[k] = v
                    continue
                sub: dict = {}
                kept[k] = walk(v, sub)
                if sub:
                    into[k] = sub
            return kept
        if isinstance(obj, list):
            kept_list = []
            for i, v in enumerate(obj):
                sub = {}
                kept_list.append(walk(v, sub))
                if sub:
                    into[str(i)] = sub
            return kept_list
        return obj

    return walk(doc, measured), measured


def relative_paths(doc: Any, out: Path) -> Any:
    """Paths of files inside ``out`` as paths relative to it (the report then reads the
    same wherever the output folder is, and moves with it)."""
    root = Path(out).resolve()

    def walk(obj, key=None):
        if isinstance(obj, dict):
            return {k: walk(v, k) for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v, key) for v in obj]
        if isinstance(obj, str) and key in ("path", "artifact", "file") and obj:
            try:
                return str(Path(obj).resolve().relative_to(root))
            except (ValueError, OSError):
                return obj
        return obj

    return walk(doc)


def write_report(out: Path, sections: Sequence[FormatSection], *, model: str, sens=None,
                 device_budgets: dict[str, dict] | None = None, timings: dict | None = None,
                 analysis: dict[str, dict] | None = None, compressed: dict | None = None,
                 extra_artifacts: Sequence[Artifact] = (), notes: Sequence[str] = ()) -> Path:
    """Write report.json, timings.json, the PNG plots, report.md and report.html into ``out``;
    returns report.md's path. report.json and report.md up to its Timings section are the
    same for the same inputs; what a rerun measures differently is in timings.json.

    ``sections``: one per format written (or planned); ``device_budgets`` the device
    profile's budget breakdown per format (each runtime allocates its own KV cache; None
    with --budget); ``analysis`` the written files'
    analyses (format -> AnalysisResult dict); ``compressed`` the container written (if
    any), listed with ``extra_artifacts``.
    """
    out = Path(out)
    notes = list(notes)
    arts = [s.artifact.to_dict() for s in sections if s.artifact is not None]
    arts += [a.to_dict() if isinstance(a, Artifact) else dict(a) for a in extra_artifacts]
    sdata = []
    for s in sections:
        file_bytes = s.artifact.file_bytes if s.artifact is not None else None
        curve = s.curve.to_dict() if hasattr(s.curve, "to_dict") else s.curve
        sdata.append(SectionData(
            s.format, s.plan.summary() if s.plan else None, bits_table(s.plan) if s.plan else None, curve,
            budget_breakdown(s.plan, (device_budgets or {}).get(s.format), file_bytes) if s.plan or file_bytes else None,
            dict(s.evaluation or {}), s.artifact.to_dict() if s.artifact is not None else None))
    data = ReportData(
        model=model, sections=sdata, device_budgets=dict(device_budgets or {}), artifacts=arts, analysis=dict(analysis or {}),
        compressed=compressed, timings=dict(timings or {}),
        calibration=dict(sens.settings.__dict__) if sens is not None else None, notes=notes,
        extra={s.format: s.info for s in sections if s.info})

    # ---- plots: the numbers behind each go to report.json["plots"][key]
    plots: dict[str, dict] = {}
    drawers = {}
    for s in data.sections:
        if s.bits:
            key = _plot_key("bits_heatmap", s, data)
            plots[key] = {"file": None, **s.bits["heatmap"]}
            drawers[key] = (plot_bits_heatmap, s.bits["heatmap"])
        if s.curve:
            key = _plot_key("size_distortion", s, data)
            plots[key] = {"file": None, **s.curve}
            drawers[key] = (plot_size_distortion, s.curve)
        if s.breakdown:
            key = _plot_key("budget", s, data)
            plots[key] = {"file": None, **s.breakdown}
            drawers[key] = (plot_budget, s.breakdown)
    for fmt, result in data.analysis.items():
        plots[f"load_times_{fmt}"] = {"file": None, "artifact": result["path"], "file_bytes": result["file_bytes"],
                                      "devices": load_time_rows(result)}
    images: dict[str, bytes] = {}
    try:
        import matplotlib  # noqa: F401 - only to know whether plots can be drawn
    except ImportError:
        notes.append("no plots: matplotlib is not installed (pip install 'cvxq-export[report]')")
    else:
        from .analysis.analyze import plot_load_times

        for key in plots:
            base = key if key in PLOT_FILES else key.rsplit("_", 1)[0]
            fname = PLOT_FILES[base].replace(".png", key[len(base):] + ".png") if base in PLOT_FILES else f"{key}.png"
            if key.startswith("load_times_"):
                fmt = key[len("load_times_"):]
                made = plot_load_times(data.analysis[fmt], out / fname) if data.analysis[fmt]["devices"] else None
            else:
                draw, payload = drawers[key]
                made = draw(payload, out / fname)
            if made is not None:
                plots[key]["file"] = fname
                images[fname] = (out / fname).read_bytes()
    from .analysis.analyze import jsonable

    content, measured = split_measured(relative_paths(jsonable(data.to_json(plots)), out))
    write_json(out / "report.json", content)
    write_json(out / "timings.json", measured)
    md = render(data, plots)
    write_text(out / "report.md", md)
    write_text(out / "report.html", markdown_to_html(md, images, f"cvxq-export report: {model}"))
    return out / "report.md"
