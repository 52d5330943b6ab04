"""Scanned stacks under ``remat`` policies: gradients equal the reference, policies hold.

A stack of residual MLP blocks ``x + tanh(x W1) W2`` scanned over stacked kernels, with the
body under ``jax.checkpoint`` with each policy. Gradients of every trainable leaf must equal
those of a plain-jnp reference that forms ``W'`` (tests/helpers.py); what the backward
pass keeps must follow the policy (DoRA keeps what LoRA keeps, up to per-feature vectors).
"""

import collections
import contextlib
import dataclasses
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

import dora_jax
from tests import helpers as ref

LAYERS, N, D, F = 3, 32, 16, 24
POLICIES = {
    "none": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "checkpoint_dots_with_no_batch_dims": (
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
    ),
}


def _model(policy_name):
    def block(x, p):
        return x + jnp.tanh(x @ p["w1"]) @ p["w2"], None

    if policy_name != "none":
        block = jax.checkpoint(block, policy=POLICIES[policy_name])

    def fn(params, x):
        y, _ = jax.lax.scan(block, x, params)
        return y

    return fn


def _setup(method, n=N):
    k = jax.random.split(jax.random.key(0), 4)
    params = {
        "w1": jax.random.normal(k[0], (LAYERS, D, F)) / D**0.5,
        "w2": jax.random.normal(k[1], (LAYERS, F, D)) / F**0.5,
    }
    axes = {"w1": dora_jax.Axes(1, 1), "w2": dora_jax.Axes(1, 1)}
    kw = {"rank": 16} if method in ("vera", "dvora") else {"rank": 4}
    adapted = dora_jax.wrap(params, method=method, targets=r"w[12]$", axes=axes, **kw)
    # Non-zero updates so that every gradient path is exercised.
    adapted = {name: _perturb(node, i) for i, (name, node) in enumerate(adapted.items())}
    x = jax.random.normal(k[2], (n, D))
    return adapted, x


def _perturb(node, i):
    key = jax.random.key(10 + i)
    return dataclasses.replace(node, b=node.b + 0.2 * jax.random.normal(key, node.b.shape))


def _ref_kernel(node):
    n_in = node.base.shape[1]
    n_out = node.base.shape[2]
    if isinstance(node, dora_jax.VeRA | dora_jax.DVoRA):
        v = node.base + ref.vera_delta(node.shared_a, node.shared_b, node.d, node.b, n_in, n_out)
    else:
        v = node.base + ref.lora_delta(node.a, node.b, node.scale)
    return ref.decompose(v, node.magnitude) if hasattr(node, "magnitude") else v


def _loss(y):
    return jnp.sum(jnp.sin(y))


@pytest.mark.parametrize("method", ["lora", "dora", "dvora"])
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("jit", [False, True])
def test_remat_policies_keep_gradients(method, policy, jit):
    adapted, x = _setup(method)
    fn = _model(policy)

    def loss(a):
        return _loss(dora_jax.apply(fn, strict=True)(a, x))

    def ref_loss(a):
        return _loss(fn({k: _ref_kernel(v) for k, v in a.items()}, x))

    g_fn = jax.jit(jax.grad(loss)) if jit else jax.grad(loss)
    got, want = g_fn(adapted), jax.grad(ref_loss)(adapted)
    for name, node in adapted.items():
        for field in type(node).trainable:
            np.testing.assert_allclose(
                getattr(got[name], field),
                getattr(want[name], field),
                rtol=2e-4,
                atol=2e-5,
                err_msg=f"{name}.{field}",
            )


def _saved_bytes(method, policy):
    adapted, x = _setup(method)
    frozen, trainable = dora_jax.partition(adapted)
    fn = _model(policy)

    def loss(t):
        return _loss(dora_jax.apply(fn)(dora_jax.combine(frozen, t), x))

    # Activation-sized: not a per-feature vector.
    return sorted(ref.kept_sizes(loss, trainable, LAYERS * F + 1), reverse=True)


@pytest.mark.parametrize("pair", [("lora", "dora"), ("vera", "dvora")])
def test_nothing_saveable_keeps_its_meaning(pair):
    # Under nothing_saveable the scan keeps only each block's input: DoRA's backward keeps
    # the same activation-sized arrays as LoRA's, the magnitude's gradient adds none.
    # (Under dots_saveable DoRA also keeps the dots ``x W0`` and ``(x A) B`` of layers whose
    # output LoRA's backward does not need: the magnitude's gradient needs their sum.)
    additive, decomposed = pair
    saved = _saved_bytes(decomposed, "nothing_saveable")
    assert saved == _saved_bytes(additive, "nothing_saveable")
    assert LAYERS * N * F not in saved  # no stacked projection output


