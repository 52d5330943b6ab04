"""wrap / partition / combine / merge / optax behaviour, the jaxpr check and bad input."""

import dataclasses
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dora_jax
from tests.helpers import MLP, perturb


@pytest.fixture(scope="module")
def setup():
    x = jax.random.normal(jax.random.key(3), (4, 12))
    model = MLP()
    params = model.init(jax.random.key(0), x)["params"]
    return model, params, x


@pytest.mark.parametrize("method", ["dora", "lora", "vera", "dvora"])
def test_identity_at_init(setup, method):
    model, params, x = setup
    adapted = dora_jax.wrap(params, rank=4, method=method)
    node = adapted["fc1"]["kernel"]
    assert np.all(node.b == 0)
    if method in ("vera", "dvora"):
        np.testing.assert_array_equal(node.d, np.full(4, 0.1, np.float32))
        # One pair of shared matrices, sized for the largest kernel (in 16, out 16).
        assert node.shared_a is adapted["fc2"]["kernel"].shared_a
        assert node.shared_a.shape == (16, 4) and node.shared_b.shape == (4, 16)
        assert np.all(np.abs(node.shared_a) <= 1 / np.sqrt(16))
        assert np.all(np.abs(node.shared_b) <= 1 / np.sqrt(4))
    else:
        assert np.any(node.a != 0) and np.all(np.abs(node.a) <= 1 / np.sqrt(12))
    if method in ("dora", "dvora"):
        np.testing.assert_allclose(node.magnitude, np.linalg.norm(params["fc1"]["kernel"], axis=0))
    y = dora_jax.apply(model.apply)({"params": adapted}, x)
    np.testing.assert_allclose(y, model.apply({"params": params}, x), rtol=1e-6, atol=1e-6)
    merged = dora_jax.merge(adapted)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)  # noqa: E731
    jax.tree.map(close, merged, params)


def test_wrap_is_pure_and_keeps_other_leaves(setup):
    _, params, _ = setup
    before = jax.tree.map(np.array, params)
    adapted = dora_jax.wrap(params, rank=2)
    assert adapted["fc1"]["bias"] is params["fc1"]["bias"]
    jax.tree.map(np.testing.assert_array_equal, params, before)
    assert adapted["fc1"]["kernel"].base is params["fc1"]["kernel"]


def test_alpha_and_rslora_scale(setup):
    _, params, _ = setup
    assert dora_jax.wrap(params, rank=4)["fc1"]["kernel"].scale == 2.0
    assert dora_jax.wrap(params, rank=4, alpha=8)["fc1"]["kernel"].scale == 2.0
    assert dora_jax.wrap(params, rank=4, alpha=4, rslora=True)["fc1"]["kernel"].scale == 2.0


def test_targets(setup):
    _, params, _ = setup
    adapted = dora_jax.wrap(params, rank=2, targets=r"fc2/kernel$")
    assert not dora_jax.is_adapter(adapted["fc1"]["kernel"])
    assert dora_jax.is_adapter(adapted["fc2"]["kernel"])
    adapted = dora_jax.wrap(params, rank=2, targets=lambda path, leaf: path.startswith("fc1/k"))
    assert dora_jax.is_adapter(adapted["fc1"]["kernel"])
    assert not dora_jax.is_adapter(adapted["fc2"]["kernel"])


def test_partition_combine_round_trip(setup):
    _, params, _ = setup
    adapted = perturb(dora_jax.wrap(params, rank=2))
    frozen, trainable = dora_jax.partition(adapted)
    assert trainable["fc1"]["bias"] is None and frozen["fc1"]["kernel"].a is None
    assert {x.shape for x in jax.tree.leaves(trainable)} == {(12, 2), (2, 16), (16,), (16, 2),
                                                            (2, 5), (5,)}  # fmt: skip
    back = dora_jax.combine(frozen, trainable)
    assert jax.tree.structure(back) == jax.tree.structure(adapted)
    jax.tree.map(np.testing.assert_array_equal, back, adapted)
    mask = dora_jax.trainable_mask(adapted)
    assert mask["fc1"]["kernel"].a and not mask["fc1"]["kernel"].base and not mask["fc1"]["bias"]


