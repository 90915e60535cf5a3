"""Tiny random models of every supported architecture, built from transformers
configs (no downloads), saved as HF directories with a byte-level BPE tokenizer."""
from __future__ import annotations

from pathlib import Path

from conftest import _bpe_tokenizer

# Small but not degenerate: 4 query heads over 2 KV heads, a sliding window shorter
# than the test text where the architecture has one, Gemma 2's soft-capping on.
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)

ARCH_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True, rope_theta=10000.0)),
    # Llama 3.x's frequency-dependent rope scaling (llama.cpp: a rope_freqs tensor)
    "llama3-rope": ("LlamaConfig", dict(tie_word_embeddings=False, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 10000.0})),
    "mistral": ("MistralConfig", dict(sliding_window=None, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=12,
                                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=12)),
    "phi3": ("Phi3Config", dict(pad_token_id=0, tie_word_embeddings=False, sliding_window=None)),
}
MODEL_CLASSES = {"LlamaConfig": "LlamaForCausalLM", "MistralConfig": "MistralForCausalLM",
                 "Qwen2Config": "Qwen2ForCausalLM", "Qwen3Config": "Qwen3ForCausalLM",
                 "Gemma2Config": "Gemma2ForCausalLM", "Gemma3TextConfig": "Gemma3ForCausalLM",
                 "Phi3Config": "Phi3ForCausalLM"}


def build_tiny(name: str, path: Path, seed: int = 0) -> Path:
    import torch
    import transformers

    config_name, extra = ARCH_CONFIGS[name]
    tok = _bpe_tokenizer()
    config = getattr(transformers, config_name)(vocab_size=len(tok) + 4, **{**COMMON, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_CLASSES[config_name])(config)
    with torch.no_grad():  # random norm gains, so a wrong norm convention (Gemma's 1 + w) shows in the logits
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if "gemma" in config.model_type else 1.0))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
