"""Models nobody here wrote, in tiny configurations: every kernel layout and common layer.

Gemma-style einsum projections, Equinox models (``(out, in)`` weights: an MLP, a conv and
attention), penzai's llamalike transformer, a Haiku transformer (looped and
``hk.layer_stack``), a Keras 3 model through ``stateless_call``, Flax's own multi-head
attention (Linen and NNX), an NNX model wrapped whole (its layers say their axes, stacked
with ``nnx.vmap`` and run with ``nnx.scan`` too), Linen and NNX convolutions, an embedding
tied to the output (``attend``), an ``nn.vmap`` ensemble over a shared input and NNX
models trained with ``nnx.Optimizer``.
Each model is checked the same way (:func:`check_model`): identity at init, ``strict=True``
forward equal to the merged model and to a plain-jnp reference of DoRA written here for
any layout, the magnitude equal to the merged kernel's norm over the input axes, gradients
equal to the reference's, and a few optax steps that leave the base bit-identical.
"""

from __future__ import annotations

import math
import os
import re
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dora_jax
from tests.helpers import adapter_nodes as nodes
from tests.helpers import assert_trees_close, require_package

# --- a plain-jnp reference of DoRA/LoRA for any layout ------------------------------------


def positions(ax, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(stack, inputs, outputs)`` kernel axis positions of an ``Axes``.

    An int field counts leading axes (stack first, then inputs); a tuple lists positions.
    """
    if isinstance(ax.stack, int):
        stack = tuple(range(ax.stack))
    else:
        stack = tuple(sorted(ax.stack))
    if isinstance(ax.inputs, int):
        inputs = tuple(range(len(stack), len(stack) + ax.inputs))
    else:
        inputs = tuple(sorted(ax.inputs))
    outputs = tuple(d for d in range(ndim) if d not in stack and d not in inputs)
    return stack, inputs, outputs


def resolve(axes, path: str, ndim: int):
    """The ``Axes`` that ``wrap`` uses for ``path``: exact key, regex, else 2-D ``(in, out)``."""
    axes = axes or {}
    if path in axes:
        return axes[path]
    for pattern, value in axes.items():
        if re.search(pattern, path):
            return value
    assert ndim == 2, f"no axes for {path}"
    return dora_jax.Axes(0, 1)


def ref_kernel(node, ax) -> jax.Array:
    """``W'`` by the formula, in the kernel's own layout (float32 maths, base dtype out).

    ``V = W0 + s A B`` contracted over the rank, ``W' = m V / ||V||_c`` with the norm over
    the input axes (a constant for differentiation), per stack and output entry. ``A`` is
    ``(*stack, *in, r)``, ``B`` ``(*stack, r, *out)``, ``m`` ``(*stack, *out)``.
    """
    w = node.base.astype(jnp.float32)
    stack, inputs, outputs = positions(ax, w.ndim)
    perm = stack + inputs + outputs
    wc = jnp.transpose(w, perm)
    s_shape = wc.shape[: len(stack)]
    n_in = math.prod(wc.shape[len(stack) : len(stack) + len(inputs)])
    n_out = math.prod(wc.shape[len(stack) + len(inputs) :])
    w2 = wc.reshape(*s_shape, n_in, n_out)
    a = node.a.astype(jnp.float32).reshape(*s_shape, n_in, -1)
    b = node.b.astype(jnp.float32).reshape(*s_shape, -1, n_out)
    v = w2 + node.scale * jnp.matmul(a, b)
    if isinstance(node, dora_jax.DoRA):
        m = node.magnitude.astype(jnp.float32).reshape(*s_shape, 1, n_out)
        norm = jnp.sqrt(jnp.sum(v * v, axis=-2, keepdims=True))
        v = m * v / jax.lax.stop_gradient(norm)
    return jnp.transpose(v.reshape(wc.shape), np.argsort(perm)).astype(node.base.dtype)


def ref_params(adapted, axes):
    """``adapted`` with every node replaced by :func:`ref_kernel`."""

    def one(path, x):
        if not dora_jax.is_adapter(x):
            return x
        p = dora_jax.tree.path_str(path)
        return ref_kernel(x, resolve(axes, p, x.base.ndim))

    return jax.tree_util.tree_map_with_path(one, adapted, is_leaf=dora_jax.is_adapter)


def kernels(params) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {dora_jax.tree.path_str(p): x for p, x in flat}


@jax.jit
def perturb(adapted, seed=0, size=0.1):
    """Moves every trainable leaf away from its init so B != 0 and m != ||W0||."""
    frozen, trainable = dora_jax.partition(adapted)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + size * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return dora_jax.combine(frozen, jax.tree.unflatten(treedef, leaves))


def as_array(y):
    """A model output as one float array (penzai returns NamedArrays, some models tuples)."""
    return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(y)])


def check_model(
    fn, params, args, *, targets, axes, inputs, method="dora", rank=2, steps=3, eager=False
):
    """The checks every model passes (see the module docstring).

    Args:
      fn: ``fn(params, *args)``, the unmodified model as a function of its params.
      params: its parameter tree.
      targets, axes: passed to :func:`dora_jax.wrap`.
      inputs: ``{path regex: input axis positions}``: where each kernel's input axes truly
        are, written by hand from the model's code (independent of ``axes``).
      eager: also run the adapted forward outside ``jit`` (op by op, slow on this CPU: the
        small models do; tests/forward/test_layouts.py runs every layout both ways).
    """
    wrap = lambda p: dora_jax.wrap(p, rank=rank, method=method, targets=targets, axes=axes)  # noqa: E731
    adapted = jax.jit(wrap)(params)
    found = nodes(adapted)
    assert found, "nothing was adapted"
    for path in found:
        assert any(re.search(p, path) for p in inputs), f"test lists no input axes for {path}"
    strict = dora_jax.apply(fn, strict=True)
    run = jax.jit(lambda p, *a: as_array(strict(p, *a)))
    run_plain = jax.jit(lambda p, *a: as_array(fn(p, *a)))
    base_out = run_plain(params, *args)

    # Identity at init: B = 0 and m = ||W0||_c.
    assert_trees_close(run(adapted, *args), base_out)

    # The magnitude sits on the output side: one value per output feature, the norm of the
    # merged kernel over the true input axes (at init and after moving every leaf).
    moved = perturb(adapted)
    for tree in (adapted, moved):
        merged = kernels(jax.jit(dora_jax.merge)(tree))
        for path, node in nodes(tree).items():
            if not isinstance(node, dora_jax.DoRA):
                continue
            true_in = next(v for p, v in inputs.items() if re.search(p, path))
            stack, _, outputs = positions(resolve(axes, path, node.base.ndim), node.base.ndim)
            assert set(stack) | set(outputs) == set(range(node.base.ndim)) - set(true_in), path
            w = np.asarray(merged[path], np.float64)
            norm = np.sqrt(np.sum(w * w, axis=true_in))
            rest = [d for d in range(node.base.ndim) if d not in true_in]
            norm = np.transpose(norm, [rest.index(d) for d in (*stack, *outputs)])
            np.testing.assert_allclose(norm, node.magnitude, rtol=1e-4, atol=1e-5, err_msg=path)

    # strict forward == merged forward == the reference (jitted; op by op too with eager).
    expected = run_plain(jax.jit(lambda m: ref_params(m, axes))(moved), *args)
    assert_trees_close(
        run_plain(jax.jit(dora_jax.merge)(moved), *args), expected, rtol=1e-4, atol=1e-5
    )
    assert_trees_close(run(moved, *args), expected, rtol=1e-4, atol=1e-5)
    if eager:
        assert_trees_close(as_array(strict(moved, *args)), expected, rtol=1e-4, atol=1e-5)

    # Gradients of the trainable leaves equal the reference's.
    frozen, trainable = dora_jax.partition(moved)
    weights = jax.random.normal(jax.random.key(7), expected.shape)

    def grad_of(forward):
        def loss(t, frozen, *a):
            return jnp.sum(weights * jnp.sin(as_array(forward(dora_jax.combine(frozen, t), *a))))

        return jax.jit(jax.grad(loss))(trainable, frozen, *args)

    got = grad_of(strict)
    want = grad_of(lambda p, *a: fn(ref_params(p, axes), *a))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(got))
    assert_trees_close(got, want, rtol=1e-4, atol=1e-5)

    # A few optax steps over the whole adapted tree: the loss falls, the base stays put.
    train_steps(strict, adapted, args, base_out, steps)
    return adapted


def train_steps(forward, adapted, args, base_out, steps):
    target = base_out + 0.5 * jax.random.normal(jax.random.key(3), base_out.shape)
    tx = dora_jax.only_trainable(optax.adamw(1e-2, weight_decay=0.1))

    def loss(p, *args):
        return jnp.mean((as_array(forward(p, *args)) - target) ** 2)

    @jax.jit
    def step(p, state, *args):
        value, g = jax.value_and_grad(loss)(p, *args)
        updates, state = tx.update(g, state, p)
        return optax.apply_updates(p, updates), state, value

    p, state, losses = adapted, tx.init(adapted), []
    for _ in range(steps + 1):
        p, state, value = step(p, state, *args)
        losses.append(float(value))
    assert losses[-1] < losses[0], losses
    is_trainable = jax.tree.leaves(dora_jax.trainable_mask(adapted))
    old, new = jax.tree.leaves(adapted), jax.tree.leaves(p)
    changed = [not np.array_equal(a, b) for a, b in zip(old, new)]
    assert not any(c for c, t in zip(changed, is_trainable) if not t), "a frozen leaf changed"
    assert any(c for c, t in zip(changed, is_trainable) if t), "nothing trained"
    return p


# --- Gemma-style projections (google-deepmind/gemma's einsum layouts) -----------------------


class Einsum(nn.Module):
    """A parameterised einsum, as gemma's ``_layers.Einsum``: the weight is called ``w``."""

    shape: tuple[int, ...]
    weight_name: str = "w"

    @nn.compact
    def __call__(self, eqn, x):
        w = self.param(self.weight_name, nn.initializers.normal(0.3), self.shape)
        return jnp.einsum(eqn, x, w)


class GemmaAttention(nn.Module):
    num_heads: int = 4
    num_kv_heads: int = 2
    features: int = 16
    head_dim: int = 8

    @nn.compact
    def __call__(self, x):
        n, k, d, h = self.num_heads, self.num_kv_heads, self.features, self.head_dim
        q = Einsum((n, d, h), name="q_einsum")("BTD,NDH->BTNH", x)
        key, value = Einsum((2, k, d, h), name="kv_einsum")("BSD,CKDH->CBSKH", x)
        b, t = q.shape[:2]
        q = q.reshape(b, t, k, n // k, h) * h**-0.5
        logits = jnp.einsum("BTKGH,BSKH->BTKGS", q, key)
        causal = jnp.tril(jnp.ones((t, t), bool))[None, :, None, None, :]
        probs = jax.nn.softmax(jnp.where(causal, logits, -1e30), axis=-1)
        encoded = jnp.einsum("BTKGS,BSKH->BTKGH", probs, value).reshape(b, t, n, h)
        return Einsum((n, h, d), name="attn_vec_einsum")("BTNH,NHD->BTD", encoded)


class GemmaFeedForward(nn.Module):
    features: int = 16
    hidden_dim: int = 24

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(0.3)
        gating = self.param("gating_einsum", init, (2, self.hidden_dim, self.features))
        gate = jnp.einsum("...F,NHF->...NH", x, gating)
        activations = nn.gelu(gate[..., 0, :]) * gate[..., 1, :]
        linear = self.param("linear", init, (self.hidden_dim, self.features))
        return jnp.einsum("...H,HF->...F", activations, linear)


class GemmaBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x + GemmaAttention(name="attn")(nn.RMSNorm(name="pre_attention_norm")(x))
        return x + GemmaFeedForward(name="mlp")(nn.RMSNorm(name="pre_ffw_norm")(x))


GEMMA_TARGETS = r"(_einsum/w|gating_einsum|linear)$"
# Input axes as gemma's einsum strings say, by hand: q (N, D, H), kv (2, K, D, H),
# attn_vec (N, H, D), gating (2, H, F), linear (H, F).
GEMMA_INPUTS = {
    "q_einsum": (1,),
    "kv_einsum": (2,),
    "attn_vec_einsum": (0, 1),
    "gating_einsum": (2,),
    "linear": (0,),
}
GEMMA_EINSUMS = {
    "attn/q_einsum/w": "BTD,NDH->BTNH",
    "attn/kv_einsum/w": "BSD,CKDH->CBSKH",
    "attn/attn_vec_einsum/w": "BTNH,NHD->BTD",
    "mlp/gating_einsum": "...F,NHF->...NH",
    "mlp/linear": "...H,HF->...F",
}


def gemma_axes(layout: str, fn, params, x):
    A = dora_jax.Axes
    if layout == "infer_axes":
        return dora_jax.infer_axes(fn, params, x)
    if layout == "from_einsum":
        return {p: A.from_einsum(eq, operand=1) for p, eq in GEMMA_EINSUMS.items()}
    # The fused kv and gating kernels: one adapter over both halves (the leading 2-axis is
    # an output axis) or one per half (a stack axis).
    fused = () if layout == "one_adapter_per_fused_kernel" else (0,)
    return {
        "attn/q_einsum/w": A(stack=(), inputs=(1,)),
        "attn/kv_einsum/w": A(stack=fused, inputs=(2,)),
        "attn/attn_vec_einsum/w": A(stack=(), inputs=(0, 1)),
        "mlp/gating_einsum": A(stack=fused, inputs=(2,)),
        "mlp/linear": A(stack=(), inputs=(0,)),
    }


def _gemma():
    model = GemmaBlock()
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    params = model.init(jax.random.key(0), x)["params"]
    return (lambda p, x: model.apply({"params": p}, x)), params, x


def test_gemma_axes_from_the_program_the_einsums_and_by_hand_agree():
    fn, params, x = _gemma()
    inferred = gemma_axes("infer_axes", fn, params, x)
    assert {p: inferred[p] for p in GEMMA_EINSUMS} == gemma_axes("from_einsum", fn, params, x)
    assert gemma_axes("from_einsum", fn, params, x) == gemma_axes(
        "one_adapter_per_fused_kernel", fn, params, x
    )
    for name, einsum_inputs in GEMMA_INPUTS.items():
        (path,) = [p for p in GEMMA_EINSUMS if name in p]
        assert positions(inferred[path], kernels(params)[path].ndim)[1] == einsum_inputs


@pytest.mark.parametrize(
    "layout, method",
    [("infer_axes", "dora"), ("one_adapter_per_half", "dora"), ("infer_axes", "lora")],
)
def test_gemma_projections(layout, method):
    fn, params, x = _gemma()
    axes = gemma_axes(layout, fn, params, x)
    check_model(
        fn, params, (x,), targets=GEMMA_TARGETS, axes=axes, inputs=GEMMA_INPUTS, method=method
    )


def test_gemma_fused_kernel_adapter_shapes():
    """One adapter over both halves: A (D, r); one per half: A (2, D, r). B, m alike."""
    model = GemmaBlock()
    x = jnp.ones((1, 3, 16))
    params = model.init(jax.random.key(0), x)["params"]
    fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    shapes = {}
    for layout in ("one_adapter_per_fused_kernel", "one_adapter_per_half"):
        axes = gemma_axes(layout, fn, params, x)
        node = dora_jax.wrap(params, rank=2, targets=GEMMA_TARGETS, axes=axes)["attn"]["kv_einsum"][
            "w"
        ]
        shapes[layout] = (node.a.shape, node.b.shape, node.magnitude.shape)
    assert shapes["one_adapter_per_fused_kernel"] == ((16, 2), (2, 2, 2, 8), (2, 2, 8))
    assert shapes["one_adapter_per_half"] == ((2, 16, 2), (2, 2, 2, 8), (2, 2, 8))


# --- Equinox: weights (out, in) -------------------------------------------------------------


def _equinox_mlp():
    require_package("equinox", "pip install equinox (in the 'test' extra)")
    import equinox as eqx

    mlp = eqx.nn.MLP(
        in_size=6, out_size=3, width_size=16, depth=2, activation=jnp.tanh, key=jax.random.key(0)
    )
    params, static = eqx.partition(mlp, eqx.is_inexact_array)
    fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)  # noqa: E731
    return fn, params, jax.random.normal(jax.random.key(1), (4, 6))


def test_equinox_mlp():
    fn, params, x = _equinox_mlp()
    axes = dora_jax.infer_axes(fn, params, x)
    weights = {p: a for p, a in axes.items() if p.endswith("weight")}
    assert len(weights) == 3
    assert all(a == dora_jax.Axes(stack=(), inputs=(1,)) for a in weights.values()), axes
    check_model(
        fn, params, (x,), targets=r"weight$", axes=axes, inputs={"weight": (1,)}, eager=True
    )


def test_equinox_conv_and_attention():
    """Equinox's Conv1d (weight ``(out, in, width)``) and MultiheadAttention (its four
    ``(out, in)`` projections) in one module, run per example under ``vmap``."""
    require_package("equinox", "pip install equinox (in the 'test' extra)")
    import equinox as eqx

    class Net(eqx.Module):
        conv: eqx.nn.Conv1d
        attn: eqx.nn.MultiheadAttention
        head: eqx.nn.Linear

        def __init__(self, key):
            k = jax.random.split(key, 3)
            self.conv = eqx.nn.Conv1d(3, 8, 3, padding=1, key=k[0])
            self.attn = eqx.nn.MultiheadAttention(2, 8, key=k[1])
            self.head = eqx.nn.Linear(8, 5, key=k[2])

        def __call__(self, x):  # (channels, length)
            h = self.conv(x).T
            return jax.vmap(self.head)(h + self.attn(h, h, h))

    params, static = eqx.partition(Net(jax.random.key(0)), eqx.is_inexact_array)
    fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)  # noqa: E731
    x = jax.random.normal(jax.random.key(1), (2, 3, 6))
    axes = dora_jax.infer_axes(fn, params, x)
    assert axes["conv/weight"] == dora_jax.Axes(stack=(), inputs=(1, 2)), axes
    assert len(axes) == 6, axes
    inputs = {"conv/weight": (1, 2), "(proj|head)/weight": (1,)}
    check_model(fn, params, (x,), targets=r"weight$", axes=axes, inputs=inputs)


