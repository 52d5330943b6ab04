"""The shared train step and log-prob builder against plain optax / jnp written here."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dora_jax
from dora_jax.experiments import training

V, D = 11, 6


def toy_apply(variables, tokens, attention_mask=None, positions=None, logits_at=None):
    """A bigram LM: embedding then a Dense kernel; ``logits_at`` gathers positions."""
    del attention_mask, positions
    p = variables["params"]
    h = p["embed"][tokens]
    if logits_at is not None:
        h = jnp.take_along_axis(h, logits_at[..., None], axis=1)
    return h @ p["out"]["kernel"]


def toy_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "embed": jax.random.normal(k1, (V, D)),
        "out": {"kernel": jax.random.normal(k2, (D, V))},
    }


BATCH = {
    "tokens": jnp.array([[1, 2, 3, 4], [5, 6, 7, 0]], jnp.int32),
    "positions": jnp.array([[0, 1, 0, 1], [0, 1, 2, 0]], jnp.int32),
    "segments": jnp.array([[1, 1, 2, 2], [1, 1, 1, 0]], jnp.int32),
    "branches": jnp.zeros((2, 4), jnp.int32),
    "sources": jnp.array([[0, 2], [1, 0]], jnp.int32),
    "targets": jnp.array([[2, 4], [7, 0]], jnp.int32),
    "weights": jnp.array([[1.0, 1.0], [1.0, 0.0]], jnp.float32),
}


def plain_loss(params):
    """Cross-entropy of targets 2|1, 4|3, 7|6 (weight-0 entry left out), by hand."""
    logits = params["embed"][jnp.array([1, 3, 6])] @ params["out"]["kernel"]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -(logp[0, 2] + logp[1, 4] + logp[2, 7]) / 3


def test_lm_loss_matches_hand_written():
    params = toy_params()
    got = training.lm_loss(toy_apply, {"params": params}, BATCH)
    np.testing.assert_allclose(got, plain_loss(params), rtol=1e-6)


@pytest.mark.parametrize("jit", [True, False])
def test_full_fine_tuning_step_is_one_adamw_step(jit):
    params = toy_params()
    tx = optax.adamw(1e-2)
    step = training.make_train_step(toy_apply, tx, adapted=False, jit=jit)
    new, _, loss = step(params, tx.init(params), None, BATCH, jax.random.key(0))
    grads = jax.grad(plain_loss)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    want = optax.apply_updates(params, updates)
    np.testing.assert_allclose(loss, plain_loss(params), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_adapted_step_trains_only_the_adapter():
    params = toy_params()
    adapted = dora_jax.wrap(params, rank=2, method="lora", key=jax.random.key(3))
    frozen, trainable = dora_jax.partition(adapted)
    # Move B off zero so that A gets a gradient too (not by a constant: the softmax's
    # gradient sums to zero over the vocabulary, so a constant B would give A none).
    trainable = jax.tree.map(lambda x: x + 0.3 * jnp.cos(jnp.arange(x.size)).reshape(x.shape),
                             trainable)  # fmt: skip
    tx = optax.adam(1e-2)
    step = training.make_train_step(toy_apply, tx)
    new, _, loss = step(trainable, tx.init(trainable), frozen, BATCH, jax.random.key(0))

    def lora_loss(t):  # W' = W0 + s A B written out
        node = dora_jax.combine(frozen, t)["out"]["kernel"]
        kernel = node.base + node.scale * t["out"]["kernel"].a @ t["out"]["kernel"].b
        return plain_loss({"embed": params["embed"], "out": {"kernel": kernel}})

    grads = jax.grad(lora_loss)(trainable)
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    want = optax.apply_updates(trainable, updates)
    np.testing.assert_allclose(loss, lora_loss(trainable), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_make_logprob_fn_matches_numpy():
    params = toy_params()
    got = np.asarray(training.make_logprob_fn(toy_apply)(params, BATCH))
    e, k = np.asarray(params["embed"], np.float64), np.asarray(params["out"]["kernel"], np.float64)
    tokens, src, tgt = (np.asarray(BATCH[x]) for x in ("tokens", "sources", "targets"))
    logits = e[np.take_along_axis(tokens, src, axis=1)] @ k
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = np.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_optimizer_warms_up_then_decays():
    tx = training.optimizer(1.0, steps=20)
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    sizes = []
    for _ in range(20):
        updates, state = tx.update({"w": jnp.ones(())}, state, params)
        sizes.append(-float(updates["w"]))
    assert sizes[0] == 0.0 and sizes[1] > 0 and max(sizes) == pytest.approx(1.0, rel=1e-3)
    assert sizes[-1] < 0.2 and sizes == sorted(sizes[:3]) + sizes[3:]


def test_min_steps_is_the_first_step_that_trains():
    """The scripts refuse fewer than MIN_STEPS steps: below it the schedule moves nothing."""
    for steps in (1, training.MIN_STEPS):
        tx = training.optimizer(1.0, steps=steps)
        params = {"w": jnp.zeros(())}
        state = tx.init(params)
        sizes = []
        for _ in range(steps):
            updates, state = tx.update({"w": jnp.ones(())}, state, params)
            sizes.append(-float(updates["w"]))
        assert (sum(sizes) > 0) == (steps >= training.MIN_STEPS)


def test_comma_list_and_checks_are_argparse_errors(capsys):
    import argparse

    p = argparse.ArgumentParser(prog="x")
    assert training.comma_list(p, "--seeds", " 1,2 ", kind=int) == [1, 2]
    cases = [("1,,2", "an empty entry"), ("1,a", "'a' is not an integer"),
             ("1,1", "--seeds names '1' twice"), ("3", "unknown seed '3'")]  # fmt: skip
    for text, message in cases:
        with pytest.raises(SystemExit):
            training.comma_list(p, "--seeds", text, kind=int, choices=(1, 2))
        assert message in capsys.readouterr().err
    for check, args, message in [
        (training.check_steps, (p, 1), "--steps 1: the first step of the warm-up"),
        (training.check_positive, (p, "--lr", -1.0), "--lr -1.0: must be a positive number"),
    ]:
        with pytest.raises(SystemExit):
            check(*args)
        assert message in capsys.readouterr().err
