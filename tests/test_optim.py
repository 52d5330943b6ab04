"""only_trainable: optax moves the trainable leaves only, the base stays bit-identical."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dora_jax
from tests.helpers import mlp_setup


@pytest.fixture(scope="module")
def setup():
    return mlp_setup()


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