def test_equinox_module_whole_infer_axes_train_and_checkpoint(tmp_path):
    """The module itself, not eqx.partition's arrays, through infer_axes, training and a
    checkpoint: its activation function is a leaf that is no value and is left as it is."""
    require_package("equinox", "pip install equinox (in the 'test' extra)")
    import equinox as eqx

    def make():
        return eqx.nn.MLP(6, 3, 8, 1, activation=jnp.tanh, key=jax.random.key(0))

    fn = lambda m, x: jax.vmap(m)(x)  # noqa: E731
    x, y = (
        jax.random.normal(jax.random.key(1), (4, 6)),
        jax.random.normal(jax.random.key(2), (4, 3)),
    )
    axes = dora_jax.infer_axes(fn, make(), x)
    assert {p: a for p, a in axes.items() if p.endswith("weight")} == {
        f"layers/{i}/weight": dora_jax.Axes((), (1,)) for i in (0, 1)
    }, axes
    adapted = dora_jax.wrap(make(), rank=2, targets=r"weight$", axes=axes)
    frozen, trainable = dora_jax.partition(adapted)
    tx = optax.adam(1e-2)
    forward = dora_jax.apply(fn, strict=True)

    @eqx.filter_jit
    def step(t, opt_state):
        loss = lambda t: jnp.mean((forward(dora_jax.combine(frozen, t), x) - y) ** 2)  # noqa: E731
        g = eqx.filter_grad(loss)(t)
        u, opt_state = tx.update(g, opt_state, t)
        return eqx.apply_updates(t, u), opt_state

    opt_state = tx.init(eqx.filter(trainable, eqx.is_inexact_array))
    trainable, opt_state = step(trainable, opt_state)
    manager = dora_jax.checkpoint.manager(tmp_path, async_save=False)
    assert dora_jax.checkpoint.save(manager, 1, dora_jax.combine(frozen, trainable), opt_state)
    fresh = dora_jax.wrap(make(), rank=2, targets=r"weight$", axes=axes)
    restored = dora_jax.checkpoint.restore(
        manager, fresh, tx.init(eqx.filter(dora_jax.partition(fresh)[1], eqx.is_inexact_array))
    )
    assert restored.adapted.activation is jnp.tanh
    chex.assert_trees_all_equal(
        eqx.filter(dora_jax.partition(restored.adapted)[1], eqx.is_inexact_array),
        eqx.filter(trainable, eqx.is_inexact_array),
    )
    chex.assert_trees_all_equal(restored.opt_state, opt_state)


