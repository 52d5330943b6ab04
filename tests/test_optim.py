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


def test_only_trainable_over_a_quantised_base_with_integer_gradients(setup):
    """grad(allow_int=True) gives the integer codes float0 gradients, which optax cannot add:
    only_trainable makes them no-op updates. Same steps as optimising the trainable half."""
    model, params, x = setup
    adapted = dora_jax.quantize_base(dora_jax.wrap(params, rank=4), "int8", block=4)
    fn = dora_jax.apply(model.apply)

    def loss(adapted):
        return jnp.mean((fn({"params": adapted}, x) - 1.0) ** 2)

    tx = dora_jax.only_trainable(optax.adam(1e-2))

    @jax.jit
    def step(adapted, state):
        grads = jax.grad(loss, allow_int=True)(adapted)
        updates, state = tx.update(grads, state, adapted)
        return optax.apply_updates(adapted, updates), state

    # The reference: adam over the trainable half alone, the frozen half never touched.
    frozen, trainable = dora_jax.partition(adapted)
    ref_tx = optax.adam(1e-2)

    @jax.jit
    def ref_step(trainable, state):
        grads = jax.grad(lambda t: loss(dora_jax.combine(frozen, t)))(trainable)
        updates, state = ref_tx.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state

    new, state = adapted, tx.init(adapted)
    ref, ref_state = trainable, ref_tx.init(trainable)
    for _ in range(3):
        new, state = step(new, state)
        ref, ref_state = ref_step(ref, ref_state)
    assert loss(new) < loss(adapted)
    new_frozen, new_trainable = dora_jax.partition(new)
    assert new_frozen["fc1"]["kernel"].base.codes.dtype == jnp.int8
    dtypes = lambda tree: jax.tree.map(lambda a: a.dtype, tree)  # noqa: E731
    assert dtypes(new_frozen) == dtypes(frozen)
    jax.tree.map(np.testing.assert_array_equal, new_frozen, frozen)  # bit-identical base
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), new_trainable, ref
    )
