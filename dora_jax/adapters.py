"""Adapter kinds as pytree nodes: their leaves and their maths, nothing about trees.

Every adapted kernel ``W0`` (Flax layout ``(*stack, *in, *out)``) becomes one node. A node
answers the same few questions whatever its kind:

- ``factors()``: ``(L, R)`` with ``L: (*stack, *in, r)`` and ``R: (*stack, r, *out)`` such
  that the weight update is ``dW = L R`` (contracted over ``r``, scale folded into ``R``);
- ``low_rank()``: the same update as ``dW = L diag(d) R diag(e)`` in the form the forward
  pass evaluates cheapest (``d``, ``e`` per-rank and per-output scales or None; ``L``/``R``
  without stack axes when shared by every layer);
- ``output_scale()``: ``None`` for additive methods, ``m / ||W0 + dW||_c`` for decomposed
  ones (DoRA, Liu et al. 2024, Eq. 5), shape ``(*stack, *out)``, float32;
- ``materialise()``: the adapted kernel ``W'`` in the base dtype (maths in float32).

Code that walks a tree asks the node; it never switches on the method's name.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

# Clamp for the squared column norm before the sqrt: keeps the division finite if a
# column of W0 + dW is (numerically) zero.
NORM_EPS = 1e-12


def _pytree_dataclass(cls):
    """Registers a frozen dataclass as a pytree: array fields are children, the rest aux."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    data = [f.name for f in dataclasses.fields(cls) if f.metadata.get("static") is not True]
    meta = [f.name for f in dataclasses.fields(cls) if f.metadata.get("static") is True]
    return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)


def static(default: Any = dataclasses.MISSING):
    """A dataclass field that is pytree metadata (hashable, not traced)."""
    return dataclasses.field(default=default, metadata={"static": True})


def _prod(shape) -> int:
    return math.prod(int(d) for d in shape)


def column_norm_sq(base: Array, left: Array, right: Array, stack: int, inputs: int) -> Array:
    """``||W0 + L R||_c^2`` per output feature without forming ``W0 + L R``.

    Expands the square (docs/conventions.md):
    ``||W0||^2 + 2 sum_r(R * (L^T W0)) + sum_r(R * ((L^T L) R))``. Every product contracts
    the input axes first, so no temporary of the kernel's size exists; all maths in float32
    (bf16 bases are read in their own dtype and accumulated in float32). Loses accuracy when
    the update nearly cancels the base, and overflows beyond ~1e19: :func:`column_norm`
    guards both.

    Args:
      base: ``(*stack, *in, *out)``.
      left: ``(*stack, *in, r)``.
      right: ``(*stack, r, *out)`` (scale already folded in).
      stack, inputs: number of leading stack axes and of input axes.

    Returns:
      ``(*stack, *out)`` float32.
    """
    w_sq, cross, quad = _norm_terms(base, left, right, stack, inputs)
    return (w_sq + 2.0 * cross + quad).reshape(base.shape[:stack] + base.shape[stack + inputs :])


def _flat3(base, left, right, stack, inputs):
    """``(*stack, in, out)``, ``(*stack, in, r)``, ``(*stack, r, out)`` views, factors f32."""
    stack_shape = base.shape[:stack]
    n_in, n_out = _prod(base.shape[stack : stack + inputs]), _prod(base.shape[stack + inputs :])
    rank = left.shape[-1]
    w = base.reshape(*stack_shape, n_in, n_out)
    a = left.astype(jnp.float32).reshape(*stack_shape, n_in, rank)
    b = right.astype(jnp.float32).reshape(*stack_shape, rank, n_out)
    return w, a, b


def _norm_terms(base, left, right, stack, inputs):
    """``||W0||^2``, ``sum_r(R * (L^T W0))`` and ``sum_r(R * ((L^T L) R))``, ``(*stack, out)``."""
    f32 = jnp.float32
    w, a, b = _flat3(base, left, right, stack, inputs)
    s = tuple(range(stack))
    # Batched dot products instead of square-then-sum keep the jaxpr free of kernel-sized
    # intermediates (and read a bf16 base directly with float32 accumulation).
    w_sq = lax.dot_general(
        w, w, (((stack,), (stack,)), (s + (stack + 1,), s + (stack + 1,))),
        preferred_element_type=f32,
    )  # fmt: skip
    a_w = lax.dot_general(
        a, w, (((stack,), (stack,)), (s, s)), preferred_element_type=f32
    )  # (*stack, r, out)
    a_a = lax.dot_general(a, a, (((stack,), (stack,)), (s, s)))  # (*stack, r, r)
    cross = jnp.sum(b * a_w, axis=-2)
    quad = jnp.sum(b * jnp.matmul(a_a, b), axis=-2)
    return w_sq, cross, quad


