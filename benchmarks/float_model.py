"""The float benchmark model: SmolLM2-135M with its function kept and its weights moved off
every quantization grid.

The packaged SmolLM2 file is Q4_1: any 4-bit type with 32-weight blocks and a float minimum
reproduces its weights exactly, which no user's float model allows. This builds the same
function in float weights:

1. fold each RMSNorm's gain into the linear layers that read its output (columns scaled),
   the final norm's into an untied copy of the head; every norm gain becomes 1;
2. rotate the residual stream by a random orthogonal R ([d, d], seeded): an RMSNorm without
   gain commutes with R (it only divides by the vector's norm), so with
   embedding E -> E R, every matrix reading the stream W -> W R (q, k, v, gate, up, head),
   every matrix writing to it W -> R^T W (o, down), the model computes the same logits
   while no weight lies on a grid any more.

Written as an HF directory (float32 safetensors + the tokenizer) and as an F16 GGUF.

    python benchmarks/float_model.py                 # -> ~/.cache/cvxq-export/models/smollm2-135m-float/
    python benchmarks/float_model.py --check 8       # and compare perplexities on 8 windows of test.txt
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import protocol  # noqa: E402

DEFAULT_SEED = 0


def default_directory() -> Path:
    from cvxq_export.model_cache import cache_dir

    return cache_dir() / "models" / "smollm2-135m-float"


def random_orthogonal(d: int, seed: int):
    """``[d, d]`` float64 Haar-random orthogonal matrix (QR of a Gaussian, signs fixed)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def fold_and_rotate(model, seed: int = DEFAULT_SEED) -> None:
    """In place, for a Llama-layout HF model (model.layers[i].self_attn / .mlp, RMSNorms)."""
    import torch

    inner = model.model
    d = model.config.hidden_size
    rot = random_orthogonal(d, seed)  # [d, d]

    def reads(linear, gain):  # y = norm(h) W^T -> W' = (W diag(g)) R: [out, d]
        w = linear.weight.data.double() * gain.double()[None, :]
        linear.weight.data = (w @ rot).to(linear.weight.dtype)

    def writes(linear):  # stream += y W^T -> W' = R^T W: [d, in]
        linear.weight.data = (rot.T @ linear.weight.data.double()).to(linear.weight.dtype)
        if linear.bias is not None:
            linear.bias.data = (linear.bias.data.double() @ rot).to(linear.bias.dtype)

    with torch.no_grad():
        head_weight = model.get_output_embeddings().weight.data.clone()  # [V, d], tied to the embedding
        final_gain = inner.norm.weight.data.clone()
        emb = inner.embed_tokens
        emb.weight = torch.nn.Parameter((emb.weight.data.double() @ rot).to(emb.weight.dtype), requires_grad=False)
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            g1, g2 = layer.input_layernorm.weight.data, layer.post_attention_layernorm.weight.data
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
                reads(lin, g1)
            for lin in (mlp.gate_proj, mlp.up_proj):
                reads(lin, g2)
            writes(attn.o_proj)
            writes(mlp.down_proj)
            layer.input_layernorm.weight.data.fill_(1.0)
            layer.post_attention_layernorm.weight.data.fill_(1.0)
        head = torch.nn.Linear(d, head_weight.shape[0], bias=False)
        head.weight = torch.nn.Parameter(((head_weight.double() * final_gain.double()[None, :]) @ rot).float(),
                                         requires_grad=False)
        model.lm_head = head
        model.config.tie_word_embeddings = False
        inner.norm.weight.data.fill_(1.0)


