"""optax helpers: optimise the trainable leaves of an adapted tree, nothing else."""

from __future__ import annotations

import jax
import numpy as np
import optax
from flax import nnx

from dora_jax.tree import trainable_mask


def _unboxed(tree):
    """``tree`` with each NNX ``Variable`` replaced by its value (other trees unchanged)."""
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    return jax.tree.map(lambda x: x.get_value() if is_var(x) else x, tree, is_leaf=is_var)


def _addable(update):
    """A ``float0`` gradient (``grad(allow_int=True)`` of integer leaves: quantised codes)
    as bool zeros: optax cannot add a float0, and a bool zero changes no leaf's dtype."""
    if getattr(update, "dtype", None) == jax.dtypes.float0:
        return np.zeros(update.shape, np.bool_)
    return update


def only_trainable(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Wraps ``tx`` to update only the trainable adapter leaves of a whole adapted tree.

    Frozen leaves (base kernels, biases, embeddings) get zero updates and no optimiser
    state, so ``optax.apply_updates`` leaves them bit-identical. Use it when you
    differentiate with respect to the whole adapted tree (:func:`dora_jax.apply` stops the
    gradient at the base kernels, so that costs no weight gradient). The alternative is to
    differentiate and optimise only the ``trainable`` half of :func:`dora_jax.partition`.

    Over a quantised base (:func:`dora_jax.quantize_base`) differentiate the whole tree with
    ``jax.grad(loss, allow_int=True)``: the integer codes then get ``float0`` gradients,
    which become zero updates of dtype bool (adding one changes neither value nor dtype), so
    ``optax.apply_updates`` leaves the codes bit-identical.

    It is also the optimiser for ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` over an
    adapted NNX model. NNX keeps optimiser state one array per ``Variable``, and a
    ``Param`` of an adapted model holds an adapter node, not an array: state built over
    the ``Param`` would come back from NNX's own state handling as an ``nnx.State`` after
    the first update. So the state is built over the values inside NNX ``Variable``\\ s:
    the adapter nodes' own arrays, each of which NNX then tracks on its own.

    Example::

      tx = dora_jax.only_trainable(optax.adamw(1e-4))
      opt_state = tx.init(adapted)
    """

    def labels(params):
        return jax.tree.map(lambda t: "train" if t else "freeze", trainable_mask(params))

    inner = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)

    def init(params):
        return inner.init(_unboxed(params))

    def update(updates, state, params=None, **extra):
        params = None if params is None else _unboxed(params)
        updates_in = jax.tree.map(_addable, _unboxed(updates))
        new, state = inner.update(updates_in, state, params, **extra)
        # Back into the structure of the updates given (NNX Variables included).
        return jax.tree.unflatten(jax.tree.structure(updates), jax.tree.leaves(new)), state

    return optax.GradientTransformationExtraArgs(init, update)