def test_combine_rejects_mismatched_trees(setup):
    _, params, _ = setup
    frozen, trainable = dora_jax.partition(dora_jax.wrap(params, rank=2))
    other = dora_jax.partition(dora_jax.wrap(params, rank=2, targets="fc1"))[1]
    with pytest.raises(ValueError, match="one dora_jax.partition call"):
        dora_jax.combine(frozen, other)
    with pytest.raises(ValueError, match="different structure"):
        dora_jax.combine(frozen, {"fc1": trainable["fc1"]})


@pytest.mark.parametrize("way", ["partition", "only_trainable"])
def test_optax_moves_only_trainable_leaves(setup, way):
    model, params, x = setup
    adapted = dora_jax.wrap(params, rank=4)
    fn = dora_jax.apply(model.apply)
    target = jnp.ones((4, 5))

    def loss(adapted):
        return jnp.mean((fn({"params": adapted}, x) - target) ** 2)

    if way == "partition":
        frozen, trainable = dora_jax.partition(adapted)
        tx = optax.adamw(1e-2)
        state = tx.init(trainable)
        # No optimiser state for frozen leaves: moments only for trainable shapes.
        assert all(leaf is not None for leaf in jax.tree.leaves(state))

        @jax.jit
        def step(trainable, state):
            grads = jax.grad(lambda t: loss(dora_jax.combine(frozen, t)))(trainable)
            updates, state = tx.update(grads, state, trainable)
            return optax.apply_updates(trainable, updates), state

        for _ in range(5):
            trainable, state = step(trainable, state)
        new = dora_jax.combine(frozen, trainable)
    else:
        tx = dora_jax.only_trainable(optax.adamw(1e-2))
        state = tx.init(adapted)
        n_state = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
        n_trainable = sum(x.size for x in jax.tree.leaves(dora_jax.partition(adapted)[1]))
        assert n_state == 2 * n_trainable  # adam's two moments, nothing for the base

        @jax.jit
        def step(adapted, state):
            grads = jax.grad(loss)(adapted)
            updates, state = tx.update(grads, state, adapted)
            return optax.apply_updates(adapted, updates), state

        new = adapted
        for _ in range(5):
            new, state = step(new, state)

    assert loss(new) < loss(adapted)
    mask = dora_jax.trainable_mask(adapted)

    def check(old, new, trainable):
        if trainable:
            assert not np.array_equal(old, new)
        else:
            assert old.dtype == new.dtype and np.array_equal(old, new)  # bit-identical

    jax.tree.map(check, adapted, new, mask)


def _kernel_shaped_outputs(jaxpr, shapes, found):
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            if tuple(v.aval.shape) in shapes and eqn.primitive.name != "stop_gradient":
                found.append(f"{eqn.primitive.name} -> {v.aval.shape}")
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _kernel_shaped_outputs(inner, shapes, found)
    return found


