"""Hugging Face checkpoints in and out: from_hf / to_hf against transformers itself."""

import dataclasses
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dora_jax.models.llama import Llama, LlamaConfig, from_hf, to_hf
from tests.helpers import SIZES, require_hf, tiny_hf_model, token_batch, torch_logits

require_hf()

import torch  # noqa: E402
import transformers  # noqa: E402


def jax_logits(config, params, tokens):
    return np.asarray(jax.jit(Llama(config).apply)({"params": params}, jnp.asarray(tokens)))


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("tied", [True, False])
def test_from_hf_gives_transformers_logits(tmp_path, scan, tied):
    model = tiny_hf_model(tied=tied)
    model.save_pretrained(tmp_path)
    config, params = from_hf(tmp_path, scan_layers=scan)
    assert config.tie_embeddings == tied and config.num_kv_heads == 2
    assert config.rope_theta == 5e4 and config.scan_layers == scan
    assert ("layers" in params) == scan and ("lm_head" in params) == (not tied)
    tokens = token_batch()
    expected = torch_logits(model, tokens)
    assert np.abs(expected).max() > 1.0  # logits of order one: mistakes show
    np.testing.assert_allclose(jax_logits(config, params, tokens), expected, atol=1e-4, rtol=1e-4)


def test_from_hf_reads_sharded_bf16_files(tmp_path):
    model = tiny_hf_model(tied=False).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    config, params = from_hf(tmp_path, scan_layers=True)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    # Bit-exact tensors: the stacked q kernel of layer 1 is torch's weight, transposed.
    q = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy().T
    kernel = params["layers"]["self_attn"]["q_proj"]["kernel"][1]
    np.testing.assert_array_equal(np.asarray(kernel, np.float32), q)
    # Same weights in float32 on both sides give the same logits.
    _, params32 = from_hf(tmp_path, dtype=jnp.float32)
    tokens = token_batch()
    np.testing.assert_allclose(
        jax_logits(dataclasses.replace(config, scan_layers=False), params32, tokens),
        # Loaded afresh: .float() would keep the rope frequencies rounded to bf16.
        torch_logits(
            transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32), tokens
        ),
        atol=1e-4,
        rtol=1e-4,
    )


def test_from_hf_reads_mistral_style_config(tmp_path):
    model = tiny_hf_model(config_cls=transformers.MistralConfig, sliding_window=None, tied=False)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mistral"
    config, params = from_hf(tmp_path)
    tokens = token_batch(1)
    np.testing.assert_allclose(
        jax_logits(config, params, tokens), torch_logits(model, tokens), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize(
    "change, option",
    [
        ({"sliding_window": 8}, "sliding_window"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_type"),
        ({"model_type": "qwen2"}, "model_type"),
    ],
)
def test_from_hf_refuses_what_llama_does_not_compute(tmp_path, change, option):
    tiny_hf_model().save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, **change}))
    with pytest.raises(ValueError, match=option):
        from_hf(tmp_path)


def test_from_hf_refuses_a_checkpoint_with_missing_or_foreign_tensors(tmp_path):
    tiny_hf_model(tied=False).save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="lacks"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**hf, "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match="no place"):
        from_hf(tmp_path)


@pytest.mark.parametrize("scan", [False, True])
def test_to_hf_loads_in_transformers_with_the_same_logits(tmp_path, scan):
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
        num_kv_heads=2, rope_theta=5e4, tie_embeddings=scan, max_seq_len=64, scan_layers=scan,
    )  # fmt: skip
    tokens = token_batch(2)
    params = Llama(config).init(jax.random.key(3), jnp.asarray(tokens))["params"]
    params = jax.tree.map(lambda x: x * 6.0, params)  # logits of order one
    to_hf(tmp_path, config, params, max_shard_bytes=30_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    expected = jax_logits(config, params, tokens)
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(torch_logits(model, tokens), expected, atol=1e-4, rtol=1e-4)


def test_to_hf_again_into_the_same_directory_leaves_no_stale_weights(tmp_path):
    # Re-exporting after more training, or sharded then in one file (fp32, then bf16): the
    # earlier export's files must not be read, by transformers or by from_hf.
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
        num_kv_heads=2, tie_embeddings=False, max_seq_len=64,
    )  # fmt: skip
    tokens = token_batch(2)
    first = Llama(config).init(jax.random.key(3), jnp.asarray(tokens))["params"]
    second = jax.tree.map(lambda x: x * 3.0, first)
    for a, b, shard_a, shard_b in [
        (first, second, 30_000, 1 << 30),  # shards, then one file
        (second, first, 1 << 30, 30_000),  # one file, then shards
    ]:
        to_hf(tmp_path, config, a, max_shard_bytes=shard_a)
        to_hf(tmp_path, config, b, max_shard_bytes=shard_b)
        sharded = shard_b < (1 << 30)
        assert (tmp_path / "model.safetensors.index.json").exists() == sharded
        assert (tmp_path / "model.safetensors").exists() == (not sharded)
        expected = jax_logits(config, b, tokens)
        model = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
        np.testing.assert_allclose(torch_logits(model, tokens), expected, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(
            jax_logits(config, from_hf(tmp_path)[1], tokens), expected, atol=1e-5, rtol=1e-5
        )


def test_to_hf_after_from_hf_round_trips_bit_exactly(tmp_path):
    model = tiny_hf_model(tied=False).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "in")
    config, params = from_hf(tmp_path / "in", scan_layers=True)
    to_hf(tmp_path / "out", config, params)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert SIZES["hidden_size"] == config.hidden_size