def _plain_copy(model):
    """The same weights in a model transformers will save (one loaded from GGUF is marked
    as a quantized checkpoint, which save_pretrained refuses)."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(model.state_dict(), strict=True)
    return fresh


def build(out: Path, seed: int = DEFAULT_SEED, *, log=print) -> dict:
    """Write ``out/hf/`` and ``out/model-f16.gguf``; returns their paths."""
    from cvxq_export.formats.gguf.target import write_float_gguf
    from cvxq_export.io import atomic_path
    from cvxq_export.model import load_model

    loaded = protocol.load_default_model()
    fold_and_rotate(loaded.model, seed)
    hf_dir = out / "hf"
    hf_dir.mkdir(parents=True, exist_ok=True)
    _plain_copy(loaded.model).save_pretrained(hf_dir)
    loaded.tokenizer.save_pretrained(hf_dir)
    log(f"HF directory: {hf_dir}")
    float_model = load_model(str(hf_dir))  # through the HF reader, as a user's model arrives
    gguf_path = out / "model-f16.gguf"
    write_float_gguf(float_model, gguf_path)
    log(f"F16 GGUF: {gguf_path}")
    info = {"hf": str(hf_dir), "gguf_f16": str(gguf_path), "seed": seed}
    with atomic_path(out / "float_model.json") as tmp:
        Path(tmp).write_text(json.dumps(info, indent=2))
    return info


def ensure(out: Path | None = None, seed: int = DEFAULT_SEED) -> dict:
    """The float model's paths, building it once (benchmarks call this)."""
    out = out or default_directory()
    meta = out / "float_model.json"
    if meta.is_file():
        info = json.loads(meta.read_text())
        if info.get("seed") == seed and Path(info["gguf_f16"]).is_file():
            return info
    return build(out, seed)


def check(info: dict, n_windows: int) -> dict:
    """Perplexity of the source and the float model in PyTorch, and of the F16 GGUF in llama.cpp."""
    from cvxq_export.model import load_model

    source = protocol.load_default_model()
    windows = protocol.evaluation_ids(source.tokenizer, n_windows)
    ppl_source = protocol.torch_perplexity(source.model, windows, desc="source").perplexity
    float_model = load_model(info["hf"])
    ppl_float = protocol.torch_perplexity(float_model.model, windows, desc="float model").perplexity
    ppl_gguf = protocol.llama_cpp_perplexity(info["gguf_f16"], windows).perplexity
    return {"windows": n_windows, "torch_perplexity_source": ppl_source, "torch_perplexity_float": ppl_float,
            "relative_difference": abs(ppl_float - ppl_source) / ppl_source,
            "llama_cpp_perplexity_f16_gguf": ppl_gguf,
            "q4_1_exact_blocks_source": _grid_check(source), "q4_1_exact_blocks_float": _grid_check(float_model)}


def _grid_check(loaded) -> float:
    """Share of the first block matrix's 32-weight blocks that Q4_1 (16 levels from the block's
    minimum to its maximum) reproduces exactly."""
    import numpy as np

    ref = next(r for r in loaded.weights if r.in_block)
    w = loaded.weight_tensor(ref).detach().float().numpy().reshape(-1, 32)
    lo, hi = w.min(1, keepdims=True), w.max(1, keepdims=True)
    scale = np.where(hi > lo, (hi - lo) / 15, 1)
    codes = np.rint((w - lo) / scale)
    return float(np.mean(np.all(np.abs(codes * scale + lo - w) <= 1e-6 * np.abs(w).max(), axis=1)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: the cache's models/smollm2-135m-float)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the rotation")
    ap.add_argument("--check", type=int, default=0, metavar="N",
                    help="compare perplexities on the first N windows of test.txt and write "
                         "docs/results/engine/float_model.json")
    ap.add_argument("--rebuild", action="store_true", help="build again even when the directory holds the model")
    args = ap.parse_args(argv)
    out = args.out or default_directory()
    built = args.rebuild or not (out / "float_model.json").is_file()
    info = build(out, args.seed) if built else ensure(out, args.seed)
    if args.check and built:
        # compare in a fresh process: the source model is loaded by a process that has not
        # loaded, folded and rotated it
        import subprocess

        return subprocess.call([sys.executable, __file__, "--out", str(out), "--seed", str(args.seed),
                                "--check", str(args.check)])
    if args.check:
        result = check(info, args.check)
        print(json.dumps(result, indent=2))
        protocol.write_results(protocol.result_path("engine", "float_model.json"), {**result, "seed": args.seed})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