class Wide(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(24, use_bias=False)(jnp.tanh(nn.Dense(40, use_bias=False)(x)))


@pytest.mark.parametrize("method", ["dora", "lora", "vera", "dvora"])
def test_training_step_forms_no_kernel_sized_array(method):
    """Inspect the jaxpr of grad of the loss: nothing of a kernel's shape is computed."""
    x = jax.random.normal(jax.random.key(0), (8, 16))
    model = Wide()
    params = model.init(jax.random.key(0), x)["params"]
    adapted = perturb(dora_jax.wrap(params, rank=4, method=method))
    frozen, trainable = dora_jax.partition(adapted)
    shapes = {(16, 40), (40, 16), (40, 24), (24, 40)}

    def fast(t):
        return jnp.sum(dora_jax.apply(model.apply)({"params": dora_jax.combine(frozen, t)}, x))

    def slow(t):  # W' formed inside the loss: the check must catch it
        return jnp.sum(model.apply({"params": dora_jax.merge(dora_jax.combine(frozen, t))}, x))

    assert _kernel_shaped_outputs(jax.make_jaxpr(jax.grad(fast))(trainable).jaxpr, shapes, []) == []
    assert _kernel_shaped_outputs(jax.make_jaxpr(jax.grad(slow))(trainable).jaxpr, shapes, [])


def test_vera_trains_its_scales_without_factor_sized_products():
    """VeRA's d and b scale activations: the gradient's jaxpr has no product of the shared
    matrices' slice shapes (in, r) or (r, out), as folding d, b into them would give."""
    x = jax.random.normal(jax.random.key(0), (8, 16))
    model = Wide()
    params = model.init(jax.random.key(0), x)["params"]
    adapted = perturb(dora_jax.wrap(params, rank=4, method="vera"))
    frozen, trainable = dora_jax.partition(adapted)
    shapes = {(16, 4), (4, 40), (40, 4), (4, 24)}

    def loss(t):
        return jnp.sum(dora_jax.apply(model.apply)({"params": dora_jax.combine(frozen, t)}, x))

    found = _kernel_shaped_outputs(jax.make_jaxpr(jax.grad(loss))(trainable).jaxpr, shapes, [])
    assert [f for f in found if f.split()[0] in ("dot_general", "mul")] == []

    # Negative control: a loss through the folded factors is caught.
    def folded(t):
        nodes = jax.tree.leaves(dora_jax.combine(frozen, t), is_leaf=dora_jax.is_adapter)
        return sum(jnp.sum(x @ n.factors()[0][: x.shape[1]]) for n in nodes[:1])

    found = _kernel_shaped_outputs(jax.make_jaxpr(jax.grad(folded))(trainable).jaxpr, shapes, [])
    assert [f for f in found if f.split()[0] in ("dot_general", "mul")]


def test_fallback_warns_once_and_strict_raises(setup):
    _, params, x = setup

    def f(p, x):
        # A use the factored forward cannot cover: the kernel is read element-wise.
        return x @ p["fc1"]["kernel"] + jnp.sum(p["fc1"]["kernel"])

    adapted = perturb(dora_jax.wrap(params, rank=2, targets="fc1"))
    fn = dora_jax.apply(f)
    with pytest.warns(dora_jax.FallbackWarning, match=re.escape("'fc1/kernel'")):
        got = fn(adapted, x)
    merged = dora_jax.merge(adapted)
    np.testing.assert_allclose(got, f(merged, x), rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", dora_jax.FallbackWarning)
        fn(adapted, x)  # warned once already for this kernel and use
    with pytest.raises(ValueError, match="strict=True"):
        dora_jax.apply(f, strict=True)(adapted, x)


def test_dropout_acts_on_low_rank_branch_only(setup):
    model, params, x = setup
    adapted = dora_jax.wrap(params, rank=4, dropout=0.5, method="lora")
    # B = 0: the low-rank branch is zero, so dropout must not change anything.
    y = dora_jax.apply(model.apply, key=jax.random.key(1))({"params": adapted}, x)
    np.testing.assert_allclose(y, model.apply({"params": params}, x), rtol=1e-6, atol=1e-6)
    adapted = perturb(adapted, size=0.5)
    plain = dora_jax.apply(model.apply)({"params": adapted}, x)
    y1 = dora_jax.apply(model.apply, key=jax.random.key(1))({"params": adapted}, x)
    y2 = dora_jax.apply(model.apply, key=jax.random.key(2))({"params": adapted}, x)
    assert not np.allclose(y1, plain) and not np.allclose(y1, y2)
    # Dropout is unbiased: on a linear map, the mean over keys approaches the plain output.
    lin = {"w": {"kernel": params["fc1"]["kernel"]}}
    lin = perturb(dora_jax.wrap(lin, rank=4, dropout=0.5, method="lora"), size=0.5)
    f = lambda p, x: x @ p["w"]["kernel"]  # noqa: E731
    plain = dora_jax.apply(f)(lin, x)
    keys = jax.random.split(jax.random.key(0), 2000)
    ys = jax.vmap(lambda k: dora_jax.apply(f, key=k)(lin, x))(keys)
    spread = np.abs(ys - plain).mean()
    assert np.abs(ys.mean(0) - plain).max() < 0.15 * spread


@pytest.mark.parametrize("rate", [0.05, 0.5])
def test_dropout_mask_statistics(rate):
    """The hashed keep-mask: right rate, deterministic per key, no visible correlation
    between neighbours, rows, columns or keys (bounds are 5 standard errors)."""
    from dora_jax.forward import _dropout_keep

    shape = (2, 1024, 384)
    a = np.asarray(_dropout_keep(jax.random.key(0), shape, rate), np.float64)
    b = np.asarray(_dropout_keep(jax.random.key(1), shape, rate), np.float64)
    np.testing.assert_array_equal(a, _dropout_keep(jax.random.key(0), shape, rate))
    p, n = 1.0 - rate, a.size
    se = np.sqrt(p * (1 - p) / n)
    assert abs(a.mean() - p) < 5 * se and abs(b.mean() - p) < 5 * se

    def corr(u, v):
        u, v = u.ravel() - u.mean(), v.ravel() - v.mean()
        return (u @ v) / np.sqrt((u @ u) * (v @ v))

    bound = 5 / np.sqrt(n)
    assert abs(corr(a, b)) < bound  # two keys
    assert abs(corr(a[..., 1:], a[..., :-1])) < bound  # neighbours in a row
    assert abs(corr(a[:, 1:], a[:, :-1])) < bound  # neighbours in a column
    assert abs(corr(a[0], a[1])) < 2 * bound  # the leading (stack) axis
    # Every column and every row keeps about the same fraction.
    for means, count in ((a.mean(axis=(0, 1)), 2 * 1024), (a.mean(axis=2), 384)):
        assert np.abs(means - p).max() < 5.5 * np.sqrt(p * (1 - p) / count)


# --- the factored norm, property-tested over shapes ---------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    stack=st.lists(st.integers(1, 3), max_size=2),
    ins=st.lists(st.integers(1, 5), min_size=1, max_size=2),
    outs=st.lists(st.integers(1, 5), min_size=1, max_size=2),
    rank=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_factored_norm_matches_direct_norm(stack, ins, outs, rank, seed):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    w0 = jax.random.normal(k1, (*stack, *ins, *outs))
    a = jax.random.normal(k2, (*stack, *ins, rank))
    b = jax.random.normal(k3, (*stack, rank, *outs))
    n_in, n_out = int(np.prod(ins)), int(np.prod(outs))
    v = w0.reshape(*stack, n_in, n_out) + a.reshape(*stack, n_in, rank) @ b.reshape(
        *stack, rank, n_out
    )
    direct = jnp.sum(v * v, axis=-2).reshape(*stack, *outs)
    got = dora_jax.column_norm_sq(w0, a, b, len(stack), len(ins))
    np.testing.assert_allclose(got, direct, rtol=1e-4, atol=1e-4)


# --- bad input ----------------------------------------------------------------------------


def test_errors(setup):
    _, params, _ = setup
    with pytest.raises(ValueError, match="No kernel matches"):
        dora_jax.wrap(params, targets="attention")
    with pytest.raises(ValueError, match=r"rank=13 is larger.*'fc1/kernel' \(max 12\).*rank <= 5"):
        dora_jax.wrap(params, rank=13)
    with pytest.raises(ValueError, match="already holds adapters"):
        dora_jax.wrap(dora_jax.wrap(params, rank=2), rank=2)
    with pytest.raises(ValueError, match="Cannot tell the input axes.*infer_axes"):
        dora_jax.wrap({"q": {"kernel": jnp.ones((8, 2, 4))}}, rank=2)
    with pytest.raises(TypeError, match="only floating kernels"):
        dora_jax.wrap({"q": {"kernel": jnp.ones((8, 4), jnp.int8)}}, rank=2, targets="q")
    with pytest.raises(ValueError, match="method="):
        dora_jax.wrap(params, method="dorra")
    with pytest.raises(ValueError, match="do not fit"):
        dora_jax.wrap({"q": {"kernel": jnp.ones((8, 2, 4))}}, axes={"q": dora_jax.Axes(1, 2)})
    with pytest.raises(ValueError, match="inconsistent"):
        dora_jax.infer_axes(
            lambda p, x: (
                jnp.einsum("bi,ijk->bjk", x, p["w"]["kernel"]).sum()
                + jnp.einsum(
                    "bij,ijk->bk", x.reshape(1, 2, 1) * jnp.ones((1, 2, 2)), p["w"]["kernel"]
                ).sum()
            ),
            {"w": {"kernel": jnp.ones((2, 2, 2))}},
            jnp.ones((1, 2)),
        )


# --- numbers wrap refuses, and the norm where the expansion fails ---------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha": float("nan")}, "alpha must be a finite positive"),
        ({"alpha": float("inf")}, "alpha must be a finite positive"),
        ({"alpha": 0.0}, "alpha must be a finite positive"),
        ({"alpha": -2.0}, "alpha must be a finite positive"),
        ({"alpha": "16"}, "alpha must be a finite positive"),
        ({"rank": True}, "rank must be a positive int"),
        ({"rank": 2.0}, "rank must be a positive int"),
        ({"rank": 0}, "rank must be a positive int"),
        ({"dropout": float("nan")}, "dropout must be a number in"),
    ],
)
def test_wrap_refuses_nonsense_numbers(kwargs, message):
    params = {"dense": {"kernel": jnp.ones((4, 3))}}
    with pytest.raises(ValueError, match=message):
        dora_jax.wrap(params, **{"rank": 2, **kwargs})


