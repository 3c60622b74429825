"""Tiny random decoder-only models for tests: a few layers wide enough to mean something, with
logits spread wide so that argmax ties (which would make batched and single-row greedy differ by
float noise) do not happen."""

from __future__ import annotations

import torch


def tiny_lm(model_cls, config_cls, tokenizer, seed: int = 0, **config):
    """A random ``model_cls`` (2 layers, hidden 32, 4 heads over 2 KV heads unless ``config``
    says otherwise) over ``tokenizer``'s vocabulary and special tokens, seeded by ``seed``."""
    torch.manual_seed(seed)
    settings = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "initializer_range": 0.5,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **config,
    }
    return model_cls(config_cls(**settings))
