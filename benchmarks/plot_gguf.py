"""Plot file size vs llama.cpp perplexity: our GGUF curve and llama.cpp's presets,
both measured on this machine with the same protocol (benchmarks/protocol.py).

    python benchmarks/plot_gguf.py [OURS.json PRESETS.json OUT.png] [--also "LABEL=FILE.json" ...]

The defaults are docs/results/gguf/perplexity_vs_budget.json,
docs/results/gguf/llama_cpp_presets.json and docs/plots/gguf_size_vs_perplexity.png.
``--also`` adds more of our curves (rows with file_bytes and perplexity, up to three):
other --decode-speed settings, the no-feedback ablation.
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import protocol  # noqa: E402  benchmarks/protocol.py

ap = argparse.ArgumentParser(description="File size vs llama.cpp perplexity: our GGUF curves and llama.cpp's presets.")
ap.add_argument("ours", nargs="?", default=str(protocol.result_path("gguf", "perplexity_vs_budget.json")),
                help="bench_gguf.py result (default docs/results/gguf/perplexity_vs_budget.json)")
ap.add_argument("presets", nargs="?", default=str(protocol.result_path("gguf", "llama_cpp_presets.json")),
                help="bench_llama_presets.py result (default docs/results/gguf/llama_cpp_presets.json)")
ap.add_argument("out", nargs="?", default=str(protocol.ROOT / "docs" / "plots" / "gguf_size_vs_perplexity.png"),
                help="image file (default docs/plots/gguf_size_vs_perplexity.png)")
ap.add_argument("--also", action="append", default=[], help="LABEL=FILE.json (up to three)")
ap.add_argument("--label", default="cvxq-export GGUF (CVXQ allocation + error feedback)", help="label of the main curve")
args = ap.parse_args()


def curve(path: str) -> list[dict]:
    """Rows with a file, one per file size (budgets past a speed limit make the same file), by size."""
    rows = {r["file_bytes"]: r for r in json.load(open(path))["rows"] if "file_bytes" in r}
    return [rows[k] for k in sorted(rows)]


ours = curve(args.ours)
presets = json.load(open(args.presets))["rows"]
fig, ax = plt.subplots(figsize=(8, 5))
ax.plot([r["file_bytes"] / 1e6 for r in ours], [r["perplexity"] for r in ours], "o-", color="tab:blue",
        label=args.label)
for spec, style in zip(args.also, ["x--", "v-.", "*:"]):
    label, path = spec.split("=", 1)
    extra = curve(path)
    ax.plot([r["file_bytes"] / 1e6 for r in extra], [r["perplexity"] for r in extra], style, label=label, alpha=0.8)
f16 = next((r for r in presets if r["preset"] == "F16"), None)
for r in presets:
    if r["preset"] == "F16" or r["file_bytes"] > 145e6:
        continue
    style = ("s", "tab:red") if r["imatrix"] else ("^", "tab:orange")
    ax.plot(r["file_bytes"] / 1e6, r["perplexity"], style[0], color=style[1])
    ax.annotate(r["label"], (r["file_bytes"] / 1e6, r["perplexity"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
ax.plot([], [], "^", color="tab:orange", label="llama.cpp preset")
ax.plot([], [], "s", color="tab:red", label="llama.cpp preset + importance matrix")
if f16:
    ax.axhline(f16["perplexity"], color="gray", ls=":", label=f"F16 ({f16['file_bytes'] / 1e6:.1f} MB): {f16['perplexity']:.2f}")
ax.set_xlabel("file size (MB)")
ax.set_ylabel(f"perplexity in llama.cpp (wikitext-2 test, {protocol.EVAL_WINDOWS} x {protocol.SEQ_LEN})")
ax.set_ylim(top=min(45, ax.get_ylim()[1]))
ax.set_title("SmolLM2-135M-Instruct: GGUF size vs perplexity")
ax.legend(fontsize=7)
ax.grid(alpha=0.3)
fig.tight_layout()
protocol.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
fig.savefig(args.out, dpi=120)
