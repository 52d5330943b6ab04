"""The factored, scaled contraction of an adapted kernel: the maths of every adapted layer.

Every adapted contraction reduces to one shape (flattened by the caller)::

    u = x W0 + (((x' L) * d) R) * e        # x' = x after adapter dropout
    y = u * c                              # c = m / ||W0 + dW||_c (DoRA, Liu et al. 2024, Eq. 5)

with ``x (*stack, n, in)``, ``W0 (*stack, in, out)``, ``L ([*stack,] in, r)``,
``R ([*stack,] r, out)``, per-rank ``d`` and per-output ``e`` (VeRA; None for LoRA/DoRA)
and the per-output scale ``c (*stack, 1, out)`` (None for additive methods).

Autodiff differentiates it. The backward pass keeps ``x``, ``x' L`` and, for a scaled
(decomposed) method, ``u`` for the gradient of ``c``: one ``(n, out)`` array per projection
(and per layer of a scan) that LoRA does not keep. Measured alternatives (README,
"DoRA vs LoRA in scanned stacks"): a custom VJP that keeps the output ``y`` and recovers
``u = y / c`` keeps as much in a scan (the consumer keeps a reshape of ``y``, a separate
buffer) and defeats XLA's buffer sharing in unscanned models; recomputing ``x W0`` in the
backward pass brings scanned memory to LoRA's but costs 1.46x LoRA's step time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from dora_jax.adapters import Adapter, _pytree_dataclass, static

Array = jax.Array
KeepMask = Callable[[Array, tuple[int, ...], float], Array]


def _contract(h: Array, w: Array, stack: int, **kw) -> Array:
    """``(*stack, n, k) @ ([*stack,] k, m)``: ``w`` without stack axes is shared by all."""
    if w.ndim == 2 and stack:
        return lax.dot_general(h, w, (((stack + 1,), (0,)), ((), ())), **kw)
    s = tuple(range(stack))
    return lax.dot_general(h, w, (((stack + 1,), (stack,)), (s, s)), **kw)


def scaled_contraction(
    x: Array,
    base: Any,
    left: Array,
    mid: Array | None,
    right: Array,
    post: Array | None,
    scale: Array | None,
    key: Array | None,
    *,
    stack: int,
    dtype: Any,
    dropout: float = 0.0,
    keep_mask: KeepMask | None = None,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> Array:
    """``y = (x W0 + (((x' L) * d) R) * e) * c`` without forming ``W0 + dW``.

    Args:
      x: ``(*stack, n, in)`` activations, in ``dtype``.
      base: the frozen kernel, ``(*stack, in, out)``, or a pytree with ``dequantize()``
        returning the kernel (dequantised again in the backward pass, never saved).
      left, right: ``([*stack,] in, r)`` and ``([*stack,] r, out)``.
      mid, post: ``(*stack, 1, r)`` and ``(*stack, 1, out)`` scales, or None.
      scale: ``(*stack, 1, out)`` float32 output scale ``c``, or None (no scaling).
      key: PRNG key of the adapter dropout, or None (no dropout).
      stack: number of leading stack axes of ``x`` and ``base``.
      dtype: compute dtype of the contraction (the kernel's dtype as the model sees it).
      dropout: dropout rate on the low-rank branch's input.
      keep_mask: ``keep_mask(key, shape, rate)`` -> boolean keep-mask.
      precision, preferred_element_type: as in ``lax.dot_general``.

    Returns:
      ``y (*stack, n, out)`` in the contraction's dtype.
    """
    kw = {"precision": precision, "preferred_element_type": preferred_element_type}
    rate = dropout if key is not None else 0.0
    base_leaves, base_def = jax.tree.flatten(base)
    n_in, n_out = x.shape[-1], right.shape[-1]

    def kernel(leaves):
        w = jax.tree.unflatten(base_def, leaves)
        w = w.dequantize() if hasattr(w, "dequantize") else w
        return w.reshape(*x.shape[:stack], n_in, n_out).astype(dtype)

    def base_out(x, leaves):
        return _contract(x, kernel(leaves), stack, **kw)

    if hasattr(base, "dequantize"):
        # Dequantise again in the backward pass instead of saving the kernel: saved, the
        # dequantised kernels would form a full-precision copy of the base (QLoRA, QDoRA).
        base_out = jax.checkpoint(base_out)
    y = base_out(x, base_leaves)
    if rate:
        x = jnp.where(keep_mask(key, x.shape, rate), x / (1.0 - rate), 0).astype(x.dtype)
    h = _contract(x, left.astype(dtype), stack, **kw)
    if mid is not None:
        h = h * mid.astype(dtype)
    z = _contract(h, right.astype(dtype), stack, **kw)
    if post is not None:
        z = z * post.astype(dtype)
    y = y + z
    return y if scale is None else (y * scale).astype(y.dtype)


@_pytree_dataclass
class Factored(Adapter):
    """An adapted kernel as the pieces :func:`scaled_contraction` reads, scale precomputed.

    Carries an adapter into ``shard_map``: the scale ``c = m / ||W0 + dW||_c`` is computed
    outside from the whole kernel (a column norm over one shard of the input axes would be
    wrong), and every piece is sharded like the kernel axes it spans. Fields: ``base
    (*stack, *in, *out)``, ``left ([*stack,] *in, r)``, ``mid (*stack, r)`` or None,
    ``right ([*stack,] r, *out)``, ``post (*stack, *out)`` or None, ``scale (*stack, *out)``
    or None.
    """

    base: Array
    left: Array
    mid: Array | None
    right: Array
    post: Array | None
    scale: Array | None
    stack: int = static(0)
    inputs: int = static(1)
    dropout: float = static(0.0)

    @classmethod
    def of(cls, node: Adapter) -> Factored:
        """The pieces of ``node``, its output scale computed from its whole kernel."""
        left, mid, right, post = node.low_rank()
        return cls(
            node.base, left, mid, right, post, node.output_scale(),
            stack=node.stack, inputs=node.inputs, dropout=node.dropout,
        )  # fmt: skip

    def specs(self, kernel_spec: P) -> Factored:
        """Partition specs of the pieces, given the kernel's: each follows its axes."""
        ks = (*kernel_spec, *(None,) * (self.base.ndim - len(kernel_spec)))
        stack, ins, outs = (
            ks[: self.stack],
            ks[self.stack : self.stack + self.inputs],
            ks[self.stack + self.inputs :],
        )

        def own(x, *axes):  # shared pieces (VeRA) have no stack axes
            return None if x is None else P(*(stack if x.ndim > len(axes) else ()), *axes)

        return Factored(
            P(*ks), own(self.left, *ins, None), own(self.mid, None),
            own(self.right, None, *outs), own(self.post, *outs), own(self.scale, *outs),
            stack=self.stack, inputs=self.inputs, dropout=self.dropout,
        )  # fmt: skip

    def low_rank(self):
        return self.left, self.mid, self.right, self.post

    def output_scale(self, base: Array | None = None) -> Array | None:
        return self.scale

    def factors(self) -> tuple[Array, Array]:
        rank = self.left.shape[-1]
        left, right = self.left, self.right
        if self.mid is not None:
            left = left * self.mid.reshape(*self.stack_shape, *(1,) * self.inputs, rank)
        if self.post is not None:
            right = right * self.post.reshape(*self.stack_shape, 1, *self.out_shape)
        return left, right