# The expansion is used where its terms exceed the squared norm by at most this factor: its
# float32 rounding errors (relative ~1e-7 on each term) then stay below ~1e-4 of the norm.
CANCELLATION_LIMIT = 1024.0


def column_norm(base: Array, left: Array, right: Array, stack: int, inputs: int) -> Array:
    """``||W0 + L R||_c`` per output feature, float32, accurate where the expansion is not.

    By the factored expansion (:func:`column_norm_sq`) wherever it is accurate. Where it is
    not, by a direct sum over blocks of input rows with a running per-column scale (as
    LAPACK's ``nrm2``; no kernel-sized temporary): when the update nearly cancels the base
    (the terms exceed the squared norm by more than :data:`CANCELLATION_LIMIT`, e.g.
    ``dW = -0.999 W0``, where the expansion loses ~13%; the cancellation the factored norm
    of Zelenin & Zhuravlyova, "Scaling DoRA", 2026, guards against), or when a squared
    norm overflows float32 (entries beyond ~1e18). The check costs ``O(out)``; the direct
    path runs only for a kernel that needs it.

    Returns:
      ``(*stack, *out)`` float32.
    """
    w_sq, cross, quad = _norm_terms(base, left, right, stack, inputs)
    norm_sq = w_sq + 2.0 * cross + quad
    size = w_sq + 2.0 * jnp.abs(cross) + quad
    accurate = jnp.all(jnp.isfinite(size) & (size <= CANCELLATION_LIMIT * jnp.maximum(norm_sq, 0)))
    norm = lax.cond(
        accurate,
        lambda: jnp.sqrt(jnp.maximum(norm_sq, NORM_EPS)),
        lambda: _direct_column_norm(base, left, right, stack, inputs),
    )
    return norm.reshape(base.shape[:stack] + base.shape[stack + inputs :])


