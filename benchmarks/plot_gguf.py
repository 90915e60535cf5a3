"""Plot file size vs llama.cpp perplexity: our GGUF curve and llama.cpp's presets,
both measured on this machine with the same protocol.

    python benchmarks/plot_gguf.py docs/bench_gguf.json docs/bench_llama_presets.json docs/gguf_curve.png \
        [--also "LABEL=FILE.json" ...]

``--also`` adds more of our curves (rows with file_bytes and perplexity): the
no-feedback ablation, the packed format (PyTorch perplexity of its weights).
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# llama.cpp mixes with --token-embedding-type (imatrix) that were not re-measured here: issue 3's figures
ISSUE_MIXES = {"Q3_K_M+Q5_0 embd (issue)": (82.9, 32.30), "Q2_K+Q5_0 embd (issue)": (77.6, 33.89),
               "Q2_K+Q4_0 embd (issue)": (74.0, 36.27)}

ap = argparse.ArgumentParser()
ap.add_argument("ours")
ap.add_argument("presets")
ap.add_argument("out")
ap.add_argument("--also", action="append", default=[], help="LABEL=FILE.json")
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
if not any(r.get("token_embd") for r in presets):  # mixes not measured here: show the issue's figures, marked as such
    for name, (mb, ppl) in ISSUE_MIXES.items():
        ax.plot(mb, ppl, "D", color="tab:purple")
        ax.annotate(name, (mb, ppl), fontsize=6, xytext=(3, -8), textcoords="offset points")
    ax.plot([], [], "D", color="tab:purple", label="llama.cpp mix + imatrix (issue 3 figure)")
ax.plot([], [], "^", color="tab:orange", label="llama.cpp preset")
ax.plot([], [], "s", color="tab:red", label="llama.cpp preset + importance matrix")
if f16:
    ax.axhline(f16["perplexity"], color="gray", ls=":", label=f"F16 ({f16['file_bytes'] / 1e6:.1f} MB): {f16['perplexity']:.2f}")
ax.set_xlabel("file size (MB)")
ax.set_ylabel("perplexity in llama.cpp (wikitext-2 test, 20 x 512)")
ax.set_ylim(top=min(45, ax.get_ylim()[1]))
ax.set_title("SmolLM2-135M-Instruct: GGUF size vs perplexity")
ax.legend(fontsize=7)
ax.grid(alpha=0.3)
fig.tight_layout()
fig.savefig(args.out, dpi=120)