def test_equinox_without_axes_is_an_error():
    """Wrapped as Flax's (in, out) but used as (out, in): an error naming the kernel, never
    a DoRA with the magnitude on the input side (layers/1/weight is square: the shape alone
    cannot tell)."""
    fn, params, x = _equinox_mlp()
    adapted = dora_jax.wrap(params, rank=2, targets=r"layers/1/weight$")
    with pytest.raises(ValueError, match="layers/1/weight"):
        dora_jax.apply(fn)(adapted, x)


# --- penzai ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layer_stack", [False, True])
def test_penzai_llamalike(layer_stack):
    require_package("penzai", "pip install penzai (in the 'test' extra)")
    from penzai import pz
    from penzai.models.transformer.variants import llamalike_common as ll

    config = ll.LlamalikeTransformerConfig(
        num_kv_heads=2,
        query_head_multiplier=2,
        embedding_dim=16,
        projection_dim=8,
        mlp_hidden_dim=24,
        num_decoder_blocks=2 if layer_stack else 1,
        vocab_size=32,
        mlp_variant="swiglu",
        tie_embedder_and_logits=False,
        use_layer_stack=layer_stack,
    )
    build = lambda key: pz.freeze_params(ll.build_llamalike_transformer(config, key))  # noqa: E731
    model = jax.jit(build)(jax.random.key(0))  # initialised in one program, not op by op
    tokens = pz.nx.wrap(jnp.arange(12).reshape(2, 6) % 32).tag("batch", "seq")

    def fn(model, tokens):
        out = model(tokens, token_positions=pz.nx.arange("seq", 6))
        return out.unwrap("batch", "seq", "vocabulary")

    targets = r"(input_to_query|input_to_value|attn_value_to_output|branches/\d).*data_array$"
    axes = dora_jax.infer_axes(fn, model, tokens)
    stack = (0,) if layer_stack else ()
    shift = len(stack)
    inputs = {
        "input_to_(query|value)": (shift,),  # (embedding, [kv heads, q heads,] projection)
        "attn_value_to_output": (shift, shift + 1, shift + 2)[: 2 + (config.num_kv_heads > 1)],
        "branches": (shift,),
    }
    kernels_ = kernels(model)
    for path, ax in axes.items():
        if re.search(targets, path):
            s, _, _ = positions(ax, kernels_[path].ndim)
            assert s == stack, (path, ax)
    check_model(fn, model, (tokens,), targets=targets, axes=axes, inputs=inputs, eager=False)