def _norm64(w, a, b, scale):
    """``||W0 + s A B||_c`` in float64 numpy: the reference."""
    v = np.asarray(w, np.float64) + scale * np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    return np.sqrt(np.sum(v * v, axis=0))


def _cancelling_node(t, n_in=64, n_out=16, rank=4, seed=0):
    """A DoRA node whose update is ``dW = -t W0`` (W0 of rank ``rank``)."""
    ku, kv = jax.random.split(jax.random.key(seed))
    u = jax.random.normal(ku, (n_in, rank))
    v = jax.random.normal(kv, (rank, n_out))
    node = dora_jax.wrap({"kernel": u @ v}, rank=rank)["kernel"]
    return dora_jax.DoRA(u @ v, u, -t * v / node.scale, node.magnitude, scale=node.scale)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("t", [0.0, 0.5, 0.9, 0.99, 0.999, 0.9999])
def test_norm_is_accurate_when_the_update_nearly_cancels_the_base(t, jit):
    node = _cancelling_node(t)
    norm = jax.jit(lambda n: n.weight_norm())(node) if jit else node.weight_norm()
    expected = _norm64(node.base, node.a, node.b, node.scale)
    # The expansion alone loses ~13% at t = 0.999 (rounding of terms ~1e6x the result). Any
    # float32 sum of W0 + dW errs by ~eps |W0| / |W0 + dW| = 1.2e-7 / (1 - t).
    np.testing.assert_allclose(norm, expected, rtol=max(1e-4, 2e-7 / (1 - t)))


