"""One picture of every format at once: file size vs perplexity for our GGUF (llama.cpp),
ONNX (ONNX Runtime, default accuracy level) and packed (PyTorch with the weights read
back from the file) files, next to llama.cpp's presets and ONNX Runtime's RTN quantizer.

    python benchmarks/plot_formats.py [OUT.png] --gguf docs/results/gguf/perplexity_no_speed_limit.json \
        --onnx docs/results/onnx/perplexity_vs_budget.json --onnx-no-speed-limit \
        --packed docs/results/packed/perplexity_vs_budget.json --presets docs/results/gguf/llama_cpp_presets.json \
        [--gguf-ablation docs/results/gguf/perplexity_no_error_feedback.json] [--packed-ablation ...] [--onnx-ablation ...]

OUT.png defaults to docs/plots/formats_size_vs_perplexity.png. From an ONNX results file
the CVXQ rows of the default plans are drawn, or with --onnx-no-speed-limit the
"--decode-speed 0" rows; its ORT RTN rows are drawn as points.
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import protocol  # noqa: E402  benchmarks/protocol.py


def rows(path, keep=lambda r: True):
    out = [r for r in json.load(open(path))["rows"] if "file_bytes" in r and r.get("perplexity") and keep(r)]
    return sorted(out, key=lambda r: r["file_bytes"])


def limit_note(data, key) -> str:
    """", no speed limit" or ", --decode-speed R" when every row was planned with that setting."""
    settings = {r.get(key) for r in data}
    if len(settings) != 1 or None in settings:
        return ""
    (r,) = settings
    return ", no speed limit" if not r else f", --decode-speed {r:g}"


def curve(ax, data, style, label, **kw):
    if data:
        ax.plot([r["file_bytes"] / 1e6 for r in data], [r["perplexity"] for r in data], style, label=label, **kw)


ap = argparse.ArgumentParser(description="File size vs perplexity of every format at once, next to llama.cpp's "
                                         "presets and ONNX Runtime's RTN quantizer.")
ap.add_argument("out", nargs="?", default=str(protocol.ROOT / "docs" / "plots" / "formats_size_vs_perplexity.png"),
                help="image file (default docs/plots/formats_size_vs_perplexity.png)")
ap.add_argument("--gguf")
ap.add_argument("--onnx")
ap.add_argument("--packed")
ap.add_argument("--presets")
ap.add_argument("--gguf-ablation")
ap.add_argument("--onnx-ablation")
ap.add_argument("--packed-ablation")
ap.add_argument("--onnx-no-speed-limit", action="store_true",
                help="draw the ONNX files' --decode-speed 0 rows (the most accurate plans) instead of the default plans")
args = ap.parse_args()

fig, ax = plt.subplots(figsize=(9, 5.5))
cvxq = lambda r: str(r.get("method", "CVXQ")).startswith("CVXQ")  # noqa: E731
planned = lambda r: cvxq(r) and ("decode-speed 0" in str(r.get("method"))) == args.onnx_no_speed_limit  # noqa: E731
if args.gguf:
    data = rows(args.gguf)
    curve(ax, data, "o-", "GGUF in llama.cpp (CVXQ + error feedback" + limit_note(data, "decode_speed") + ")",
          color="tab:blue")
if args.gguf_ablation:
    curve(ax, rows(args.gguf_ablation), "o:", "GGUF, no error feedback", color="tab:blue", alpha=0.5)
if args.onnx:
    data = rows(args.onnx, planned)
    curve(ax, data, "s-", "ONNX in ONNX Runtime (CVXQ + error feedback" + limit_note(data, "decode_speed_floor") + ")",
          color="tab:green")
    for r in rows(args.onnx, lambda r: "RTN" in str(r.get("method"))):
        ax.plot(r["file_bytes"] / 1e6, r["perplexity"], "x", color="tab:olive", ms=8)
        ax.annotate(r["method"].replace(", embedding GBQ", ""), (r["file_bytes"] / 1e6, r["perplexity"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    ax.plot([], [], "x", color="tab:olive", label="ONNX Runtime's MatMulNBitsQuantizer (RTN 4-bit)")
if args.onnx_ablation:
    curve(ax, rows(args.onnx_ablation, cvxq), "s:", "ONNX, no error feedback", color="tab:green", alpha=0.5)
if args.packed:
    curve(ax, rows(args.packed), "v-", "packed (CVXQ units + error feedback; PyTorch)", color="tab:purple")
if args.packed_ablation:
    curve(ax, rows(args.packed_ablation), "v:", "packed, no error feedback", color="tab:purple", alpha=0.5)
if args.presets:
    for r in rows(args.presets, lambda r: r["preset"] != "F16" and r["file_bytes"] < 145e6):
        style = ("^", "tab:red") if r["imatrix"] else ("^", "tab:orange")
        ax.plot(r["file_bytes"] / 1e6, r["perplexity"], style[0], color=style[1], ms=5)
    ax.plot([], [], "^", color="tab:red", label="llama.cpp presets + importance matrix")
    ax.plot([], [], "^", color="tab:orange", label="llama.cpp presets")
    f16 = next((r for r in json.load(open(args.presets))["rows"] if r["preset"] == "F16"), None)
    if f16:
        ax.axhline(f16["perplexity"], color="gray", ls=":", label=f"unquantized: {f16['perplexity']:.2f}")
ax.axvline(98.4, color="gray", ls="--", lw=0.8)
ax.annotate("Q4_1 everywhere = SmolLM2's source grid (lossless)", (98.4, ax.get_ylim()[1]), fontsize=6, rotation=90,
            va="top", ha="right")
ax.set_xlabel("file size on disk (MB)")
ax.set_ylabel(f"perplexity (wikitext-2 test, {protocol.EVAL_WINDOWS} x {protocol.SEQ_LEN})")
ax.set_ylim(top=min(51, ax.get_ylim()[1]))
ax.set_title("SmolLM2-135M-Instruct: every format, size vs perplexity")
ax.legend(fontsize=7)
ax.grid(alpha=0.3)
fig.tight_layout()
protocol.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
fig.savefig(args.out, dpi=120)
