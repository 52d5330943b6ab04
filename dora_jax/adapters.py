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
import functools
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

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

    Expands the square (shared/CONVENTIONS.md):
    ``||W0||^2 + 2 sum_r(R * (L^T W0)) + sum_r(R * ((L^T L) R))``. Every product contracts
    the input axes first, so no temporary of the kernel's size exists; all maths in float32
    (bf16 bases are read in their own dtype and accumulated in float32).

    Args:
      base: ``(*stack, *in, *out)``.
      left: ``(*stack, *in, r)``.
      right: ``(*stack, r, *out)`` (scale already folded in).
      stack, inputs: number of leading stack axes and of input axes.

    Returns:
      ``(*stack, *out)`` float32.
    """
    f32 = jnp.float32
    stack_shape = base.shape[:stack]
    in_shape = base.shape[stack : stack + inputs]
    out_shape = base.shape[stack + inputs :]
    n_in, n_out = _prod(in_shape), _prod(out_shape)
    rank = left.shape[-1]
    w = base.reshape(*stack_shape, n_in, n_out)
    a = left.astype(f32).reshape(*stack_shape, n_in, rank)
    b = right.astype(f32).reshape(*stack_shape, rank, n_out)
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
    norm_sq = w_sq + 2.0 * cross + quad
    return norm_sq.reshape(*stack_shape, *out_shape)


def _sharded_like(fn, like: Array, *inputs):
    """``fn(*inputs)``, its result sharded like ``like``, also on ``Explicit`` mesh axes.

    Under ``Explicit`` axis types (``jax.make_mesh``'s default) a contraction over a sharded
    input axis must name its output's sharding; the norm's maths then runs with the axes
    made ``Auto`` and its result takes ``like``'s sharding (the magnitude's).
    """
    mesh = None
    for x in jax.tree.leaves(inputs):
        m = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
        if any(t == jax.sharding.AxisType.Explicit for t in getattr(m, "axis_types", ())):
            mesh = m
            break
    if mesh is None:
        return fn(*inputs)
    spec = getattr(getattr(jax.typeof(like), "sharding", None), "spec", None) or P()
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.sharding.auto_axes(fn, out_sharding=NamedSharding(mesh, spec))(*inputs)


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
        norm_sq = _sharded_like(
            functools.partial(column_norm_sq, stack=self.stack, inputs=self.inputs),
            self.magnitude, base, left, right,
        )  # fmt: skip
        norm = jnp.sqrt(jnp.maximum(norm_sq, NORM_EPS))
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