# --- Haiku and Keras 3 -----------------------------------------------------------------------


@pytest.mark.parametrize("layer_stack", [False, True])
def test_haiku_transformer(layer_stack):
    """Haiku's Conv1D, MultiHeadAttention and Linear (weights named ``w``, ``(in, out)`` and
    ``(width, in, out)``), its blocks as a Python loop or as ``hk.layer_stack`` (a
    ``lax.scan`` over weights stacked on a leading axis)."""
    require_package("haiku", "pip install dm-haiku (in the 'test' extra)")
    import haiku as hk

    width, layers = 8, 2

    def block(h):
        init = hk.initializers.VarianceScaling(1.0)
        h = h + hk.MultiHeadAttention(num_heads=2, key_size=4, w_init=init)(h, h, h)
        u = hk.Linear(2 * width)(hk.LayerNorm(-1, True, True)(h))
        return h + hk.Linear(width)(jax.nn.gelu(u))

    def forward(x):
        h = hk.Conv1D(width, 3)(x)
        if layer_stack:
            return hk.Linear(5)(hk.layer_stack(layers)(block)(h))
        for _ in range(layers):
            h = block(h)
        return hk.Linear(5)(h)

    model = hk.without_apply_rng(hk.transform(forward))
    x = jax.random.normal(jax.random.key(1), (2, 6, 3))
    params = model.init(jax.random.key(0), x)
    axes = dora_jax.infer_axes(model.apply, params, x)
    weights = [p for p in kernels(params) if p.endswith("/w")]
    assert sorted(axes) == sorted(weights)
    stack = (0,) if layer_stack else ()
    for path, ax in axes.items():
        in_stack = "layer_stack" in path
        assert positions(ax, kernels(params)[path].ndim)[0] == (stack if in_stack else ()), path
    inputs = {"conv1_d": (0, 1), "layer_stack": (1,), "w$": (0,)}
    check_model(model.apply, params, (x,), targets=r"/w$", axes=axes, inputs=inputs)


