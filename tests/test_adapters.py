"""The adapter nodes' column norm: factored norm against the formed kernel in any layout,
accuracy where the update cancels the base, overflow, tiny weights, zero columns."""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dora_jax
from tests import helpers as ref
from tests.helpers import assert_trees_close, rand

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


@pytest.mark.parametrize(
    "shape, stack, inputs",
    [
        ((6, 5), (), (1,)),
        ((2, 4, 5, 3), (), (2,)),
        ((4, 3, 5, 2), (1,), (0, 2)),
        ((3, 5, 4), (2,), (1,)),
    ],
)
def test_factored_norm_any_layout(shape, stack, inputs):
    """||W0 + L R||_c from column_norm_sq equals the norm of the formed kernel, any layout."""
    w = rand(0, *shape)
    outputs = tuple(p for p in range(len(shape)) if p not in stack + inputs)
    s_shape = [shape[p] for p in stack]
    i_shape, o_shape = [shape[p] for p in inputs], [shape[p] for p in outputs]
    left = rand(1, *s_shape, *i_shape, 3)
    right = rand(2, *s_shape, 3, *o_shape)
    canonical = jnp.transpose(w, stack + inputs + outputs)
    v = ref.flat2(canonical, len(stack), len(inputs)) + ref.lora_delta(
        left.reshape(*s_shape, -1, 3), right.reshape(*s_shape, 3, -1), 1.0
    )
    want = jnp.sum(v * v, axis=-2).reshape(*s_shape, *o_shape)
    got = dora_jax.column_norm_sq(w, left, right, stack, inputs)
    assert_trees_close(got, want, rtol=1e-4, atol=1e-4)


def test_zero_column_warns_for_dora_not_lora():
    w = rand(0, 5, 4).at[:, 2].set(0.0)
    with pytest.warns(UserWarning, match=r"'w'.*LoRA"):
        dora_jax.wrap({"w": w}, rank=2, targets="w")
    with pytest.warns(UserWarning, match=r"'w'.*LoRA"):
        dora_jax.wrap({"w": w}, rank=2, targets="w", method="dvora")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dora_jax.wrap({"w": w}, rank=2, targets="w", method="lora")


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


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("scale", [1e-7, 1e-12, 1e-16])
def test_a_kernel_of_tiny_weights_keeps_its_norm_and_gradients(scale, jit):
    # Column norms far below 1: pruned units, kernels behind a normalisation layer. An
    # untrained node is the base; a trained one matches the float64 formula.
    w = scale * jax.random.normal(jax.random.key(0), (64, 8))
    w = w.at[:, 0].multiply(1e-2)  # one near-dead unit among them
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no column is zero: no zero-column warning
        adapted = dora_jax.wrap({"kernel": w}, rank=2)
    node = adapted["kernel"]
    w64 = np.asarray(w, np.float64)
    np.testing.assert_allclose(node.magnitude, np.linalg.norm(w64, axis=0), rtol=1e-5)
    x = jax.random.normal(jax.random.key(1), (3, 64))
    forward = dora_jax.apply(lambda p, x: x @ p["kernel"])
    forward = jax.jit(forward) if jit else forward
    np.testing.assert_allclose(dora_jax.merge(adapted)["kernel"], w, rtol=1e-5)
    np.testing.assert_allclose(forward(adapted, x), np.asarray(x, np.float64) @ w64, rtol=1e-4)

    # Trained: B moved by the kernel's own scale, the magnitude by 10%.
    b = scale * jax.random.normal(jax.random.key(2), node.b.shape) / node.scale
    node = dataclasses.replace(node, b=b, magnitude=1.1 * node.magnitude)

    def loss(n):
        return jnp.sum(jnp.sin(forward({"kernel": n}, x) / scale))

    def loss_ref(n):  # the formula, formed, stop_gradient on the norm
        v = n.base + n.scale * n.a @ n.b
        norm = jnp.sqrt(jnp.sum(jnp.square(v / scale), axis=0)) * scale
        # m / ||V||_c first: m * V would reach float32's subnormals at these scales.
        return jnp.sum(jnp.sin(x @ (v * (n.magnitude / jax.lax.stop_gradient(norm))) / scale))

    (value, grads), (want, want_grads) = (jax.value_and_grad(f)(node) for f in (loss, loss_ref))
    np.testing.assert_allclose(value, want, rtol=1e-4)
    for name in ("a", "b", "magnitude"):
        got, expected = getattr(grads, name), getattr(want_grads, name)
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


def test_columns_of_weights_whose_squares_underflow_are_warned_of():
    # Entries below ~1e-19: float32 squares underflow, so the norm takes the column as zero.
    w = 1e-17 * jax.random.normal(jax.random.key(0), (64, 8))
    w = w.at[:, 3].multiply(1e-4)
    with pytest.warns(
        UserWarning, match=r"'kernel' has 1 output feature\(s\) whose weights are all"
    ):
        dora_jax.wrap({"kernel": w}, rank=2)
    # An all-zero column gets the zero-column warning only.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dora_jax.wrap({"kernel": w.at[:, 3].set(0.0)}, rank=2)
    assert [str(c.message) for c in caught if "below" in str(c.message)] == []


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
