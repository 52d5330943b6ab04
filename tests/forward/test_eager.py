"""Eager calls of ``dora_jax.apply``: one trace per call signature, same results as jit."""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dora_jax
from tests import helpers as ref


def _setup(dropout=0.0):
    k = jax.random.split(jax.random.key(0), 3)
    params = {"w1": jax.random.normal(k[0], (6, 5)), "w2": jax.random.normal(k[1], (5, 4))}
    adapted = dora_jax.wrap(params, rank=2, method="dora", targets=r"w1$", dropout=dropout)
    node = adapted["w1"]
    adapted["w1"] = dataclasses.replace(node, b=0.3 * jax.random.normal(k[2], node.b.shape))
    x = jax.random.normal(jax.random.key(5), (3, 6))
    return params, adapted, x


def _counting(calls):
    def fn(p, x, power=1):
        calls.append(1)
        return jnp.tanh(x @ p["w1"]) @ p["w2"] * power

    return fn


def test_eager_calls_trace_once_per_signature():
    calls = []
    _, adapted, x = _setup()
    f = dora_jax.apply(_counting(calls))
    first = f(adapted, x)
    f(adapted, x + 1.0)
    assert len(calls) == 1  # same structure, shapes and dtypes: compiled program reused
    f(adapted, x[:2])
    assert len(calls) == 2  # new shape: traced again
    f(adapted, x, power=2)
    assert len(calls) == 3  # new static argument: traced again
    f(adapted, x, power=2)
    assert len(calls) == 3
    np.testing.assert_allclose(f(adapted, x), first, rtol=1e-6)


def test_eager_matches_reference_and_jit():
    params, adapted, x = _setup()
    node = adapted["w1"]
    w1 = ref.decompose(params["w1"] + ref.lora_delta(node.a, node.b, node.scale), node.magnitude)
    expected = jnp.tanh(x @ w1) @ params["w2"]
    f = dora_jax.apply(_counting([]))
    np.testing.assert_allclose(f(adapted, x), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(f)(adapted, x), expected, rtol=1e-5, atol=1e-6)
    # Gradients (traced into the caller's program, not cached) still flow.
    g = jax.grad(lambda a: f(a, x).sum())(adapted)
    assert float(jnp.abs(g["w1"].magnitude).sum()) > 0


def test_eager_dropout_keys():
    _, adapted, x = _setup(dropout=0.5)
    fn = _counting([])
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a1 = dora_jax.apply(fn, key=k1)(adapted, x)
    np.testing.assert_array_equal(dora_jax.apply(fn, key=k1)(adapted, x), a1)
    np.testing.assert_array_equal(jax.jit(dora_jax.apply(fn, key=k1))(adapted, x), a1)
    assert not np.allclose(dora_jax.apply(fn, key=k2)(adapted, x), a1)


def test_eager_strict_and_warnings():
    _, adapted, x = _setup()

    def uses_kernel_elementwise(p, x):
        return x @ jnp.abs(p["w1"])

    with pytest.warns(dora_jax.FallbackWarning):
        dora_jax.apply(uses_kernel_elementwise)(adapted, x)
    f = dora_jax.apply(uses_kernel_elementwise, strict=True)
    for _ in range(2):  # a failed trace is not cached: every call raises
        with pytest.raises(ValueError, match="strict=True"):
            f(adapted, x)
    g = dora_jax.apply(uses_kernel_elementwise)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        g(adapted, x)
        g(adapted, x)
    assert len([w for w in seen if issubclass(w.category, dora_jax.FallbackWarning)]) == 1


def test_eager_returns_passed_through_nodes_as_themselves():
    params, adapted, x = _setup()
    calls = []

    def fn(p, x):
        calls.append(1)
        return x @ p["w1"], p["w1"]

    f = dora_jax.apply(fn)
    for _ in range(2):  # traced on the first call, then the compiled program
        y, node = f(adapted, x)
        assert node is adapted["w1"]
        np.testing.assert_allclose(y, x @ dora_jax.merge(adapted)["w1"], rtol=1e-5, atol=1e-6)
    assert len(calls) == 1


def _reference(params, adapted, x, power=1):
    node = adapted["w1"]
    w1 = ref.decompose(params["w1"] + ref.lora_delta(node.a, node.b, node.scale), node.magnitude)
    return jnp.tanh(x @ w1) @ params["w2"] * power


def test_eager_static_object_compared_by_identity_is_read_every_call():
    """A plain config object (hashed by identity) is not a cache key: a changed attribute
    is seen. A static function (also identity-hashed) is code: it stays cached."""

    class Generation:
        temperature = 1.0

    params, adapted, x = _setup()
    calls = []
    counting = _counting(calls)
    f = dora_jax.apply(lambda p, x, cfg: counting(p, x) / cfg.temperature)
    cfg = Generation()
    np.testing.assert_allclose(f(adapted, x, cfg), _reference(params, adapted, x), rtol=1e-5)
    cfg.temperature = 0.5
    expected = _reference(params, adapted, x) / 0.5
    np.testing.assert_allclose(f(adapted, x, cfg), expected, rtol=1e-5)
    calls.clear()
    g = dora_jax.apply(lambda p, x, activation: activation(counting(p, x)))
    for _ in range(2):
        np.testing.assert_allclose(
            g(adapted, x, jnp.sin), jnp.sin(_reference(params, adapted, x)), rtol=1e-5
        )
    assert len(calls) == 1


def test_eager_cache_keeps_only_the_most_recently_used_programs(monkeypatch):
    monkeypatch.setattr(dora_jax.forward, "_PROGRAMS_KEPT", 3)
    params, adapted, x = _setup()
    calls = []
    f = dora_jax.apply(_counting(calls))
    for power in (1, 2, 3, 1, 4):  # 1 used again, so 2 is the least recently used
        np.testing.assert_allclose(
            f(adapted, x, power=power), _reference(params, adapted, x, power), rtol=1e-5
        )
    assert len(calls) == 4
    f(adapted, x, power=1)
    f(adapted, x, power=3)
    assert len(calls) == 4  # still kept
    f(adapted, x, power=2)
    assert len(calls) == 5  # evicted: traced again


def test_eager_warns_once_when_static_values_keep_compiling(monkeypatch):
    monkeypatch.setattr(dora_jax.forward, "_PROGRAMS_BEFORE_WARNING", 2)
    _, adapted, x = _setup()
    f = dora_jax.apply(_counting([]))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        f(adapted, x, power=1)
        f(adapted, x, power=2)
        f(adapted, x[:2], power=1)  # another structure (shape): its own count
        f(adapted, x, power=3)
        f(adapted, x, power=4)
        f(adapted, x, power=jnp.float32(5))  # an array: dynamic, no new program after this
        f(adapted, x, power=jnp.float32(6))
    messages = [str(w.message) for w in seen if "static" in str(w.message)]
    assert len(messages) == 1
    assert "3 programs" in messages[0] and "power" in messages[0]
    assert "jnp.asarray" in messages[0] and "jax.jit" in messages[0]
