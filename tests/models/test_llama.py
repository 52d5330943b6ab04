"""Tests for the Flax Linen Llama (the SmolLM2 GGUF loader: tests/models/test_smollm2.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dora_jax.models.llama import (
    Llama,
    LlamaConfig,
    _causal_attention,
    next_token_loss,
    stack_layer_params,
    unstack_layer_params,
)


def _init(config, seq=12, batch=2, seed=0):
    ids = jax.random.randint(jax.random.PRNGKey(seed + 1), (batch, seq), 0, config.vocab_size)
    model = Llama(config)
    params = model.init(jax.random.PRNGKey(seed), ids)
    return model, params, ids


def test_output_shape_and_param_layout():
    cfg = LlamaConfig.tiny()
    model, params, ids = _init(cfg)
    logits = model.apply(params, ids)
    assert logits.shape == (2, 12, cfg.vocab_size)
    assert logits.dtype == jnp.float32
    p = params["params"]
    assert set(p) == {"embed_tokens", "norm"} | {f"layers_{i}" for i in range(cfg.num_layers)}
    attn = p["layers_0"]["self_attn"]
    assert attn["q_proj"]["kernel"].shape == (
        cfg.hidden_size,
        cfg.num_heads * cfg.head_dim,
    )
    assert attn["k_proj"]["kernel"].shape == (
        cfg.hidden_size,
        cfg.num_kv_heads * cfg.head_dim,
    )
    assert p["layers_0"]["mlp"]["down_proj"]["kernel"].shape == (
        cfg.intermediate_size,
        cfg.hidden_size,
    )


def test_untied_has_lm_head():
    cfg = LlamaConfig.tiny(tie_embeddings=False)
    model, params, ids = _init(cfg)
    assert params["params"]["lm_head"]["kernel"].shape == (
        cfg.hidden_size,
        cfg.vocab_size,
    )
    assert model.apply(params, ids).shape == (2, 12, cfg.vocab_size)


def test_causality():
    cfg = LlamaConfig.tiny()
    model, params, ids = _init(cfg)
    changed = ids.at[:, 8].set((ids[:, 8] + 1) % cfg.vocab_size)
    a = model.apply(params, ids)
    b = model.apply(params, changed)
    np.testing.assert_allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not np.allclose(a[:, 8:], b[:, 8:])


def test_attention_mask_ignores_padding():
    # Left padding with a mask and shifted positions must reproduce unpadded logits.
    cfg = LlamaConfig.tiny()
    model, params, ids = _init(cfg, batch=1, seq=6)
    ref = model.apply(params, ids)
    padded = jnp.concatenate([jnp.zeros((1, 3), ids.dtype), ids], axis=1)
    mask = jnp.array([[0] * 3 + [1] * 6])
    pos = jnp.maximum(jnp.arange(9) - 3, 0)[None]
    out = model.apply(params, padded, attention_mask=mask, positions=pos)
    np.testing.assert_allclose(out[:, 3:], ref, atol=1e-5)


def _attention_reference(q, k, v, mask):
    """One head at a time in numpy; query head h reads K/V head h // (nh // nkv)."""
    q, k, v, mask = (np.asarray(a, np.float64) for a in (q, k, v, mask))
    b, t, nh, hd = q.shape
    g = nh // k.shape[2]
    out = np.zeros((b, t, nh, hd))
    for h in range(nh):
        s = q[:, :, h] @ k[:, :, h // g].transpose(0, 2, 1) / np.sqrt(hd)
        s = np.where(mask > 0, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, :, h] = p @ v[:, :, h // g]
    return out.reshape(b, t, nh * hd)


@pytest.mark.parametrize("nh,nkv", [(4, 4), (4, 2), (6, 2), (3, 1)])
def test_attention_matches_per_head_reference(nh, nkv):
    b, t, s, hd = 2, 5, 7, 8
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(kq, (b, t, nh, hd))
    k = jax.random.normal(kk, (b, s, nkv, hd))
    v = jax.random.normal(kv, (b, s, nkv, hd))
    mask = (
        jnp.tril(jnp.ones((t, s), bool), k=s - t)[None]
        & jnp.array([[1] * s, [0] + [1] * 6], bool)[:, None]
    )
    out = jax.jit(_causal_attention, static_argnums=4)(q, k, v, mask, jnp.float32)
    np.testing.assert_allclose(out, _attention_reference(q, k, v, mask), rtol=1e-5, atol=1e-6)

    # Gradients (the model's softmax has its own VJP) against autodiff of plain jnp.
    def plain(q, k, v):
        k, v = (jnp.repeat(a, nh // nkv, axis=2) for a in (k, v))
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
        p = jax.nn.softmax(jnp.where(mask[:, None], s, -jnp.inf), axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, t, nh * hd)

    w = jax.random.normal(jax.random.PRNGKey(1), (b, t, nh * hd))
    grads = jax.grad(lambda *a: jnp.sum(_causal_attention(*a, mask, jnp.float32) * w), (0, 1, 2))
    expected = jax.grad(lambda *a: jnp.sum(plain(*a) * w), (0, 1, 2))
    for got, want in zip(grads(q, k, v), expected(q, k, v)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_scan_matches_loop():
    cfg = LlamaConfig.tiny()
    model, params, ids = _init(cfg)
    scan_cfg = LlamaConfig.tiny(scan_layers=True)
    scan_model = Llama(scan_cfg)
    stacked = {"params": stack_layer_params(params["params"], cfg.num_layers)}
    # The restacked tree must have exactly the structure scan init produces.
    scan_init = scan_model.init(jax.random.PRNGKey(0), ids)
    assert jax.tree.structure(scan_init) == jax.tree.structure(stacked)
    assert jax.tree.map(jnp.shape, scan_init) == jax.tree.map(jnp.shape, stacked)
    np.testing.assert_allclose(scan_model.apply(stacked, ids), model.apply(params, ids), atol=1e-5)
    back = unstack_layer_params(stacked["params"], cfg.num_layers)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, back, params["params"]))


@pytest.mark.parametrize("weighted", [False, True])
def test_next_token_loss_matches_shifted_log_softmax(weighted):
    b, t, v = 3, 7, 11
    logits = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (b, t, v))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (b, t), 0, v)
    weights = jax.random.bernoulli(jax.random.PRNGKey(2), 0.6, (b, t)).astype(jnp.float32)

    def reference(logits):
        logp = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        w = weights[:, 1:] if weighted else jnp.ones_like(nll)
        return jnp.sum(nll * w) / jnp.sum(w)

    loss = lambda x: next_token_loss(x, tokens, weights if weighted else None)  # noqa: E731
    np.testing.assert_allclose(loss(logits), reference(logits), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(loss)(logits), jax.grad(reference)(logits), atol=1e-7)


def _scanned_kept(method, dtype=jnp.float32):
    """Activation-sized arrays ``grad`` keeps for a scanned tiny Llama, all 7 projections,
    in bytes."""
    import collections

    import dora_jax
    from dora_jax.models.llama import projection_regex
    from tests import helpers

    cfg = LlamaConfig.tiny(scan_layers=True)
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    model = Llama(cfg, dtype=dtype, param_dtype=dtype)
    variables = model.init(jax.random.key(0), ids)
    apply = lambda p, t: model.apply({"params": p}, t)  # noqa: E731
    axes = dora_jax.infer_axes(apply, variables["params"], ids)
    adapted = dora_jax.wrap(
        variables["params"], rank=4, method=method, targets=projection_regex(), axes=axes
    )
    frozen, trainable = dora_jax.partition(adapted)

    def loss(t):
        return next_token_loss(dora_jax.apply(apply)(dora_jax.combine(frozen, t), ids), ids)

    min_size = cfg.num_layers * ids.size * 32
    return collections.Counter(helpers.kept_sizes(loss, trainable, min_size, nbytes=True))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_scanned_dora_keeps_one_array_per_layer_more_than_lora(dtype):
    # DoRA's magnitude gradient reads each projection's output. The scanned layer keeps the
    # outputs of q, k, v (attention recomputes its rotated, transposed copies from them),
    # gate and up (the SwiGLU) and o (the add-and-norm recomputes the residual sum from it)
    # anyway, so DoRA stacks one array more than LoRA per layer, down's output, in the
    # model's dtype (no float32 copy of a bfloat16 output); without the rematerialised
    # attention and add-and-norm it would be five.
    cfg = LlamaConfig.tiny()
    lora, dora = _scanned_kept("lora", dtype), _scanned_kept("dora", dtype)
    down_out = cfg.num_layers * 2 * 16 * cfg.hidden_size * jnp.dtype(dtype).itemsize
    assert dora - lora == {down_out: 1}, dora - lora
    assert not (lora - dora)


def test_scanned_bfloat16_dora_gradients_match_the_unscanned_model():
    # Scanned, DoRA's output scaling has its own derivative (forward._rescaled); unscanned,
    # it is the plain product. Same params, bfloat16 activations: the gradients agree.
    import dora_jax
    from dora_jax.models.llama import projection_regex
    from tests import helpers

    cfg = LlamaConfig.tiny()
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    loop = Llama(cfg, dtype=jnp.bfloat16)
    scan = Llama(LlamaConfig.tiny(scan_layers=True), dtype=jnp.bfloat16)
    params = loop.init(jax.random.key(0), ids)["params"]
    adapted = dora_jax.wrap(params, rank=4, method="dora", targets=projection_regex())
    adapted = helpers.perturb(adapted, size=0.1)  # B and m off their initial values
    frozen, trainable = dora_jax.partition(adapted)

    def grads(model, frozen, trainable):
        def loss(t):
            p = dora_jax.combine(frozen, t)
            return next_token_loss(dora_jax.apply(model.apply)({"params": p}, ids), ids)

        return jax.grad(loss)(trainable)

    want = grads(loop, frozen, trainable)
    stacked = stack_layer_params(params, cfg.num_layers)
    axes = {"layers/": dora_jax.Axes(1, 1)}
    frozen_s, trainable_s = dora_jax.partition(
        dora_jax.wrap(stacked, rank=4, method="dora", targets=projection_regex(), axes=axes)
    )
    stack = lambda tree: stack_layer_params(tree, cfg.num_layers)  # noqa: E731
    # The same trainable values, stacked over layers.
    trainable_s = jax.tree.unflatten(
        jax.tree.structure(trainable_s), jax.tree.leaves(stack(trainable))
    )
    got = grads(scan, frozen_s, trainable_s)
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(stack(want)),
                            jax.tree.leaves(got), strict=True):  # fmt: skip
        # bfloat16 rounding differs between the two programs element by element; the
        # gradient as a whole agrees to within 2% (a missing or float32-only term would not).
        w, g = np.asarray(w, np.float32), np.asarray(g, np.float32)
        err = np.linalg.norm(g - w) / np.linalg.norm(w)
        assert err < 0.02, (jax.tree_util.keystr(path), err)