def _step_bytes(method, policy):
    adapted, x = _setup(method, n=2048)
    frozen, trainable = dora_jax.partition(adapted)
    fn = _model(policy)

    @functools.partial(jax.jit)
    def grad(t, frozen, x):
        return jax.grad(lambda t: _loss(dora_jax.apply(fn)(dora_jax.combine(frozen, t), x)))(t)

    m = grad.lower(trainable, frozen, x).compile().memory_analysis()
    return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes


def test_scanned_dora_memory_under_remat_is_loras():
    # XLA's accounting of one compiled gradient step (2048 rows, so activations dominate as
    # in training): with the scan body rematerialised, DoRA's step memory stays within 5% of
    # LoRA's. Deterministic for a given jax/XLA.
    lora, dora = _step_bytes("lora", "nothing_saveable"), _step_bytes("dora", "nothing_saveable")
    assert dora <= 1.05 * lora, (dora, lora)


def _swiglu_saved(method):
    """Activation-sized arrays the backward pass keeps for a scanned SwiGLU stack."""
    k = jax.random.split(jax.random.key(1), 4)
    params = {
        "gate": jax.random.normal(k[0], (LAYERS, D, F)) / D**0.5,
        "up": jax.random.normal(k[1], (LAYERS, D, F)) / D**0.5,
        "down": jax.random.normal(k[2], (LAYERS, F, D)) / F**0.5,
    }
    axes = {name: dora_jax.Axes(1, 1) for name in params}
    adapted = dora_jax.wrap(params, rank=4, method=method, targets=".", axes=axes)
    frozen, trainable = dora_jax.partition(adapted)
    x = jax.random.normal(k[3], (N, D))

    def block(x, p):
        return x + (jax.nn.silu(x @ p["gate"]) * (x @ p["up"])) @ p["down"], None

    def stack(params, x):
        return jax.lax.scan(block, x, params)[0]

    def loss(t):
        return _loss(dora_jax.apply(stack)(dora_jax.combine(frozen, t), x))

    return collections.Counter(ref.kept_sizes(loss, trainable, LAYERS * N * D))


def test_scanned_dora_shares_the_outputs_a_swiglu_keeps():
    # The magnitude's gradient reads each projection's scaled output. A SwiGLU keeps its gate
    # and up outputs anyway, so inside a scan DoRA stacks one more array per layer than LoRA
    # (for down, whose output only feeds the residual add), not three.
    extra = _swiglu_saved("dora") - _swiglu_saved("lora")
    assert extra == collections.Counter({LAYERS * N * D: 1}), extra


def test_projections_of_one_input_keep_one_copy_of_it():
    # q, k and v contract the same (batch, tokens, features) input. The factored forward
    # flattens it to 2-D once for all three, so the scan stacks one copy of it, not three.
    b, t = 4, N // 4
    k = jax.random.split(jax.random.key(2), 4)
    params = {name: jax.random.normal(k[i], (LAYERS, D, D)) / D**0.5
              for i, name in enumerate(("q", "k", "v"))}  # fmt: skip
    axes = {name: dora_jax.Axes(1, 1) for name in params}
    adapted = dora_jax.wrap(params, rank=4, method="lora", targets=".", axes=axes)
    frozen, trainable = dora_jax.partition(adapted)
    x = jax.random.normal(k[3], (b, t, D))

    def block(x, p):
        return x + jnp.tanh(x @ p["q"]) * jnp.sin(x @ p["k"]) * (x @ p["v"]), None

    def stack(params, x):
        return jax.lax.scan(block, x, params)[0]

    def loss(t_):
        return _loss(dora_jax.apply(stack)(dora_jax.combine(frozen, t_), x))

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(loss, trainable)
    # The flattened input, stacked over layers, is (LAYERS, N, D); the block's own
    # activations keep their (LAYERS, b, t, D) shape.
    flat = [line for line in out.getvalue().splitlines() if f"[{LAYERS},{N},{D}]" in line]
    assert len(flat) == 1, flat