def test_keras_functional_model():
    """A Keras 3 model on the JAX backend through ``stateless_call``, its trainable variables
    as a dict by path: Conv1D, MultiHeadAttention (EinsumDense kernels ``(in, heads, dim)``
    and ``(heads, dim, out)``), Dense. The default targets (leaves named ``kernel``) find
    every kernel and nothing else."""
    require_package("keras", "pip install keras (in the 'test' extra)")
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    if keras.backend.backend() != "jax":
        pytest.fail(f"keras was imported with the {keras.backend.backend()} backend first")
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 3))
    h = keras.layers.Conv1D(8, 3, padding="same")(inp)
    h = keras.layers.LayerNormalization()(h + keras.layers.MultiHeadAttention(2, 4)(h, h))
    h = h + keras.layers.Dense(8)(keras.activations.gelu(keras.layers.Dense(16)(h)))
    model = keras.Model(inp, keras.layers.Dense(5)(h))
    names = [v.path for v in model.trainable_variables]
    params = {v.path: v.value for v in model.trainable_variables}
    fixed = [v.value for v in model.non_trainable_variables]

    def fn(params, x):
        return model.stateless_call([params[n] for n in names], fixed, x)[0]

    x = jax.random.normal(jax.random.key(1), (2, 6, 3))
    axes = dora_jax.infer_axes(fn, params, x)
    assert sorted(axes) == sorted(p for p in params if p.endswith("/kernel"))
    assert sorted(nodes(dora_jax.wrap(params, rank=2, axes=axes))) == sorted(axes)
    inputs = {"conv1d": (0, 1), "attention_output": (0, 1), "(query|key|value|dense)": (0,)}
    check_model(fn, params, (x,), targets=r"kernel$", axes=axes, inputs=inputs)


def test_keras_conv_transpose():
    """Keras's Conv2DTranspose keeps its kernel as ``(kh, kw, out, in)`` and flips the
    window before the convolution (``rev``): read by infer_axes and factored."""
    require_package("keras", "pip install keras (in the 'test' extra)")
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    if keras.backend.backend() != "jax":
        pytest.fail(f"keras was imported with the {keras.backend.backend()} backend first")
    keras.utils.set_random_seed(0)
    inp = keras.Input((5, 5, 3))
    model = keras.Model(inp, keras.layers.Conv2DTranspose(4, 3, strides=2, padding="same")(inp))
    names = [v.path for v in model.trainable_variables]
    params = {v.path: v.value for v in model.trainable_variables}

    def fn(params, x):
        return model.stateless_call([params[n] for n in names], [], x)[0]

    x = jax.random.normal(jax.random.key(1), (2, 5, 5, 3))
    axes = dora_jax.infer_axes(fn, params, x)
    assert list(axes.values()) == [dora_jax.Axes((), (0, 1, 3))] and not axes.unread
    check_model(fn, params, (x,), targets=r"kernel$", axes=axes, inputs={"kernel": (0, 1, 3)})


# --- Flax's own attention ----------------------------------------------------------------


class _LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, name="attn")(h, h)
        return x + nn.Dense(8)(nn.gelu(nn.Dense(16)(nn.LayerNorm()(x))))


class _NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(
            num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=rngs
        )
        self.fc = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x):
        return self.fc(x + self.attn(x))


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_flax_multi_head_attention(api):
    """Linen's MultiHeadDotProductAttention and NNX's MultiHeadAttention: q, k, v kernels
    ``(in, heads, head_dim)``, the output kernel ``(heads, head_dim, out)``. ``wrap``'s
    default cannot tell a 3-D kernel's axes and says so; ``infer_axes`` reads them."""
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    if api == "linen":
        block = _LinenBlock()
        params = block.init(jax.random.key(0), x)["params"]
        fn = lambda p, x: block.apply({"params": p}, x)  # noqa: E731
        others = {"Dense": (0,)}
    else:
        graphdef, params = nnx.split(_NnxBlock(nnx.Rngs(0)))
        fn = lambda p, x: nnx.merge(graphdef, p)(x)  # noqa: E731
        others = {"fc": (0,)}
    with pytest.raises(ValueError, match=r"Cannot tell the input axes of kernel 'attn/"):
        dora_jax.wrap(params, rank=2)
    axes = dora_jax.infer_axes(fn, params, x)
    assert axes["attn/out/kernel"] == dora_jax.Axes(stack=(), inputs=(0, 1)), axes
    assert all(axes[f"attn/{p}/kernel"].inputs == (0,) for p in ("query", "key", "value"))
    inputs = {"attn/(query|key|value)": (0,), "attn/out": (0, 1), **others}
    check_model(fn, params, (x,), targets=r"kernel", axes=axes, inputs=inputs)


# --- an NNX model, wrapped whole: its layers say their axes ---------------------------------


class _NnxLayer(nnx.Module):
    """Multi-head attention, a conv, a heads-first Einsum and a Linear: every layout of
    Flax's NNX layers."""

    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(
            num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=rngs
        )
        self.conv = nnx.Conv(8, 8, kernel_size=(3,), rngs=rngs)
        self.heads = nnx.Einsum("btd,ndh->btnh", (2, 8, 4), rngs=rngs)
        self.fc = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x):
        h = self.conv(x + self.attn(x))
        return x + jnp.tanh(self.fc(h) + self.heads(h).reshape(h.shape))


