"""Tiny models of every architecture hubc handles, built from configs in code (random weights, no downloads), with
the word-level tokenizer of helpers.tiny_tokenizer. Shapes vLLM's CPU kernels take: head_dim 32, widths multiples
of 32."""

from __future__ import annotations

from pathlib import Path

from helpers import VOCAB, tiny_tokenizer

COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 512,
    "initializer_range": 0.2,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 3,
    "tie_word_embeddings": False,
}

# model_type → (transformers config class, extra settings): each family's own features stay on (Qwen3's q/k norms,
# Gemma's scaled embeddings, sandwich norms, soft-capping and sliding windows, Phi-3's fused qkv/gate_up).
ARCHITECTURES = {
    "qwen2": ("Qwen2Config", {"head_dim": None, "hidden_size": 128}),  # Qwen2 takes head_dim = hidden / heads: 32
    "qwen3": ("Qwen3Config", {}),
    "mistral": ("MistralConfig", {"sliding_window": 64}),
    # Gemma ties its head to the embedding (vLLM's Gemma classes have no separate lm_head).
    "gemma": ("GemmaConfig", {"tie_word_embeddings": True}),
    "gemma2": ("Gemma2Config", {"sliding_window": 64, "query_pre_attn_scalar": 32, "tie_word_embeddings": True}),
    "gemma3_text": ("Gemma3TextConfig", {"sliding_window": 64, "query_pre_attn_scalar": 32,
                                         "tie_word_embeddings": True}),
    "phi3": ("Phi3Config", {"head_dim": None, "hidden_size": 128}),  # head_dim = hidden / heads: 32
}


def build_tiny_model(folder: Path, model_type: str, **overrides) -> Path:
    """A complete causal-LM folder of `model_type` (a key of ARCHITECTURES) that transformers loads and vLLM serves
    on CPU: random weights (seed 0), 3 layers, safetensors and a tokenizer; < 1 MB (`overrides`: config settings,
    e.g. wider layers)."""
    import torch
    import transformers

    config_class, extra = ARCHITECTURES[model_type]
    settings = {**COMMON, **extra, **overrides}
    settings = {k: v for k, v in settings.items() if v is not None}
    config = getattr(transformers, config_class)(**settings)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    tiny_tokenizer(VOCAB).save_pretrained(folder)
    return folder