def test_expansion_error_stays_within_its_bound():
    # Where the fast expansion is used (terms at most CANCELLATION_LIMIT times the squared
    # norm), its error stays below ~1e-4 of the norm; beyond, the direct sum takes over.
    for t in np.linspace(0.0, 0.98, 12):
        node = _cancelling_node(float(t), seed=int(t * 100))
        left, right = node.factors()
        w_sq, cross, quad = dora_jax.adapters._norm_terms(node.base, left, right, 0, 1)
        norm_sq = w_sq + 2 * cross + quad
        ratio = float(jnp.max((w_sq + 2 * jnp.abs(cross) + quad) / norm_sq))
        expected = _norm64(node.base, node.a, node.b, node.scale)
        error = np.max(np.abs(np.sqrt(np.asarray(norm_sq, np.float64)) / expected - 1))
        assert error <= 1e-7 * ratio + 1e-6, (t, ratio, error)


def test_exact_norm_gradient_is_finite_on_the_direct_path():
    node = _cancelling_node(0.999)
    node = dora_jax.DoRA(
        node.base, node.a, node.b, node.magnitude, scale=node.scale, exact_norm_grad=True
    )
    grad = jax.grad(lambda b: jnp.sum(dora_jax.DoRA(
        node.base, node.a, b, node.magnitude, scale=node.scale, exact_norm_grad=True
    ).weight_norm()))(node.b)  # fmt: skip
    # d||V||_c / dB = s A^T V / ||V||_c, by hand in float64.
    v = np.asarray(node.base, np.float64) + node.scale * np.asarray(
        node.a, np.float64
    ) @ np.asarray(node.b, np.float64)
    expected = node.scale * np.asarray(node.a, np.float64).T @ (v / np.linalg.norm(v, axis=0))
    np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_a_kernel_of_huge_magnitude_does_not_overflow_the_norm():
    w = 1e20 * jax.random.normal(jax.random.key(0), (32, 8))
    adapted = dora_jax.wrap({"kernel": w}, rank=2)
    node = adapted["kernel"]
    expected = np.linalg.norm(np.asarray(w, np.float64), axis=0)
    np.testing.assert_allclose(node.magnitude, expected, rtol=1e-5)
    np.testing.assert_allclose(node.weight_norm(), expected, rtol=1e-5)
    merged = dora_jax.merge(adapted)["kernel"]  # at init W' = W0
    np.testing.assert_allclose(merged, w, rtol=1e-5)
    x = jnp.ones((2, 32))
    y = dora_jax.apply(lambda p, x: x @ p["kernel"])(adapted, x)
    np.testing.assert_allclose(y, np.asarray(x, np.float64) @ np.asarray(w, np.float64), rtol=1e-4)