class _NnxStack(nnx.Module):
    """Three :class:`_NnxLayer` made with ``nnx.vmap`` and run with ``nnx.scan``."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=0, out_axes=0)
        def make(rngs):
            return _NnxLayer(rngs)

        self.layers = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def body(layer, x):
            return layer(x)

        return body(self.layers, x)


@pytest.mark.parametrize("stacked", [False, True], ids=["layers", "scanned"])
def test_nnx_model_wrapped_whole_reads_its_layers(stacked):
    """``wrap(model)`` on an NNX module: multi-head attention, conv and Einsum kernels need
    no ``axes=`` (``wrap(state)`` refuses them); the axes equal those ``infer_axes`` reads
    from the traced program and the true ones written here; ``nnx.vmap``-stacked layers get
    one adapter per layer; the model itself is left as it is."""
    model = (_NnxStack if stacked else _NnxLayer)(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    graphdef, state = nnx.split(model)
    fn = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    floats = lambda m: [np.asarray(v) for v in jax.tree.leaves(nnx.state(m, nnx.Param))]  # noqa: E731
    before = floats(model)
    with pytest.raises(ValueError, match=r"pass the module itself, wrap\(model"):
        dora_jax.wrap(state, rank=2)

    adapted = dora_jax.wrap(model, rank=2)
    assert type(adapted) is type(model) and adapted is not model
    for old, now in zip(before, floats(model), strict=True):
        np.testing.assert_array_equal(old, now)  # the model is left as it is
    found = nodes(nnx.state(adapted))
    learned = {p: dora_jax.Axes(n.stack, n.inputs) for p, n in found.items()}
    inferred = dora_jax.infer_axes(fn, state, x)
    prefix = "layers/" if stacked else ""
    lead = 1 if stacked else 0
    true_inputs = {"attn/(query|key|value)": (0,), "attn/out": (0, 1), "conv": (0, 1),
                   "heads": (1,), "fc": (0,)}  # fmt: skip
    assert sorted(learned) == sorted(f"{prefix}{n}/kernel" for n in
                                     ("attn/query", "attn/key", "attn/value", "attn/out",
                                      "conv", "heads", "fc"))  # fmt: skip
    for path, ax in learned.items():
        ndim = found[path].base.ndim
        assert positions(ax, ndim) == positions(inferred[path], ndim), path
        want = next(v for k, v in true_inputs.items() if re.search(k, path))
        assert positions(ax, ndim)[:2] == (tuple(range(lead)), tuple(d + lead for d in want))

    # The same adapter wrap(state) makes with those axes, leaf for leaf.
    by_hand = dora_jax.wrap(state, rank=2, axes=learned)
    assert_trees_close(jax.tree.leaves(nnx.state(adapted)), jax.tree.leaves(by_hand))
    inputs = {k: tuple(d + lead for d in v) for k, v in true_inputs.items()}
    check_model(fn, state, (x,), targets=r"kernel$", axes=learned, inputs=inputs)

    # The adapted module runs as it is, and merges back to a plain module.
    moved = nnx.merge(graphdef, perturb(nnx.state(adapted)))
    run = jax.jit(dora_jax.apply(lambda m, x: m(x), strict=True))
    assert_trees_close(run(moved, x), fn(ref_params(nnx.state(moved), learned), x),
                       rtol=1e-4, atol=1e-5)  # fmt: skip
    assert_trees_close(dora_jax.merge(moved)(x), run(moved, x), rtol=1e-4, atol=1e-5)

    # axes= still wins over what the layers say.
    per_head = dora_jax.Axes(tuple(range(lead + 1)), (lead + 1,))  # one adapter per head
    given = dora_jax.wrap(model, rank=2, axes={"heads/kernel$": per_head})
    node = nodes(nnx.state(given))[f"{prefix}heads/kernel"]
    assert (node.stack, node.inputs) == per_head.split(node.base.ndim)[:2]


# --- convolutions -----------------------------------------------------------------------------


class ConvNet(nn.Module):
    dims: int = 2

    @nn.compact
    def __call__(self, x):
        k = (3,) * self.dims
        x = nn.relu(nn.Conv(6, k, strides=2, padding="SAME", name="conv1")(x))
        x = nn.relu(nn.Conv(5, k, kernel_dilation=2, padding="VALID", name="conv2")(x))
        x = nn.Conv(4, (1,) * self.dims, name="pointwise")(x)
        return nn.Dense(3, name="head")(x.mean(axis=tuple(range(1, 1 + self.dims))))


@pytest.mark.parametrize("dims", [1, 2])
def test_linen_conv(dims):
    model = ConvNet(dims)
    x = jax.random.normal(jax.random.key(1), (2, *(9,) * dims, 3))
    params = model.init(jax.random.key(0), x)["params"]
    fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    axes = dora_jax.infer_axes(fn, params, x)
    conv_inputs = tuple(range(dims + 1))  # (spatial..., in)
    for name in ("conv1", "conv2", "pointwise"):
        assert positions(axes[f"{name}/kernel"], dims + 2)[1] == conv_inputs, axes
    inputs = {"conv|pointwise": conv_inputs, "head": (0,)}
    check_model(fn, params, (x,), targets=r"kernel$", axes=axes, inputs=inputs)


def test_linen_conv_lora_shapes_and_explicit_axes():
    """LoRA for conv as PEFT: A is a conv with r output channels, B a 1x1 conv."""
    model = ConvNet(2)
    x = jax.random.normal(jax.random.key(1), (2, 9, 9, 3))
    params = model.init(jax.random.key(0), x)["params"]
    fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    axes = {r"conv|pointwise": dora_jax.Axes(stack=(), inputs=(0, 1, 2))}
    adapted = check_model(
        fn,
        params,
        (x,),
        targets=r"kernel$",
        axes=axes,
        inputs={"conv|pointwise": (0, 1, 2), "head": (0,)},
        method="lora",
    )
    node = adapted["conv2"]["kernel"]
    assert (node.a.shape, node.b.shape) == ((3, 3, 6, 2), (2, 5))


class NNXConvNet(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 6, kernel_size=(3, 3), strides=2, rngs=rngs)
        self.conv2 = nnx.Conv(6, 5, kernel_size=(3, 3), padding="VALID", rngs=rngs)
        self.head = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
        return self.head(x.mean(axis=(1, 2)))


def test_nnx_conv():
    graphdef, state = nnx.split(NNXConvNet(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (2, 9, 9, 3))
    fn = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    axes = dora_jax.infer_axes(fn, state, x)
    inputs = {"conv": (0, 1, 2), "head": (0,)}
    check_model(fn, state, (x,), targets=r"kernel$", axes=axes, inputs=inputs)


# --- embeddings tied to the output layer ----------------------------------------------------


class TiedLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(32, 16, name="embed")
        h = jnp.tanh(nn.Dense(16, name="mix")(embed(tokens)))
        return embed.attend(h)


def test_embed_with_tied_attend():
    """The lookup is a gather and ``attend`` a transposed contraction; the magnitude is one
    value per feature, the norm over the vocabulary (as PEFT's embedding DoRA)."""
    model = TiedLM()
    tokens = jnp.array([[1, 5, 7, 31], [0, 2, 2, 9]])
    params = model.init(jax.random.key(0), tokens)["params"]
    fn = lambda p, t: model.apply({"params": p}, t)  # noqa: E731
    inferred = dora_jax.infer_axes(fn, params, tokens)
    assert inferred["embed/embedding"] == dora_jax.Axes(0, 1), inferred  # the 2-D default
    adapted = check_model(
        fn,
        params,
        (tokens,),
        targets=r"(embedding|kernel)$",
        axes=None,
        inputs={"embedding": (0,), "kernel": (0,)},
        eager=True,
    )
    assert adapted["embed"]["embedding"].magnitude.shape == (16,)


# --- an nn.vmap ensemble over a shared input ------------------------------------------------


class Ensemble(nn.Module):
    members: int = 3

    @nn.compact
    def __call__(self, x):
        dense = nn.vmap(
            nn.Dense,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=None,
            out_axes=0,
            axis_size=self.members,
        )
        h = jnp.tanh(dense(16, name="members")(x))  # (members, batch, 16): x is shared
        return nn.Dense(2, name="head")(h).mean(axis=0)


@pytest.mark.parametrize("how", ["infer_axes", "explicit"])
def test_nn_vmap_ensemble(how):
    model = Ensemble()
    x = jax.random.normal(jax.random.key(1), (4, 6))
    params = model.init(jax.random.key(0), x)["params"]
    fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    if how == "infer_axes":
        # Traced, the member axis is a free (output) axis: one adapter for the ensemble.
        axes = dora_jax.infer_axes(fn, params, x)
        assert positions(axes["members/kernel"], 3)[1] == (1,), axes
    else:
        axes = {"members/kernel": dora_jax.Axes(1, 1)}  # one adapter per member
    adapted = check_model(
        fn, params, (x,), targets=r"kernel$", axes=axes, inputs={"members": (1,), "head": (0,)}
    )
    node = adapted["members"]["kernel"]
    assert node.magnitude.shape == (3, 16)
    assert node.a.shape == ((6, 2) if how == "infer_axes" else (3, 6, 2))


# --- NNX, the NNX way -------------------------------------------------------------------------


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(6, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jnp.tanh(self.fc1(x)))


def test_nnx_remat_inside_nnx_scan_stays_factored():
    """Flax's pattern for rematerialised stacked layers: ``nnx.scan`` over an ``nnx.remat``
    body, which returns the layer's variables, kernel included: the scan hands back the
    stacked adapter itself, not a W' formed per layer."""

    class Layer(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(8, 8, rngs=rngs)

        def __call__(self, x):
            return x + jnp.tanh(self.fc(x))

    class Stack(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=3)
            @nnx.vmap(in_axes=0, out_axes=0)
            def make(rngs):
                return Layer(rngs)

            self.layers = make(rngs)

        def __call__(self, x):
            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
            @nnx.remat
            def body(layer, x):
                return layer(x)

            return body(self.layers, x)

    x = jax.random.normal(jax.random.key(1), (4, 8))
    model = dora_jax.wrap(Stack(nnx.Rngs(0)), rank=2)
    graph, state = nnx.split(model)
    state = perturb(state)
    forward = dora_jax.apply(lambda s, x: nnx.merge(graph, s)(x), strict=True)

    def reference(s, x):
        return nnx.merge(graph, ref_params(s, {"layers/fc/kernel": dora_jax.Axes((0,), (1,))}))(x)

    loss = lambda f: lambda s: jnp.sum(jnp.sin(f(s, x)))  # noqa: E731
    value, grads = jax.value_and_grad(loss(forward))(state)
    want, want_grads = jax.value_and_grad(loss(reference))(state)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    got, ref = (
        grads["layers"]["fc"]["kernel"].get_value(),
        want_grads["layers"]["fc"]["kernel"].get_value(),
    )
    for name in ("a", "b", "magnitude"):
        np.testing.assert_allclose(getattr(got, name), getattr(ref, name), rtol=1e-4, atol=1e-6)


def test_nnx_mlp():
    graphdef, state = nnx.split(NNXMLP(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (4, 6))
    fn = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    check_model(fn, state, (x,), targets=r"kernel$", axes=None, inputs={"kernel": (0,)}, eager=True)


def test_nnx_returned_state_keeps_the_adapters():
    """``return y, nnx.state(model)`` gives the adapter nodes back, not merged kernels."""
    graphdef, state = nnx.split(NNXMLP(nnx.Rngs(0)))
    adapted = perturb(dora_jax.wrap(state, rank=2))
    x = jax.random.normal(jax.random.key(1), (4, 6))

    def forward(state, x):
        model = nnx.merge(graphdef, state)
        return model(x), nnx.state(model)

    def forward_module(model, x):
        return model(x), nnx.state(model)

    expected = nnx.merge(graphdef, dora_jax.merge(adapted))(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", dora_jax.FallbackWarning)
        for f, arg in [
            (forward, adapted),
            (forward_module, nnx.merge(graphdef, adapted)),
        ]:
            for g in (dora_jax.apply(f, strict=True), jax.jit(dora_jax.apply(f, strict=True))):
                y, returned = g(arg, x)
                assert_trees_close(y, expected, rtol=1e-5, atol=1e-5)
                got, want = nodes(returned), nodes(adapted)
                assert set(got) == {"fc1/kernel", "fc2/kernel"} == set(want)
                for path in got:
                    assert type(got[path]) is dora_jax.DoRA
                    jax.tree.map(np.testing.assert_array_equal, got[path], want[path])
    # The returned state merges back into a model that computes the same function.
    _, returned = dora_jax.apply(forward)(adapted, x)
    assert_trees_close(
        nnx.merge(graphdef, dora_jax.merge(returned))(x), expected, rtol=1e-5, atol=1e-5
    )


def _nnx_optimizer_run(module, x, y, steps=4):
    """The README's NNX loop: an nnx.Optimizer over an adapted model, under nnx.jit."""
    graphdef, state = nnx.split(module)
    axes = dora_jax.infer_axes(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    model = nnx.merge(graphdef, dora_jax.wrap(state, rank=2, axes=axes))
    optimizer = nnx.Optimizer(
        model, dora_jax.only_trainable(optax.adamw(1e-2, weight_decay=0.1)), wrt=nnx.Param
    )
    forward = dora_jax.apply(lambda model, x: model(x), strict=True)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return jnp.mean((forward(model, x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    before = jax.tree.map(np.asarray, nnx.state(model))
    losses = [float(train_step(model, optimizer, x, y)) for _ in range(steps)]
    return before, model, losses


def _functional_run(module, x, y, steps=4):
    """The same training as a plain optax loop over partition's trainable half."""
    graphdef, state = nnx.split(module)
    axes = dora_jax.infer_axes(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    frozen, trainable = dora_jax.partition(dora_jax.wrap(state, rank=2, axes=axes))
    tx = optax.adamw(1e-2, weight_decay=0.1)
    opt = tx.init(trainable)
    fn = dora_jax.apply(lambda s, x: nnx.merge(graphdef, s)(x))

    @jax.jit
    def step(trainable, opt):
        g = jax.grad(lambda t: jnp.mean((fn(dora_jax.combine(frozen, t), x) - y) ** 2))(trainable)
        updates, opt = tx.update(g, opt, trainable)
        return optax.apply_updates(trainable, updates), opt

    for _ in range(steps):
        trainable, opt = step(trainable, opt)
    return dora_jax.combine(frozen, trainable)


@pytest.mark.parametrize("module_cls", [NNXMLP, NNXConvNet])
def test_nnx_optimizer_trains_an_adapted_model(module_cls):
    x_shape = (4, 6) if module_cls is NNXMLP else (2, 9, 9, 3)
    x = jax.random.normal(jax.random.key(1), x_shape)
    y = jax.random.normal(jax.random.key(2), (x_shape[0], 3))
    before, model, losses = _nnx_optimizer_run(module_cls(nnx.Rngs(0)), x, y)
    assert losses[-1] < losses[0], losses
    after = nnx.state(model)
    trained = nodes(after)
    assert trained and all(type(n) is dora_jax.DoRA for n in trained.values())
    for path, node in trained.items():
        old = nodes(before)[path]
        np.testing.assert_array_equal(node.base, old.base)  # bit-identical base
        assert not np.array_equal(node.b, old.b)
        assert not np.array_equal(node.magnitude, old.magnitude)
    # Biases are frozen too (only_trainable), and the result equals the functional loop's.
    flat_before, flat_after = kernels(before), kernels(after)
    for path in flat_before:
        if path.endswith("bias"):
            np.testing.assert_array_equal(flat_before[path], flat_after[path])
    functional = _functional_run(module_cls(nnx.Rngs(0)), x, y)
    assert_trees_close(
        jax.tree.leaves(nnx.as_pure(after)),
        jax.tree.leaves(nnx.as_pure(functional)),
        rtol=1e-4,
        atol=1e-6,
    )


class _NnxTrainNet(nnx.Module):
    """A conv, BatchNorm, dropout, attention and a head: state that a call updates in place."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 8, kernel_size=(3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        h = self.drop(nnx.relu(self.norm(self.conv(x))))
        h = self.attn(h.reshape(h.shape[0], -1, h.shape[-1]))
        return self.head(h.mean(axis=1))


def test_nnx_apply_updates_the_model_as_a_direct_call_does():
    """Through ``apply``, an NNX model's BatchNorm statistics and dropout RNG counters move
    exactly as when the plain model is called directly (eager, under ``nnx.jit`` and under
    ``nnx.value_and_grad``): at init the adapted model is the plain one, so outputs and
    state must agree call for call. Before, they stayed at their initial values (the same
    dropout mask every step, statistics never updated)."""
    x = jax.random.normal(jax.random.key(1), (4, 6, 6, 3))
    plain = _NnxTrainNet(nnx.Rngs(0))
    adapted = dora_jax.wrap(_NnxTrainNet(nnx.Rngs(0)), rank=2)
    forward = dora_jax.apply(lambda model, x: model(x), strict=True)

    def state(model):  # all but the Params, PRNG keys as their data
        as_numpy = lambda v: np.asarray(  # noqa: E731
            jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v
        )
        return jax.tree.map(as_numpy, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))))

    initial = state(plain)

    def agree(y_plain, y_adapted):
        assert_trees_close(y_adapted, y_plain, rtol=1e-5, atol=1e-5)
        assert_trees_close(state(adapted), state(plain), rtol=1e-5, atol=1e-6)

    agree(plain(x), forward(adapted, x))  # eager
    agree(plain(x), forward(adapted, x))  # eager again: the compiled program is reused
    jitted = nnx.jit(lambda m, x: m(x))
    agree(jitted(plain, x), nnx.jit(forward)(adapted, x))

    def loss(call):
        return nnx.jit(nnx.value_and_grad(lambda m, x: jnp.sum(jnp.sin(call(m, x)))))

    (value_plain, _), (value_adapted, _) = (
        loss(lambda m, x: m(x))(plain, x),
        loss(forward)(adapted, x),
    )
    agree(value_plain, value_adapted)
    moved = state(adapted)  # four calls in training mode
    assert not np.allclose(moved["norm"]["mean"], initial["norm"]["mean"])
    assert moved["drop"]["rngs"]["count"] == initial["drop"]["rngs"]["count"] + 4
    adapted.eval()
    plain.eval()
    agree(plain(x), forward(adapted, x))  # evaluation mode: the running statistics, no dropout


def test_nnx_apply_decodes_with_the_attention_cache():
    """Token-by-token decoding through ``apply``: NNX attention's cache fills as it does for
    the plain model (before, it stayed empty and every step attended to nothing before it)."""
    make = lambda: nnx.MultiHeadAttention(  # noqa: E731
        num_heads=2, in_features=8, decode=True, rngs=nnx.Rngs(0)
    )
    plain, adapted = make(), perturb(dora_jax.wrap(make(), rank=2))
    merged = dora_jax.merge(adapted)
    x = jax.random.normal(jax.random.key(1), (1, 5, 8))
    for model in (plain, adapted, merged):
        model.init_cache(x.shape)
    forward = dora_jax.apply(lambda model, x: model(x), strict=True)
    steps = []
    for t in range(x.shape[1]):
        steps.append(forward(adapted, x[:, t : t + 1]))
        assert_trees_close(steps[-1], merged(x[:, t : t + 1]), rtol=1e-5, atol=1e-5)
        assert int(adapted.cache_index[...]) == int(merged.cache_index[...]) == t + 1
    # Decoded step by step = the merged weights over the whole sequence with a causal mask.
    whole = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(0))
    nnx.update(whole, nnx.state(merged, nnx.Param))
    causal = nnx.make_causal_mask(jnp.ones(x.shape[:2]))
    assert_trees_close(jnp.concatenate(steps, axis=1), whole(x, mask=causal), rtol=1e-5, atol=1e-5)