def _direct_column_norm(base, left, right, stack: int, inputs: int) -> Array:
    """``||W0 + L R||_c`` summed over blocks of input rows, scaled per column, ``(*stack, out)``."""
    w, a, b = _flat3(base, left, right, stack, inputs)
    n_in = w.shape[stack]
    # The largest divisor of n_in up to 256 and below n_in: blocks never of the kernel's size.
    rows = max([d for d in range(1, min(256, max(1, n_in // 2)) + 1) if n_in % d == 0])
    s = tuple(range(stack))

    def block(i, carry):
        scale, ssq = carry
        w_i = lax.dynamic_slice_in_dim(w, i * rows, rows, axis=stack).astype(jnp.float32)
        a_i = lax.dynamic_slice_in_dim(a, i * rows, rows, axis=stack)
        v = w_i + lax.dot_general(a_i, b, (((stack + 1,), (stack,)), (s, s)))
        new = jnp.maximum(scale, jnp.max(jnp.abs(v), axis=stack))
        safe = jnp.where(new > 0, new, 1.0)
        ssq = ssq * jnp.square(scale / safe)
        ssq = ssq + jnp.sum(jnp.square(v / jnp.expand_dims(safe, stack)), axis=stack)
        return new, ssq

    zeros = jnp.zeros(w.shape[:stack] + w.shape[stack + 1 :], jnp.float32)
    scale, ssq = lax.fori_loop(0, n_in // rows, block, (zeros, zeros))
    return scale * jnp.sqrt(jnp.maximum(ssq, NORM_EPS))


def safe_norm(x: Array, axis: tuple[int, ...]) -> Array:
    """The L2 norm over ``axis`` in float32, scaled by the largest entry where squaring
    would overflow (kernels with entries beyond ~1e18)."""
    x = x.astype(jnp.float32)
    plain = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis))
    peak = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
    peak = jnp.where(peak > 0, peak, 1.0)
    scaled = jnp.squeeze(peak, axis) * jnp.sqrt(jnp.sum(jnp.square(x / peak), axis=axis))
    return jnp.where(jnp.isfinite(plain), plain, scaled)


class Adapter:
    """Base class of every adapter node.

    Subclasses are frozen pytree dataclasses with a ``base`` field (the frozen kernel) and
    the static fields ``stack`` and ``inputs`` (counts of leading stack axes and of input
    axes of ``base``). They list their trainable fields in ``trainable``.
    """

    trainable: ClassVar[tuple[str, ...]] = ()
    base: Array
    stack: int
    inputs: int
    dropout: float

    def __jax_array__(self):
        # jax calls this when a node reaches an operation as if it were an array: the model
        # was called with adapted params directly.
        raise TypeError(
            f"An adapter node ({type(self).__name__}, base {tuple(self.base.shape)}) was used "
            f"as an array: call the model through dora_jax.apply, e.g. "
            f"dora_jax.apply(model.apply)({{'params': adapted}}, x), or merge first with "
            f"dora_jax.merge(adapted)."
        )

    # --- what every kind answers -------------------------------------------------------
    def factors(self) -> tuple[Array, Array]:
        raise NotImplementedError

    def low_rank(self) -> tuple[Array, Array | None, Array, Array | None]:
        """``(L, d, R, e)`` with ``dW = L diag(d) R diag(e)``, for the factored forward.

        ``L: ([*stack,] *in, r)`` and ``R: ([*stack,] r, *out)`` (no stack axes when one
        matrix serves every layer of a stack); ``d: (*stack, r)`` and ``e: (*stack, *out)``
        or None. The forward computes ``(((x L) * d) R) * e``: scaling activations instead
        of folding ``d``/``e`` into ``L``/``R`` keeps the backward pass from forming weight
        gradients of ``L``/``R``'s size when only the scales train (VeRA).
        """
        left, right = self.factors()
        return left, None, right, None

    def output_scale(self, base: Array | None = None) -> Array | None:
        """Per-output-feature factor applied after the contraction, or None."""
        return None

    @property
    def rank(self) -> int:
        return self.factors()[0].shape[-1]

    # --- shapes ---------------------------------------------------------------------
    @property
    def stack_shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape[: self.stack])

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape[self.stack : self.stack + self.inputs])

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape[self.stack + self.inputs :])

    def dequantised_base(self) -> Array:
        """The frozen kernel as an array: a quantised base (anything with ``dequantize()``)
        is dequantised here, one kernel at a time, when a forward needs it."""
        return self.base.dequantize() if hasattr(self.base, "dequantize") else self.base

    # --- derived maths ----------------------------------------------------------------
    def delta(self) -> Array:
        """``dW = L R`` in float32, shape of the kernel. Forms a kernel-sized array."""
        left, right = self.factors()
        n_in, n_out, r = _prod(self.in_shape), _prod(self.out_shape), left.shape[-1]
        left = left.astype(jnp.float32).reshape(*self.stack_shape, n_in, r)
        right = right.astype(jnp.float32).reshape(*self.stack_shape, r, n_out)
        return jnp.matmul(left, right).reshape(self.base.shape)

    def materialise(self) -> Array:
        """The adapted kernel ``W'`` in the base dtype, maths in float32.

        Forms kernel-sized arrays: meant for ``merge`` and for uses of the kernel that the
        factored forward does not handle.
        """
        base = self.dequantised_base()
        v = base.astype(jnp.float32) + self.delta()
        scale = self.output_scale(base)
        if scale is not None:
            scale = scale.reshape(*self.stack_shape, *(1,) * self.inputs, *self.out_shape)
            v = v * scale
        return v.astype(base.dtype)


class _Decomposed(Adapter):
    """Magnitude/direction decomposition shared by DoRA and DVoRA (Liu et al. 2024, Eq. 5).

    ``W' = m * (W0 + dW) / ||W0 + dW||_c``. The norm is a constant for differentiation
    unless ``exact_norm_grad`` (Sec. 4.3; the exact gradient is the paper's ablation).
    """

    magnitude: Array
    exact_norm_grad: bool

    def weight_norm(self, base: Array | None = None) -> Array:
        """``||W0 + dW||_c`` by the factored formula, float32, shape ``(*stack, *out)``."""
        base = self.dequantised_base() if base is None else base
        left, right = self.factors()
        norm = column_norm(base, left, right, self.stack, self.inputs)
        norm = jnp.maximum(norm, math.sqrt(NORM_EPS))
        return norm if self.exact_norm_grad else lax.stop_gradient(norm)

    def output_scale(self, base: Array | None = None) -> Array:
        return self.magnitude.astype(jnp.float32) / self.weight_norm(base)


@_pytree_dataclass
class LoRA(Adapter):
    """LoRA (Hu et al. 2022): ``W' = W0 + s A B``.

    Fields: ``base (*stack, *in, *out)`` frozen; ``a (*stack, *in, r)`` and
    ``b (*stack, r, *out)`` trainable; ``scale`` is ``s = alpha / r``.
    """

    trainable: ClassVar[tuple[str, ...]] = ("a", "b")
    base: Array
    a: Array
    b: Array
    scale: float = static()
    stack: int = static(0)
    inputs: int = static(1)
    dropout: float = static(0.0)

    def factors(self) -> tuple[Array, Array]:
        return self.a, self.b * jnp.asarray(self.scale, self.b.dtype)


@_pytree_dataclass
class DoRA(_Decomposed):
    """DoRA (Liu et al. 2024): ``W' = m (W0 + s A B) / ||W0 + s A B||_c``.

    Fields as :class:`LoRA` plus ``magnitude (*stack, *out)``, trainable, initialised to
    ``||W0||_c``.
    """

    trainable: ClassVar[tuple[str, ...]] = ("a", "b", "magnitude")
    base: Array
    a: Array
    b: Array
    magnitude: Array
    scale: float = static()
    stack: int = static(0)
    inputs: int = static(1)
    dropout: float = static(0.0)
    exact_norm_grad: bool = static(False)

    def factors(self) -> tuple[Array, Array]:
        return self.a, self.b * jnp.asarray(self.scale, self.b.dtype)


class _SharedRandomFactors(Adapter):
    """VeRA's update (Kopiczko et al. 2024): ``dW = A_s diag(d) B_s diag(b)``.

    ``A_s (in_max, r)`` and ``B_s (r, out_max)`` are frozen random matrices shared by every
    adapted kernel (the same arrays in every node); a kernel uses ``A_s[:in]`` and
    ``B_s[:, :out]`` of its flattened input and output sizes. Only ``d (*stack, r)`` and
    ``b (*stack, *out)`` are trained.
    """

    shared: ClassVar[tuple[str, ...]] = ("shared_a", "shared_b")
    shared_a: Array
    shared_b: Array
    d: Array
    b: Array

    def low_rank(self) -> tuple[Array, Array, Array, Array]:
        rank = self.shared_a.shape[-1]
        n_in, n_out = _prod(self.in_shape), _prod(self.out_shape)
        a = self.shared_a[:n_in].reshape(*self.in_shape, rank)
        b = self.shared_b[:, :n_out].reshape(rank, *self.out_shape)
        return a, self.d, b, self.b

    def factors(self) -> tuple[Array, Array]:
        a, _, b, _ = self.low_rank()
        rank = a.shape[-1]
        d = self.d.reshape(*self.stack_shape, *(1,) * self.inputs, rank)
        scale_out = self.b.reshape(*self.stack_shape, 1, *self.out_shape)
        return a * d.astype(a.dtype), b * scale_out.astype(b.dtype)


@_pytree_dataclass
class VeRA(_SharedRandomFactors):
    """VeRA (Kopiczko et al. 2024): ``W' = W0 + A_s diag(d) B_s diag(b)``.

    Fields: ``base`` frozen; ``shared_a (in_max, r)``, ``shared_b (r, out_max)`` frozen and
    shared by all nodes; ``d (*stack, r)`` (init 0.1) and ``b (*stack, *out)`` (init 0)
    trainable. No alpha.
    """

    trainable: ClassVar[tuple[str, ...]] = ("d", "b")
    base: Array
    shared_a: Array
    shared_b: Array
    d: Array
    b: Array
    stack: int = static(0)
    inputs: int = static(1)
    dropout: float = static(0.0)


@_pytree_dataclass
class DVoRA(_SharedRandomFactors, _Decomposed):
    """DVoRA (Liu et al. 2024, Sec. 5.6): DoRA's decomposition over VeRA's update.

    ``W' = m (W0 + dW) / ||W0 + dW||_c`` with ``dW = A_s diag(d) B_s diag(b)``; trainable
    ``magnitude``, ``d`` and ``b``.
    """

    trainable: ClassVar[tuple[str, ...]] = ("d", "b", "magnitude")
    base: Array
    shared_a: Array
    shared_b: Array
    d: Array
    b: Array
    magnitude: Array
    stack: int = static(0)
    inputs: int = static(1)
    dropout: float = static(0.0)
    exact_norm_grad: bool = static(False)


def is_adapter(x: Any) -> bool:
    """True for an adapter node (use as ``is_leaf`` when mapping over adapted trees)."""
    return isinstance(x, Adapter)