# --- clear errors for halves, empty trees and direct use -----------------------------------


def _small():
    params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (6, 4))}}
    return params, dora_jax.wrap(params, rank=2)


def test_partition_of_a_tree_without_adapters_is_a_clear_error():
    params, _ = _small()
    with pytest.raises(ValueError, match="partition got a tree without adapter nodes"):
        dora_jax.partition(params)


def test_merge_of_plain_params_returns_them_unchanged():
    # Evaluation code merges whatever it gets: the base model's params pass through.
    params, _ = _small()
    merged = dora_jax.merge(params)
    assert merged["dense"]["kernel"] is params["dense"]["kernel"]


def test_merge_of_one_half_is_a_clear_error():
    _, adapted = _small()
    frozen, trainable = dora_jax.partition(adapted)
    with pytest.raises(ValueError, match="merge got the frozen half.*combine"):
        dora_jax.merge(frozen)
    with pytest.raises(ValueError, match="merge got the trainable half"):
        dora_jax.merge(trainable)


def test_combine_with_a_trainable_half_of_another_shape_is_a_clear_error():
    params, adapted = _small()
    frozen, _ = dora_jax.partition(adapted)
    _, wider = dora_jax.partition(dora_jax.wrap({"dense": {"kernel": jnp.ones((6, 5))}}, rank=2))
    with pytest.raises(ValueError, match="'dense/kernel'.*do not fit its base of shape \\(6, 4\\)"):
        dora_jax.combine(frozen, wider)


