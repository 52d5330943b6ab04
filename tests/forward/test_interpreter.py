"""The forward interpreter's rules: scan params, no kernel-sized array in a training step,
the fallback and strict mode, dropout, cond and loops, and the error without apply."""

import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dora_jax
from dora_jax.forward import _scan_counts
from tests.helpers import MLP, mlp_setup, perturb, small_dense


def _scan_eqn():
    def f(c, xs):
        return jax.lax.scan(lambda h, x: (h * c + x, h), jnp.zeros(3), xs)

    jaxpr = jax.make_jaxpr(f)(jnp.ones(3), jnp.ones((4, 3))).jaxpr
    return next(e for e in jaxpr.eqns if e.primitive.name == "scan")


def test_scan_counts_from_this_jax():
    eqn = _scan_eqn()
    # One const (c), one carry (h), one scanned input (xs).
    assert _scan_counts(eqn.params) == (1, 1)
    assert len(eqn.invars) == 3


class _Groups:
    """Stands in for jax >= 0.11's ``ft_in``: ``unpack()`` gives (consts, carry, xs)."""

    def __init__(self, *groups):
        self.groups = groups

    def unpack(self):
        return self.groups


def test_scan_counts_from_grouped_inputs():
    params = {"ft_in": _Groups(("c1", "c2"), ("h",), ("x1", "x2", "x3"))}
    assert _scan_counts(params) == (2, 1)


@pytest.fixture(scope="module")
def setup():
    return mlp_setup()


# --- the factored forward forms no kernel-sized array ---------------------------------------


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


def test_calling_the_model_without_apply_names_the_fix():
    model = MLP()
    x = jnp.ones((2, 8))
    params = model.init(jax.random.key(0), x)["params"]
    adapted = dora_jax.wrap(params, rank=2)
    for run in (model.apply, jax.jit(model.apply)):
        with pytest.raises(TypeError, match="dora_jax.apply"):
            run({"params": adapted}, x)


def test_cond_returning_the_kernel_or_an_array_forms_the_kernel():
    _, adapted = small_dense()
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