def test_config_from_hf_reads_smollm2s_published_config():
    from dora_jax.models.llama import config_from_hf

    # SmolLM2-135M(-Instruct)'s config.json as published (transformers 4 style).
    published = {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576,
        "initializer_range": 0.041666666666666664, "intermediate_size": 1536,
        "is_llama_config": True, "max_position_embeddings": 8192, "model_type": "llama",
        "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_interleaved": False,
        "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.42.3", "use_cache": True,
        "vocab_size": 49152,
    }  # fmt: skip
    # The token ids ride along, for to_hf (they change nothing in the model).
    assert config_from_hf(published) == LlamaConfig.smollm2_135m(bos_token_id=1, eos_token_id=2)
    with pytest.raises(ValueError, match="rope_interleaved"):
        config_from_hf({**published, "rope_interleaved": True})


@pytest.mark.parametrize("stored", ["equal", "different", "only"])
def test_a_tied_config_with_a_stored_lm_head_reads_as_transformers_reads_it(tmp_path, stored):
    # transformers 5 ties a tied config's tables only when the files hold one, or two equal
    # ones; two different ones it keeps untied (with a warning), computing other logits.
    from safetensors.torch import load_file, save_file

    tiny_hf_model(tied=True).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    table = weights["model.embed_tokens.weight"]
    weights["lm_head.weight"] = {
        "equal": table.clone(), "different": 0.3 * torch.randn_like(table), "only": table
    }[stored]  # fmt: skip
    if stored == "only":
        del weights["model.embed_tokens.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    untied = stored == "different"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config, params = from_hf(tmp_path)
    tokens = token_batch()
    expected = torch_logits(model, tokens)
    np.testing.assert_allclose(jax_logits(config, params, tokens), expected, atol=1e-4, rtol=1e-4)
    said = [str(w.message) for w in caught if "tie_word_embeddings" in str(w.message)]
    assert len(said) == untied and config.tie_embeddings == (not untied)
    assert ("lm_head" in params) == untied
    if untied:  # and the export is what transformers computed
        assert np.abs(expected - torch_logits(tiny_hf_model(tied=True), tokens)).max() > 1.0
        to_hf(tmp_path / "out", config, params)
        again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
        np.testing.assert_allclose(torch_logits(again, tokens), expected, atol=1e-4, rtol=1e-4)


def test_to_hf_keeps_the_token_ids_so_generate_stops_at_eos(tmp_path):
    model = tiny_hf_model(tied=True, bos_token_id=7, pad_token_id=5)
    prompt = torch.as_tensor(token_batch(batch=1, seq=4), dtype=torch.long)

    def generate(m):
        return m.generate(prompt, max_new_tokens=8, do_sample=False)[0].tolist()

    model.generation_config.eos_token_id = None
    eos = generate(model)[6]  # the third new token: generate stops there
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = [eos, 63]  # a list, as Llama 3 has
    model.save_pretrained(tmp_path / "in")
    source = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "in").eval()
    expected = generate(source)
    assert len(expected) < 4 + 8 and expected[-1] == eos  # it stopped early

    config, params = from_hf(tmp_path / "in")
    to_hf(tmp_path / "out", config, params)
    exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert generate(exported) == expected
    assert exported.generation_config.pad_token_id == 5
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (7, (eos, 63), 5)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["eos_token_id"] == [eos, 63] and written["bos_token_id"] == 7


def test_from_hf_reads_options_that_compute_the_same(tmp_path):
    # transformers' "swish" is torch's SiLU.
    model = tiny_hf_model(tied=False, hidden_act="swish")
    model.save_pretrained(tmp_path)
    config, params = from_hf(tmp_path)
    tokens = token_batch()
    np.testing.assert_allclose(
        jax_logits(config, params, tokens), torch_logits(model, tokens), atol=1e-4, rtol=1e-4
    )


def test_a_mistral_sliding_window_as_long_as_the_context_is_read_and_kept(tmp_path):
    # sliding_window >= max_position_embeddings: full causal attention up to that length.
    model = tiny_hf_model(config_cls=transformers.MistralConfig, tied=False, sliding_window=64)
    model.save_pretrained(tmp_path / "in")
    config, params = from_hf(tmp_path / "in")
    assert config.sliding_window == 64 == config.max_seq_len
    tokens = np.random.default_rng(1).integers(0, 64, (1, 64)).astype(np.int32)
    expected = torch_logits(model, tokens)
    np.testing.assert_allclose(jax_logits(config, params, tokens), expected, atol=1e-4, rtol=1e-4)
    # Longer inputs, where transformers slides the window, are refused.
    with pytest.raises(ValueError, match="sliding_window=64"):
        jax_logits(config, params, np.zeros((1, 65), np.int32))
    # The export keeps the window (a Mistral config).
    to_hf(tmp_path / "out", config, params)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert again.config.model_type == "mistral" and again.config.sliding_window == 64
    np.testing.assert_allclose(torch_logits(again, tokens), expected, atol=1e-4, rtol=1e-4)
    # A window shorter than the context is refused, an absent one being Mistral's 4096.
    hf = json.loads((tmp_path / "in" / "config.json").read_text())
    del hf["sliding_window"]
    for change, window in [({"sliding_window": 63}, 63), ({}, 4096)]:
        for context in (64, 8192):
            text = json.dumps({**hf, **change, "max_position_embeddings": context})
            (tmp_path / "in" / "config.json").write_text(text)
            if window >= context:
                assert from_hf(tmp_path / "in")[0].sliding_window == window
            else:
                with pytest.raises(ValueError, match=f"sliding_window={window}"):
                    from_hf(tmp_path / "in")