# (pre shape, scale shape): rows summed in one block; in _row_sum's blocks with a remainder
# (37 rows); and with the rows on the leading axis, the scale without stack axes.
_SCALED_SHAPES = [((2, 8, 5), (2, 1, 5)), ((2, 37, 5), (2, 1, 5)), ((37, 3, 5), (5,))]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shapes", _SCALED_SHAPES, ids=["one-block", "blocks", "leading"])
def test_scan_body_output_scaling_has_the_plain_products_gradients(dtype, shapes):
    # forward._rescaled: y = pre * scale with its own VJP, which reads y instead of pre.
    # Against autodiff of the plain product, with one output column whose scale is exactly
    # 0 (its scale gradient is then 0: pre is not recoverable).
    from dora_jax.forward import _rescaled

    shape, scale_shape = shapes
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    pre = jax.random.normal(k1, shape, jnp.float32).astype(dtype)
    zero = (len(scale_shape) - 1) * (0,) + (3,)
    scale = jax.random.uniform(k2, scale_shape, jnp.float32, 0.5, 2.0).at[zero].set(0.0)
    probe = jax.random.normal(k3, shape, jnp.float32)

    def loss(f, pre, scale):
        return jnp.sum(f(pre, scale).astype(jnp.float32) * probe)

    def plain(p, s):
        return (p * s).astype(p.dtype)

    got = jax.grad(functools.partial(loss, _rescaled), argnums=(0, 1))(pre, scale)
    want = jax.grad(functools.partial(loss, plain), argnums=(0, 1))(pre, scale)
    assert got[0].dtype == pre.dtype and got[1].dtype == scale.dtype
    assert got[1].shape == scale.shape
    np.testing.assert_array_equal(_rescaled(pre, scale), plain(pre, scale))
    np.testing.assert_allclose(np.float32(got[0]), np.float32(want[0]), rtol=1e-6, atol=1e-6)
    # The scale gradient is sum(g * y) / scale, summed in another order than autodiff's and
    # with y rounded to dtype: errors relative to the largest entry (bf16: ~1%), not each.
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    mask = np.ones(scale.shape, bool)
    mask[zero] = False
    want_s = np.asarray(want[1])[mask]
    np.testing.assert_allclose(
        np.asarray(got[1])[mask], want_s, rtol=tol, atol=tol * np.abs(want_s).max()
    )
    assert got[1][zero] == 0.0


def test_scan_body_output_scaling_has_hessian_vector_products_by_reverse_over_reverse():
    # The custom VJP has no forward mode (jvp, and so jvp-of-grad, raise), but its backward
    # rule is differentiable: reverse-over-reverse Hessian-vector products equal the plain
    # product's; forward mode raises JAX's error rather than returning something wrong.
    from dora_jax.forward import _rescaled

    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    pre = jax.random.normal(k1, (2, 37, 5), jnp.float32)
    scale = jax.random.uniform(k2, (2, 1, 5), jnp.float32, 0.5, 2.0)
    v = (jax.random.normal(k3, pre.shape), jnp.ones_like(scale))

    def hvp(f):
        def grad_dot_v(p, s):
            g = jax.grad(lambda p, s: jnp.sum(jnp.sin(f(p, s))), argnums=(0, 1))(p, s)
            return sum(jnp.vdot(a, b) for a, b in zip(g, v))

        return jax.grad(grad_dot_v, argnums=(0, 1))(pre, scale)

    got, want = hvp(_rescaled), hvp(lambda p, s: p * s)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(_rescaled, (pre, scale), v)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_scan_body_dvora_output_has_the_plain_products_gradients(dtype):
    # forward._rescaled_sum: y = (base + z * post) * scale with its own VJP (reads y and z).
    from dora_jax.forward import _rescaled_sum

    k = jax.random.split(jax.random.key(1), 5)
    base = jax.random.normal(k[0], (2, 8, 5), jnp.float32).astype(dtype)
    z = jax.random.normal(k[1], (2, 8, 5), jnp.float32).astype(dtype)
    post = jax.random.normal(k[2], (2, 1, 5), jnp.float32).astype(dtype)
    scale = jax.random.uniform(k[3], (2, 1, 5), jnp.float32, 0.5, 2.0).at[0, 0, 1].set(0.0)
    probe = jax.random.normal(k[4], (2, 8, 5), jnp.float32)

    def loss(f, *args):
        return jnp.sum(f(*args).astype(jnp.float32) * probe)

    def plain(b, z, p, s):
        return ((b + z * p) * s).astype(b.dtype)

    args = (base, z, post, scale)
    got = jax.grad(functools.partial(loss, _rescaled_sum), argnums=(0, 1, 2, 3))(*args)
    want = jax.grad(functools.partial(loss, plain), argnums=(0, 1, 2, 3))(*args)
    np.testing.assert_array_equal(_rescaled_sum(*args), plain(*args))
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for g, w, a in zip(got[:3], want[:3], args[:3]):
        assert g.dtype == a.dtype
        np.testing.assert_allclose(np.float32(g), np.float32(w), rtol=tol, atol=tol)
    mask = np.ones(scale.shape, bool)
    mask[0, 0, 1] = False
    # sum(g * y) with y rounded to bf16: errors relative to the largest entry, not each.
    want_s = np.asarray(want[3])[mask]
    np.testing.assert_allclose(
        np.asarray(got[3])[mask], want_s, rtol=tol, atol=tol * np.abs(want_s).max()
    )
    assert got[3][0, 0, 1] == 0.0
