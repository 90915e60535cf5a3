"""Plot file size vs llama.cpp perplexity: our GGUF curve and llama.cpp's presets.

    python benchmarks/plot_gguf.py docs/bench_gguf.json docs/gguf_curve.png

llama.cpp's points are the figures recorded in issue 3 (same protocol:
llama_model_quantize on an F16 GGUF of the same weights, 20 x 512 tokens of
test.txt); they were not re-measured by this script.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LLAMA_CPP = {  # name: (MB, perplexity), from issue 3
    "Q4_K_M": (105.5, 30.69), "Q3_K_M": (93.5, 32.23), "Q2_K": (88.2, 38.18),
    "Q4_K_M+imatrix": (105.5, 30.10), "Q3_K_M+imatrix": (93.5, 31.29), "Q4_0+imatrix": (91.9, 31.50),
    "Q2_K+imatrix": (88.2, 32.94), "Q3_K_M+imat, Q5_0 emb": (82.9, 32.30), "Q2_K+imat, Q5_0 emb": (77.6, 33.89),
    "Q2_K+imat, Q4_0 emb": (74.0, 36.27), "Q4_1 (source grid)": (98.4, 29.40),
}

data = json.load(open(sys.argv[1]))
rows = [r for r in data["rows"] if "file_bytes" in r]
fig, ax = plt.subplots(figsize=(7, 4.5))
ax.plot([r["file_bytes"] / 1e6 for r in rows], [r["perplexity"] for r in rows], "o-", label="cvxq-export GGUF (CVXQ allocation)")
for name, (mb, ppl) in LLAMA_CPP.items():
    marker = "s" if "imat" in name else "^"
    ax.plot(mb, ppl, marker, color="tab:red" if "imat" in name else "tab:orange")
    ax.annotate(name, (mb, ppl), fontsize=6, xytext=(3, 3), textcoords="offset points")
ax.axhline(29.31, color="gray", ls=":", label="F16 (270.9 MB): 29.31")
ax.set_xlabel("file size (MB)")
ax.set_ylabel("perplexity in llama.cpp (wikitext-2 test, 20 x 512)")
ax.set_title("SmolLM2-135M-Instruct: size vs perplexity")
ax.legend(fontsize=7)
ax.grid(alpha=0.3)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=120)
