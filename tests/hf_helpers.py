"""Tiny random Hugging Face Llama checkpoints for the interchange tests (CPU, offline)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

SIZES = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)


def tiny_hf_model(tied=True, config_cls=None, seed=0, **overrides):
    """A random ``LlamaForCausalLM`` (or ``config_cls``'s model) with weights far from init.

    Kernels get std 0.3 and norm scales 1 +- 0.2, so that logits are of order one and a
    wrong transpose, head order or norm mapping changes them visibly.
    """
    config_cls = config_cls or transformers.LlamaConfig
    kw = {**SIZES, "tie_word_embeddings": tied, "rope_theta": 5e4, **overrides}
    config = config_cls(**kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return model.eval()


def token_batch(seed=0, batch=2, seq=12, vocab=64):
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq)).astype(np.int32)


def torch_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.as_tensor(tokens, dtype=torch.long)).logits
    return out.float().numpy()