def test_calling_the_model_without_apply_names_the_fix():
    model = MLP()
    x = jnp.ones((2, 8))
    params = model.init(jax.random.key(0), x)["params"]
    adapted = dora_jax.wrap(params, rank=2)
    for run in (model.apply, jax.jit(model.apply)):
        with pytest.raises(TypeError, match="dora_jax.apply"):
            run({"params": adapted}, x)


def test_cond_returning_the_kernel_or_an_array_forms_the_kernel():
    _, adapted = _small()
    adapted = perturb(adapted, size=0.3)

    def f(p, x, flag):
        w = jax.lax.cond(flag, lambda: p["dense"]["kernel"], lambda: jnp.eye(6, 4))
        return x @ w

    x = jax.random.normal(jax.random.key(1), (3, 6))
    merged = dora_jax.merge(adapted)["dense"]["kernel"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dora_jax.FallbackWarning)
        for flag, w in ((True, merged), (False, jnp.eye(6, 4))):
            got = jax.jit(dora_jax.apply(f))(adapted, x, flag)
            np.testing.assert_allclose(got, x @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loop", ["fori", "while"])
def test_dropout_masks_differ_across_loop_iterations(loop):
    # Two identical iterations of a loop with a traced trip count: with a fresh mask per
    # iteration their outputs differ; a mask reused across iterations would make them equal.
    params = {"dense": {"kernel": jnp.zeros((64, 32))}}
    adapted = dora_jax.wrap(params, rank=4, method="lora", dropout=0.5)
    adapted = perturb(adapted, size=1.0)
    x = jnp.ones((1, 64))

    def f(p, n):
        out = jnp.zeros((2, 32))

        def body(i, out):
            return out.at[i].set((x @ p["dense"]["kernel"])[0])

        if loop == "fori":
            return jax.lax.fori_loop(0, n, body, out)
        return jax.lax.while_loop(
            lambda c: c[0] < n, lambda c: (c[0] + 1, body(c[0], c[1])), (0, out)
        )[1]

    out = jax.jit(dora_jax.apply(f, key=jax.random.key(3)))(adapted, jnp.int32(2))
    assert np.all(np.isfinite(out))
    assert not np.allclose(out[0], out[1])
    # Without a key (evaluation) there is no dropout: both iterations agree.
    out = jax.jit(dora_jax.apply(f))(adapted, jnp.int32(2))
    np.testing.assert_allclose(out[0], out[1])


@pytest.mark.parametrize("jit", [False, True])
def test_norm_guard_reads_kernels_in_any_layout(jit):
    # (layers, in, out) stored as (out, layers, in): the direct path (t = 0.999) and the
    # expansion (t = 0.5) both give the float64 norm of each layer's W0 + dW.
    layers, n_in, n_out, rank = 3, 64, 16, 4
    ku, kv = jax.random.split(jax.random.key(1))
    u = jax.random.normal(ku, (layers, n_in, rank))
    v = jax.random.normal(kv, (layers, rank, n_out))
    canonical = u @ v  # (layers, in, out)
    stored = jnp.transpose(canonical, (2, 0, 1))
    axes = {"kernel": dora_jax.Axes(stack=(1,), inputs=(2,))}
    node = dora_jax.wrap({"kernel": stored}, rank=rank, axes=axes)["kernel"]
    for t in (0.5, 0.999):
        moved = dataclasses.replace(node, a=u, b=-t * v / node.scale)
        norm = jax.jit(lambda n: n.weight_norm())(moved) if jit else moved.weight_norm()
        expected = np.stack(
            [_norm64(canonical[i], u[i], moved.b[i], node.scale) for i in range(layers)]
        )
        np.testing.assert_allclose(norm, expected, rtol=max(1e-4, 2e-7 / (1 - t)))
