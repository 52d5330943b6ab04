"""Tiny random Hugging Face Llama checkpoints for the interchange tests (CPU, offline)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

# Never the network: everything here is built locally.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# scripts/test.sh installs these (the "test" extra) and sets DORA_JAX_REQUIRE_ASSETS=1: there
# a missing one fails the run, never skips it.
_missing = [m for m in ("torch", "transformers", "peft", "safetensors")
            if importlib.util.find_spec(m) is None]  # fmt: skip
if _missing:
    _message = f'needs {_missing}: pip install torch==2.13.0 && pip install -e ".[test]"'
    if os.environ.get("DORA_JAX_REQUIRE_ASSETS") == "1":
        raise ImportError(_message)
    pytest.skip(_message, allow_module_level=True)

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402

torch.set_num_threads(1)
__all__ = ["peft", "safe_open", "torch", "transformers"]

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
