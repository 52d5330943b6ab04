"""Adapter kinds as pytree nodes: their leaves and their maths, nothing about trees.

Every adapted kernel ``W0`` becomes one node. The kernel keeps its own layout (its stack,
input and output axes may sit at any positions, stored as the node's static ``stack`` and
``inputs`` position tuples); the adapter leaves always use the canonical layout
``A (*stack, *in, r)``, ``B (*stack, r, *out)``, ``magnitude (*stack, *out)``, each group of
axes in the kernel's axis order. A node answers the same few questions whatever its kind:

- ``factors()``: ``(L, R)`` with ``L: (*stack, *in, r)`` and ``R: (*stack, r, *out)`` such
  that the weight update is ``dW = L R`` (contracted over ``r``, scale folded into ``R``);
- ``low_rank()``: the same update as ``dW = L diag(d) R diag(e)`` in the form the forward
  pass evaluates cheapest (``d``, ``e`` per-rank and per-output scales or None; ``L``/``R``
  without stack axes when shared by every layer);
- ``output_scale()``: ``None`` for additive methods, ``m / ||W0 + dW||_c`` for decomposed
  ones (DoRA, Liu et al. 2024, Eq. 5), shape ``(*stack, *out)``, float32;
- ``materialise()``: the adapted kernel ``W'`` in the base dtype (maths in float32).

Each kind also owns its initialisation from a kernel (:meth:`Adapter.init`), its trainable
and shared fields and the sharding layout of its leaves (``layout``). Code that walks a tree
asks the node; it never switches on the method's name.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from jax import export, lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dora_jax.axes import Axes

Array = jax.Array

# Clamp for the squared column norm before the sqrt (float32's smallest normal number): keeps
# the division finite, and the sqrt's gradient too, if a column of W0 + dW is zero. Being no
# larger, it leaves every representable norm as it is (a clamp at 1e-12 scaled columns of
# norm 1e-7 by 0.79: kernels of tiny weights, pruned units).
NORM_EPS = float(jnp.finfo(jnp.float32).tiny)
# Squared norms below this go to the scaled direct sum: the expansion's squares of entries
# near 1e-19 reach float32's subnormal range, where precision is lost.
_SMALL_NORM_SQ = 1e-30


def _pytree_dataclass(cls):
    """Registers a frozen dataclass as a pytree (array fields are children, the rest aux)
    and with ``flax.serialization`` (``to_bytes``/``from_bytes``, ``to_state_dict``: the
    array fields by name; the static ones come from the target when restoring)."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    data = [f.name for f in dataclasses.fields(cls) if f.metadata.get("static") is not True]
    meta = [f.name for f in dataclasses.fields(cls) if f.metadata.get("static") is True]

    def to_state(node) -> dict:
        return {
            name: serialization.to_state_dict(getattr(node, name))
            for name in data if getattr(node, name) is not None
        }  # fmt: skip

    def from_state(target, state: dict):
        """Also refuses an array field of another shape or dtype than the target's (a
        template of another rank or dtype). The scale (alpha, rslora) is static, so not in
        the state: a template of another alpha cannot be told apart here."""
        fields = [name for name in data if getattr(target, name) is not None]
        if set(state) != set(fields):
            raise ValueError(
                f"Cannot restore a {cls.__name__} with fields {sorted(fields)} from a state "
                f"with {sorted(state)}: restore into the adapted tree it was saved from "
                f"(the same wrap settings)."
            )
        for name in fields:
            want, got = getattr(target, name), state[name]
            if dataclasses.is_dataclass(want) or not hasattr(want, "dtype"):
                continue  # a nested node (a quantised base) checks its own fields
            saved = (tuple(jnp.shape(got)), str(getattr(got, "dtype", type(got).__name__)))
            if saved != (tuple(want.shape), str(want.dtype)):
                raise ValueError(
                    f"Cannot restore field '{name}' of a {cls.__name__}: the state holds shape "
                    f"{saved[0]} {saved[1]}, the target {tuple(want.shape)} {want.dtype}. Wrap "
                    f"the template with the settings the state was saved with (rank, dtype, "
                    f"targets, axes; and the same alpha and rslora, which the state does not "
                    f"record)."
                )
        return dataclasses.replace(target, **{
            name: serialization.from_state_dict(getattr(target, name), state[name], name=name)
            for name in fields
        })  # fmt: skip

    serialization.register_serialization_state(cls, to_state, from_state)
    cls = jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)
    _register_export(cls, meta)
    NODE_TYPES.append(cls)
    return cls


# Every class registered by _pytree_dataclass: the adapter kinds and a quantised base.
NODE_TYPES: list[type] = []


def _register_export(cls, meta: list[str]) -> None:
    """Registers ``cls`` for ``jax.export`` serialisation (``Exported.serialize()`` writes
    the in/out trees of an exported function) as ``dora_jax.<class name>``. The aux data
    (the static fields' values, in ``meta`` order) is written as JSON by field name with a
    type tag on every value, so it reads back equal (a tuple stays a tuple, a dtype a
    dtype) and a field added later with a default reads old files."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.name in meta}

    def serialize(aux: tuple) -> bytes:
        fields = {name: _tagged(value, f"{cls.__name__}.{name}") for name, value in zip(meta, aux)}
        return json.dumps({"version": 1, "fields": fields}).encode()

    def deserialize(data: bytes) -> tuple:
        record = json.loads(data)
        fields = record.get("fields", {})
        unknown = sorted(set(fields) - set(meta))
        lacking = [n for n in meta if n not in fields and defaults[n] is dataclasses.MISSING]
        if record.get("version") != 1 or unknown or lacking:
            raise ValueError(
                f"Cannot read the static fields of a serialised dora_jax.{cls.__name__} "
                f"(version {record.get('version')}, unknown fields {unknown}, missing "
                f"{lacking}): it was written by another dora_jax version."
            )
        return tuple(_untagged(fields[n]) if n in fields else defaults[n] for n in meta)

    export.register_pytree_node_serialization(
        cls,
        serialized_name=f"dora_jax.{cls.__name__}",
        serialize_auxdata=serialize,
        deserialize_auxdata=deserialize,
    )


def _tagged(value: Any, where: str) -> list:
    """``[tag, payload]`` JSON for a static field's value; :func:`_untagged` inverts it."""
    if value is None:
        return ["none", None]
    if isinstance(value, bool):
        return ["bool", value]
    if isinstance(value, int) and not isinstance(value, np.generic):
        return ["int", value]
    if isinstance(value, float) and not isinstance(value, np.generic):
        return ["float", value.hex()]  # exact, nan, inf and -0.0 included
    if isinstance(value, str):
        return ["str", value]
    if isinstance(value, tuple | list):
        items = [_tagged(v, where) for v in value]
        return ["tuple" if isinstance(value, tuple) else "list", items]
    if isinstance(value, np.dtype):
        return ["dtype", value.name]
    if isinstance(value, type) and issubclass(value, np.generic):
        return ["scalar_type", np.dtype(value).name]
    if isinstance(value, np.generic):  # a numpy scalar: its dtype and its value
        return ["scalar", [value.dtype.name, _tagged(value.item(), where)]]
    raise TypeError(
        f"Cannot serialise the static field {where}={value!r} ({type(value).__name__}) for "
        f"jax.export: static fields hold None, bools, ints, floats, strings, tuples, dtypes."
    )


def _untagged(item: list) -> Any:
    tag, payload = item
    if tag in ("none", "bool", "int", "str"):
        return payload
    if tag == "float":
        return float.fromhex(payload)
    if tag in ("tuple", "list"):
        items = [_untagged(v) for v in payload]
        return tuple(items) if tag == "tuple" else items
    if tag == "dtype":
        return np.dtype(payload)
    if tag == "scalar_type":
        return np.dtype(payload).type
    if tag == "scalar":
        return np.dtype(payload[0]).type(_untagged(payload[1]))
    raise ValueError(f"Unknown tag {tag!r} in a serialised dora_jax node's static fields.")


def static(default: Any = dataclasses.MISSING):
    """A dataclass field that is pytree metadata (hashable, not traced)."""
    return dataclasses.field(default=default, metadata={"static": True})


def _prod(shape) -> int:
    return math.prod(int(d) for d in shape)


def _positions(ndim: int, stack, inputs) -> tuple[tuple[int, ...], ...]:
    """``(stack, inputs, outputs)`` kernel positions from ints (legacy counts) or tuples."""
    return Axes(stack, inputs).split(ndim)


def canonical_order(ndim: int, stack, inputs) -> tuple[int, ...]:
    """Kernel positions in the canonical order ``(*stack, *in, *out)``."""
    s, i, o = _positions(ndim, stack, inputs)
    return s + i + o


def column_norm_sq(base: Array, left: Array, right: Array, stack=0, inputs=1) -> Array:
    """``||W0 + L R||_c^2`` per output feature without forming ``W0 + L R``.

    Expands the square (docs/conventions.md):
    ``||W0||^2 + 2 sum_r(R * (L^T W0)) + sum_r(R * ((L^T L) R))``. Every product contracts
    the input axes first, so no temporary of the kernel's size exists; all maths in float32
    (bf16 bases are read in their own dtype and accumulated in float32). The kernel is read
    in its own layout (no transposed copy). Loses accuracy when the update nearly cancels the
    base, and overflows beyond ~1e19: :func:`column_norm` guards both.

    Args:
      base: the kernel, its axes at any positions.
      left: ``(*stack, *in, r)``.
      right: ``(*stack, r, *out)`` (scale already folded in).
      stack, inputs: the kernel's stack and input axis positions (tuples), or the legacy
        counts of leading stack axes and of the input axes after them (ints).

    Returns:
      ``(*stack, *out)`` float32.
    """
    w_sq, cross, quad = _norm_terms(base, left, right, stack, inputs)
    return (w_sq + 2.0 * cross + quad).reshape(_kept_shape(base, stack, inputs))


def _kept_shape(base, stack, inputs) -> tuple[int, ...]:
    s_pos, _, o_pos = _positions(base.ndim, stack, inputs)
    return tuple(base.shape[p] for p in s_pos + o_pos)


def _norm_terms(base, left, right, stack, inputs):
    """``||W0||^2``, ``sum_r(R * (L^T W0))``, ``sum_r(R * ((L^T L) R))``, ``(*stack, out)``."""
    f32 = jnp.float32
    s_pos, i_pos, o_pos = _positions(base.ndim, stack, inputs)
    ns, ni = len(s_pos), len(i_pos)
    stack_shape = tuple(base.shape[p] for p in s_pos)
    n_out = _prod(base.shape[p] for p in o_pos)
    rank = left.shape[-1]
    a = left.astype(f32)
    b = right.astype(f32).reshape(*stack_shape, rank, n_out)
    a_s, a_i = tuple(range(ns)), tuple(range(ns, ns + ni))
    # Batched dot products instead of square-then-sum keep the jaxpr free of kernel-sized
    # intermediates (and read a bf16 base directly with float32 accumulation).
    so = s_pos + o_pos
    w_sq = lax.dot_general(base, base, ((i_pos, i_pos), (so, so)), preferred_element_type=f32)
    a_w = lax.dot_general(a, base, ((a_i, i_pos), (a_s, s_pos)), preferred_element_type=f32)
    a_w = a_w.reshape(*stack_shape, rank, n_out)  # (*stack, r, out); r may be 0
    a_a = lax.dot_general(a, a, ((a_i, a_i), (a_s, a_s)))  # (*stack, r, r)
    cross = jnp.sum(b * a_w, axis=-2)
    quad = jnp.sum(b * jnp.matmul(a_a, b), axis=-2)
    return w_sq.reshape(*stack_shape, n_out), cross, quad


# The expansion is used where its terms exceed the squared norm by at most this factor: its
# float32 rounding errors (relative ~1e-7 on each term) then stay below ~1e-4 of the norm.
CANCELLATION_LIMIT = 1024.0


def column_norm(base: Array, left: Array, right: Array, stack=0, inputs=1) -> Array:
    """``||W0 + L R||_c`` per output feature, float32, accurate where the expansion is not.

    By the factored expansion (:func:`column_norm_sq`) wherever it is accurate. Where it is
    not, by a direct sum over blocks of input rows with a running per-column scale (as
    LAPACK's ``nrm2``; no ``W0 + L R`` temporary): when the update nearly cancels the base
    (the terms exceed the squared norm by more than :data:`CANCELLATION_LIMIT`, e.g.
    ``dW = -0.999 W0``, where the expansion loses ~13%; the cancellation the factored norm
    of Zelenin & Zhuravlyova, "Scaling DoRA", 2026, guards against), when a squared
    norm overflows float32 (entries beyond ~1e18), or when it is below 1e-30 but not zero
    (norms below 1e-15, whose squares near float32's subnormals lose precision). The check
    costs ``O(out)``; the direct path runs only for a kernel that needs it (a kernel
    stored in another layout than ``(*stack, *in, *out)`` is read there through a
    canonical-order copy).

    Args: as :func:`column_norm_sq`.

    Returns:
      ``(*stack, *out)`` float32.
    """
    w_sq, cross, quad = _norm_terms(base, left, right, stack, inputs)
    norm_sq = w_sq + 2.0 * cross + quad
    size = w_sq + 2.0 * jnp.abs(cross) + quad
    accurate = jnp.all(
        jnp.isfinite(size)
        & (size <= CANCELLATION_LIMIT * jnp.maximum(norm_sq, 0))
        & ((norm_sq >= _SMALL_NORM_SQ) | (size == 0))  # a zero column is exact as it is
    )
    norm = lax.cond(
        accurate,
        lambda: jnp.sqrt(jnp.maximum(norm_sq, NORM_EPS)),
        lambda: _direct_column_norm(base, left, right, stack, inputs),
    )
    return norm.reshape(_kept_shape(base, stack, inputs))


def _varying_axes(aval) -> frozenset:
    """The mesh axes a value varies over inside ``shard_map`` (``aval.mat.varying``; older
    jax: ``aval.vma``)."""
    mat = getattr(aval, "mat", None)
    return frozenset(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())


def _direct_column_norm(base, left, right, stack, inputs) -> Array:
    """``||W0 + L R||_c`` summed over blocks of input rows, scaled per column, ``(*stack, out)``."""
    s_pos, i_pos, o_pos = _positions(base.ndim, stack, inputs)
    order = s_pos + i_pos + o_pos
    w = base if order == tuple(range(base.ndim)) else jnp.transpose(base, order)
    ns = len(s_pos)
    stack_shape = w.shape[:ns]
    n_in = _prod(w.shape[ns : ns + len(i_pos)])
    n_out = _prod(w.shape[ns + len(i_pos) :])
    rank = left.shape[-1]
    # The largest divisor of n_in up to 256 and below n_in: blocks never of the kernel's size.
    rows = max([d for d in range(1, min(256, max(1, n_in // 2)) + 1) if n_in % d == 0])
    blocks = n_in // rows
    # Block i holds the input rows i, i + blocks, i + 2 blocks, ...: (rows, blocks) with the
    # rows major, so an input axis sharded over devices stays sharded on `rows` and each
    # block is sliced where it lives (slicing contiguous row ranges of a sharded axis makes
    # XLA gather the whole kernel onto every device). The norm ignores the rows' order.
    w = w.reshape(*stack_shape, rows, blocks, n_out)
    a = left.astype(jnp.float32).reshape(*stack_shape, rows, blocks, rank)
    b = right.astype(jnp.float32).reshape(*stack_shape, rank, n_out)
    s = tuple(range(ns))

    def block(i, carry):
        scale, ssq = carry
        w_i = lax.dynamic_index_in_dim(w, i, axis=ns + 1, keepdims=False).astype(jnp.float32)
        a_i = lax.dynamic_index_in_dim(a, i, axis=ns + 1, keepdims=False)
        v = w_i + lax.dot_general(a_i, b, (((ns + 1,), (ns,)), (s, s)))
        new = jnp.maximum(scale, jnp.max(jnp.abs(v), axis=ns))
        safe = jnp.where(new > 0, new, 1.0)
        ssq = ssq * jnp.square(scale / safe)
        ssq = ssq + jnp.sum(jnp.square(v / jnp.expand_dims(safe, ns)), axis=ns)
        return new, ssq

    zeros = jnp.zeros((*stack_shape, n_out), jnp.float32)
    # Inside shard_map the loop's carry varies over the mesh axes its inputs vary over.
    vma = tuple(sorted(set().union(*(_varying_axes(jax.typeof(x)) for x in (w, a, b)))))
    if vma:
        zeros = lax.pcast(zeros, vma, to="varying")
    scale, ssq = lax.fori_loop(0, blocks, block, (zeros, zeros))
    return scale * jnp.sqrt(jnp.maximum(ssq, NORM_EPS))


def safe_norm(x: Array, axis: tuple[int, ...]) -> Array:
    """The L2 norm over ``axis`` in float32, scaled by the largest entry where squaring
    would overflow or lose precision (entries beyond ~1e18, norms below ~1e-15)."""
    x = x.astype(jnp.float32)
    plain = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis))
    peak = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
    peak = jnp.where(peak > 0, peak, 1.0)
    scaled = jnp.squeeze(peak, axis) * jnp.sqrt(jnp.sum(jnp.square(x / peak), axis=axis))
    fine = jnp.isfinite(plain) & (plain >= math.sqrt(_SMALL_NORM_SQ))
    return jnp.where(fine, plain, scaled)


def to_kernel_layout(x: Array, ndim: int, stack, inputs) -> Array:
    """Transposes ``x`` of canonical layout ``(*stack, *in, *out)`` to the kernel's layout."""
    order = canonical_order(ndim, stack, inputs)
    if order == tuple(range(ndim)):
        return x
    return jnp.transpose(x, tuple(int(i) for i in _inverse(order)))


def _inverse(perm) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def _kaiming_bound(fan_in: int) -> float:
    # Kaiming-uniform, as torch's kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), ...).
    return 1.0 / math.sqrt(fan_in)


def warn_zero_columns(magnitude: Array, path: str) -> None:
    """Warns if a decomposed adapter starts with a zero magnitude (an all-zero column)."""
    if isinstance(magnitude, jax.core.Tracer):
        return
    zeros = int(jnp.sum(magnitude == 0))
    if zeros:
        warnings.warn(
            f"Kernel '{path}' has {zeros} output feature(s) whose weights are all zero, so "
            f"their DoRA magnitude starts at 0 and W' = m V / ||V|| stays 0 there whatever A "
            f"and B learn (the gradient of m is 0 too). Adapt this kernel with LoRA instead "
            f"(wrap(..., method='lora', targets=...)), or initialise it with non-zero weights.",
            UserWarning,
            stacklevel=5,
        )


def _explicit_mesh(*trees):
    """The mesh of the first array in ``trees`` typed with ``Explicit`` mesh axes, or None."""
    for x in jax.tree.leaves(trees):
        m = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
        if any(t == jax.sharding.AxisType.Explicit for t in getattr(m, "axis_types", ())):
            return m
    return None


def _spec_on(aval, mesh) -> tuple:
    """The partition spec of a value of type ``aval`` (``jax.typeof``), one entry per axis,
    where it is typed on ``mesh``; else replicated (a value off the mesh)."""
    sharding = getattr(aval, "sharding", None)
    on = getattr(sharding, "mesh", None) == mesh
    spec = tuple(getattr(sharding, "spec", None) or ()) if on else ()
    return (*spec, *(None,) * (len(aval.shape) - len(spec)))


def reshard_in_steps(x: Array, have: tuple, want: tuple, mesh) -> Array:
    """``x``, typed with spec ``have`` (one entry per axis), resharded to ``want`` on
    ``mesh``: gathered over the mesh axes it leaves, then sliced over those it takes. One
    reshard between two tilings would replicate it first (XLA warns of an "involuntary full
    rematerialization")."""
    for step in (tuple(a if a == b else None for a, b in zip(have, want)), want):
        if step != have:
            x = jax.sharding.reshard(x, NamedSharding(mesh, P(*step)))
            have = step
    return x


def _concrete_mesh(mesh, trees):
    """The devices' mesh of ``mesh`` (abstract) where an array in ``trees`` holds it (eager
    calls: an array off the mesh can only be moved onto devices); else ``mesh``."""
    for x in jax.tree.leaves(trees):
        m = getattr(getattr(x, "sharding", None), "mesh", None)
        if isinstance(m, jax.sharding.Mesh) and m.abstract_mesh == mesh:
            return m
    return mesh


def _sharded_like(fn, like: Array, *inputs):
    """``fn(*inputs)``, its result sharded like ``like``, also on ``Explicit`` mesh axes.

    Under ``Explicit`` axis types (``jax.make_mesh``'s default) a contraction over a sharded
    input axis must name its output's sharding; the norm's maths then runs with the axes
    made ``Auto`` and its result takes ``like``'s sharding (the magnitude's).
    """
    mesh = _explicit_mesh(inputs)
    if mesh is None:
        return fn(*inputs)
    spec = getattr(getattr(jax.typeof(like), "sharding", None), "spec", None) or P()
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.sharding.auto_axes(fn, out_sharding=NamedSharding(mesh, spec))(*inputs)


class Adapter:
    """Base class of every adapter node.

    Subclasses are frozen pytree dataclasses with a ``base`` field (the frozen kernel, in
    its own layout) and the static fields ``stack`` and ``inputs``: the positions of the
    kernel's stack and input axes (ints given at construction mean the legacy counts, as in
    :class:`dora_jax.Axes`); the other axes are output axes (``outputs``). They list their
    trainable fields in ``trainable``, the fields shared by every node of a tree in
    ``shared``, and the axis roles of each leaf in ``layout`` (used for sharding:
    ``"stack"``/``"in"``/``"out"`` stand for the kernel's axes of that kind, ``"rank"`` for
    one unsharded axis; fields not listed, and shared ones, are replicated).
    """

    trainable: ClassVar[tuple[str, ...]] = ()
    shared: ClassVar[tuple[str, ...]] = ()
    layout: ClassVar[dict[str, tuple[str, ...]]] = {}
    # Whether the rank may exceed min(in, out) (VeRA's shared matrices: not bounded).
    rank_bounded: ClassVar[bool] = True
    # The settings of dora_jax.wrap beyond ``rank`` that this kind uses (one it does not use
    # is refused there rather than ignored).
    options: ClassVar[frozenset[str]] = frozenset({"alpha", "rslora", "dropout"})
    # Why the settings not in ``options`` do not apply (wrap's message when one is given).
    without: ClassVar[str] = ""
    base: Array
    stack: tuple[int, ...]
    inputs: tuple[int, ...]
    dropout: float
    # True when wrap assumed Flax's (in, out) layout for a 2-D kernel without being told:
    # then a use contracting the kernel's output axis is an error, not a transposed use.
    assumed_layout: bool

    def __post_init__(self):
        axes = Axes(self.stack, self.inputs)
        object.__setattr__(self, "stack", axes.stack)
        object.__setattr__(self, "inputs", axes.inputs)

    # --- construction -------------------------------------------------------------------
    @classmethod
    def init(cls, base: Array, axes: Axes, *, rank: int, key: jax.Array, **options) -> Adapter:
        """A node adapting ``base`` whose update starts at zero (identity at init).

        ``options`` are the kind's static settings (``scale``, ``dropout``,
        ``exact_norm_grad``...) plus ``dtype`` (of the trainable leaves), ``shared`` (the
        kind's shared leaves, from :meth:`init_shared`) and ``path`` (for messages).
        """
        raise NotImplementedError

    @classmethod
    def init_shared(cls, sizes, rank: int, key: jax.Array, dtype) -> dict[str, Array]:
        """Leaves shared by every node of a tree, from the ``(in, out)`` sizes of its kernels."""
        return {}

    def with_base(self, base, column_norm: Callable[[], Array] | None = None) -> Adapter:
        """The node over another base of the same shape and layout (e.g. its quantised
        copy); leaves that depend on the base are re-initialised from it (DoRA's magnitude:
        ``column_norm()`` if given, else the norm of ``base`` over its input axes)."""
        return dataclasses.replace(self, base=base)

    # --- the kernel it stands for ----------------------------------------------------------
    # Model code reads these outside a forward pass (an NNX layer's ``self.kernel.shape`` to
    # size a decoding cache, ``.dtype`` to pick a compute dtype): the base kernel's.
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def dtype(self):
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return len(self.base.shape)

    @property
    def size(self) -> int:
        return math.prod(self.base.shape)

    def __jax_array__(self):
        # jax calls this when a node reaches an operation as if it were an array: the model
        # was called with adapted params directly.
        raise self._not_an_array()

    def __array__(self, dtype=None, copy=None):
        # np.asarray(node) would otherwise be a 0-d object array holding the node.
        raise self._not_an_array()

    def __getitem__(self, index):
        # An NNX layer reads its kernel as `self.kernel[...]`: an adapted NNX model called
        # directly.
        raise self._not_an_array()

    def _not_an_array(self) -> TypeError:
        return TypeError(
            f"An adapter node ({type(self).__name__}, base {tuple(self.base.shape)}) was used "
            f"as an array: call the model through dora_jax.apply, e.g. "
            f"dora_jax.apply(model.apply)({{'params': adapted}}, x) (Linen) or "
            f"dora_jax.apply(lambda model, x: model(x))(adapted_model, x) (NNX), or merge "
            f"first with dora_jax.merge(adapted)."
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
    def outputs(self) -> tuple[int, ...]:
        named = set(self.stack) | set(self.inputs)
        return tuple(p for p in range(len(self.base.shape)) if p not in named)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape[p] for p in self.stack)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape[p] for p in self.inputs)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape[p] for p in self.outputs)

    @property
    def axes(self) -> Axes:
        return Axes(self.stack, self.inputs)

    @property
    def quantised(self) -> bool:
        """Whether the frozen kernel is quantised (anything with ``dequantize()``)."""
        return hasattr(self.base, "dequantize")

    def dequantised_base(self) -> Array:
        """The frozen kernel as an array: a quantised base is dequantised here, one kernel
        at a time, when a forward needs it."""
        return self.base.dequantize() if self.quantised else self.base

    # --- derived maths ----------------------------------------------------------------
    def delta(self) -> Array:
        """``dW = L R`` in float32, in the kernel's layout and, on ``Explicit`` mesh axes,
        with the kernel's sharding. Forms a kernel-sized array."""
        return self._like_kernel(type(self)._delta, self._kernel_type())

    def materialise(self) -> Array:
        """The adapted kernel ``W'`` in the base dtype, maths in float32, sharded as the
        (dequantised) base kernel.

        Forms kernel-sized arrays: meant for ``merge`` and for uses of the kernel that the
        factored forward does not handle.
        """
        base = self.dequantised_base()
        return self._like_kernel(type(self)._materialised, jax.typeof(base), base)

    def _delta(self) -> Array:
        left, right = self.factors()
        ns, ni = len(self.stack), len(self.inputs)
        s = tuple(range(ns))
        # Contracted over r with the input and output axes as they are: flattening them
        # would reshape a sharded axis.
        d = lax.dot_general(
            left.astype(jnp.float32), right.astype(jnp.float32), (((ns + ni,), (ns,)), (s, s))
        )  # (*stack, *in, *out)
        return to_kernel_layout(d, self.base.ndim, self.stack, self.inputs)

    def _materialised(self, base: Array) -> Array:
        v = base.astype(jnp.float32) + self._delta()
        scale = self.output_scale(base)
        if scale is not None:
            scale = scale.reshape(*self.stack_shape, *(1,) * len(self.inputs), *self.out_shape)
            v = v * to_kernel_layout(scale, base.ndim, self.stack, self.inputs)
        return v.astype(base.dtype)

    def _kernel_type(self):
        """The (dequantised) kernel's type: its shape, dtype and sharding."""
        if self.quantised:
            return jax.eval_shape(self.base.dequantize)
        return jax.typeof(self.base)

    def _like_kernel(self, fn: Callable, kernel, *args) -> Array:
        """``fn(self, *args)``, a kernel-shaped result sharded as ``kernel`` (a type).

        On ``Explicit`` mesh axes the leaves may be split otherwise than the kernel (``A``
        over its input axis, ``B`` replicated, the base over its output axis), where adding
        ``dW`` to ``W0`` is a sharding type error. There each leaf is first resharded to
        follow the kernel axes it spans (its ``layout``; shared leaves replicated): only the
        small adapter leaves move, so ``dW`` forms where the kernel's shards are and no
        kernel-sized array is gathered. The maths then runs with the axes made ``Auto``.
        """
        mesh = _explicit_mesh(self, args)
        if mesh is None:
            return fn(self, *args)
        kernel_spec = _spec_on(kernel, mesh)
        roles = {
            "stack": tuple(kernel_spec[p] for p in self.stack),
            "in": tuple(kernel_spec[p] for p in self.inputs),
            "out": tuple(kernel_spec[p] for p in self.outputs),
            "rank": (None,),
        }
        target = _concrete_mesh(mesh, (self, args))
        moved = {}
        for name in (*self.shared, *type(self).layout):
            value = getattr(self, name)
            if value is None or name in moved:
                continue
            if name in self.shared:
                spec = (None,) * jnp.ndim(value)
            else:
                spec = sum((roles[r] for r in type(self).layout[name]), ())
            if len(spec) != jnp.ndim(value):
                continue  # not laid out as the kind says: left as it is
            moved[name] = reshard_in_steps(value, _spec_on(jax.typeof(value), mesh), spec, target)
        node = dataclasses.replace(self, **moved)
        # On the devices' mesh where known (eager): a result that reads no input (a
        # Magnitude node's empty update) is otherwise placed on no device.
        out = NamedSharding(target, P(*kernel_spec))
        with jax.sharding.use_abstract_mesh(mesh):
            return jax.sharding.auto_axes(fn, out_sharding=out)(node, *args)


class _Decomposed(Adapter):
    """Magnitude/direction decomposition shared by DoRA and DVoRA (Liu et al. 2024, Eq. 5).

    ``W' = m * (W0 + dW) / ||W0 + dW||_c``. The norm is a constant for differentiation
    unless ``exact_norm_grad`` (Sec. 4.3; the exact gradient is the paper's ablation).
    """

    magnitude: Array
    exact_norm_grad: bool

    def with_base(self, base, column_norm: Callable[[], Array] | None = None) -> Adapter:
        if column_norm is None:
            deq = base.dequantize() if hasattr(base, "dequantize") else base
            norm = magnitude_init(deq, self.stack, self.inputs, jnp.float32)
        else:
            norm = column_norm()
        return dataclasses.replace(self, base=base, magnitude=norm.astype(self.magnitude.dtype))

    def weight_norm(self, base: Array | None = None) -> Array:
        """``||W0 + dW||_c`` by the factored formula, float32, shape ``(*stack, *out)``."""
        base = self.dequantised_base() if base is None else base
        left, right = self.factors()
        norm = _sharded_like(
            functools.partial(column_norm, stack=self.stack, inputs=self.inputs),
            self.magnitude, base, left, right,
        )  # fmt: skip
        # A zero column of W0 + dW (its output is 0 whatever the scale) divides by ~1e-19, not
        # 0; every column with a weight above that (wrap warns of the others) keeps its norm.
        norm = jnp.maximum(norm, math.sqrt(NORM_EPS))
        return norm if self.exact_norm_grad else lax.stop_gradient(norm)

    def output_scale(self, base: Array | None = None) -> Array:
        return self.magnitude.astype(jnp.float32) / self.weight_norm(base)


def magnitude_init(base: Array, stack, inputs, dtype, path: str = "") -> Array:
    """``||W0||_c``: the L2 norm over the input axes, in float32, ``(*stack, *out)``.

    Warns (naming ``path``) when a column is all zero: DoRA cannot train it.
    """
    s, i, o = _positions(base.ndim, stack, inputs)
    norm = safe_norm(base, i)
    # The sum keeps stack and output axes in kernel order; bring the stack axes first.
    kept = [p for p in range(base.ndim) if p not in i]
    norm = jnp.transpose(norm, [kept.index(p) for p in s + o])
    magnitude = norm.astype(dtype)
    warn_zero_columns(magnitude, path)
    _warn_underflowing_columns(base, i, path)
    return magnitude


def _warn_underflowing_columns(base: Array, inputs: tuple[int, ...], path: str) -> None:
    """Warns if a column is non-zero but every weight in it is below ~1e-19: their float32
    squares underflow, so the factored norm (which sums squares) takes it as zero."""
    peak = jnp.max(jnp.abs(base.astype(jnp.float32)), axis=inputs)
    count = jnp.sum((peak > 0) & (peak < math.sqrt(NORM_EPS)))
    if isinstance(count, jax.core.Tracer):  # under a trace (wrap inside jit): no value
        return
    if int(count):
        warnings.warn(
            f"Kernel '{path}' has {count} output feature(s) whose weights are all below "
            f"{math.sqrt(NORM_EPS):.1e} in magnitude: their float32 squares underflow, so the "
            f"DoRA norm takes those columns as zero and the adapted kernel does not equal the "
            f"base there. Rescale the kernel (fold a constant into the next layer), or adapt "
            f"it with LoRA (wrap(..., method='lora', targets=...)).",
            UserWarning,
            stacklevel=5,
        )


def _lora_leaves(base, axes: Axes, rank, key, dtype):
    s, i, o = axes.split(base.ndim)
    stack_shape = tuple(base.shape[p] for p in s)
    in_shape = tuple(base.shape[p] for p in i)
    out_shape = tuple(base.shape[p] for p in o)
    bound = _kaiming_bound(_prod(in_shape))
    a = jax.random.uniform(key, (*stack_shape, *in_shape, rank), dtype, -bound, bound)
    b = jnp.zeros((*stack_shape, rank, *out_shape), dtype)  # B = 0: identity at init
    return (s, i), a, b


@_pytree_dataclass
class LoRA(Adapter):
    """LoRA (Hu et al. 2022): ``W' = W0 + s A B``.

    Fields: ``base`` (the kernel, any layout) frozen; ``a (*stack, *in, r)`` and
    ``b (*stack, r, *out)`` trainable; ``scale`` is ``s = alpha / r``.
    """

    trainable: ClassVar[tuple[str, ...]] = ("a", "b")
    without: ClassVar[str] = "LoRA has no norm, so no norm gradient (method='lora')"
    layout: ClassVar[dict[str, tuple[str, ...]]] = {
        "a": ("stack", "in", "rank"),
        "b": ("stack", "rank", "out"),
    }
    base: Array
    a: Array
    b: Array
    scale: float = static()
    stack: tuple[int, ...] = static(())
    inputs: tuple[int, ...] = static((0,))
    dropout: float = static(0.0)
    assumed_layout: bool = static(False)

    @classmethod
    def init(cls, base, axes, *, rank, key, scale, dtype=jnp.float32, dropout=0.0,
             assumed_layout=False, **_):  # fmt: skip
        (s, i), a, b = _lora_leaves(base, axes, rank, key, dtype)
        return cls(base, a, b, scale=scale, stack=s, inputs=i, dropout=dropout,
                   assumed_layout=assumed_layout)  # fmt: skip

    def factors(self) -> tuple[Array, Array]:
        # The scale in float32: rounded to a bfloat16 B's dtype it would bias every update
        # (alpha 16 at rank 3: 5.3333 as 5.34375).
        return self.a, self.b * jnp.asarray(self.scale, jnp.float32)


@_pytree_dataclass
class DoRA(_Decomposed):
    """DoRA (Liu et al. 2024): ``W' = m (W0 + s A B) / ||W0 + s A B||_c``.

    Fields as :class:`LoRA` plus ``magnitude (*stack, *out)``, trainable, initialised to
    ``||W0||_c`` (the norm over the kernel's input axes, wherever they sit).
    """

    trainable: ClassVar[tuple[str, ...]] = ("a", "b", "magnitude")
    options: ClassVar[frozenset[str]] = frozenset({"alpha", "rslora", "dropout", "exact_norm_grad"})
    layout: ClassVar[dict[str, tuple[str, ...]]] = {
        "a": ("stack", "in", "rank"),
        "b": ("stack", "rank", "out"),
        "magnitude": ("stack", "out"),
    }
    base: Array
    a: Array
    b: Array
    magnitude: Array
    scale: float = static()
    stack: tuple[int, ...] = static(())
    inputs: tuple[int, ...] = static((0,))
    dropout: float = static(0.0)
    exact_norm_grad: bool = static(False)
    assumed_layout: bool = static(False)

    @classmethod
    def init(cls, base, axes, *, rank, key, scale, dtype=jnp.float32, dropout=0.0,
             exact_norm_grad=False, assumed_layout=False, path="", **_):  # fmt: skip
        (s, i), a, b = _lora_leaves(base, axes, rank, key, dtype)
        magnitude = magnitude_init(base, s, i, dtype, path)
        return cls(base, a, b, magnitude, scale=scale, stack=s, inputs=i, dropout=dropout,
                   exact_norm_grad=exact_norm_grad, assumed_layout=assumed_layout)  # fmt: skip

    def factors(self) -> tuple[Array, Array]:
        # The scale in float32: rounded to a bfloat16 B's dtype it would bias every update
        # (alpha 16 at rank 3: 5.3333 as 5.34375).
        return self.a, self.b * jnp.asarray(self.scale, jnp.float32)


class _SharedRandomFactors(Adapter):
    """VeRA's update (Kopiczko et al. 2024): ``dW = A_s diag(d) B_s diag(b)``.

    ``A_s (in_max, r)`` and ``B_s (r, out_max)`` are frozen random matrices shared by every
    adapted kernel (the same arrays in every node); a kernel uses ``A_s[:in]`` and
    ``B_s[:, :out]`` of its flattened input and output sizes. Only ``d (*stack, r)`` and
    ``b (*stack, *out)`` are trained.
    """

    shared: ClassVar[tuple[str, ...]] = ("shared_a", "shared_b")
    rank_bounded: ClassVar[bool] = False
    shared_a: Array
    shared_b: Array
    d: Array
    b: Array

    @classmethod
    def init_shared(cls, sizes, rank, key, dtype):
        """VeRA's frozen ``A_s (in_max, r)`` and ``B_s (r, out_max)``, Kaiming-uniform.

        Bounds as torch's ``kaiming_uniform_(a=sqrt(5))`` on PEFT's ``(r, in)`` and
        ``(out, r)`` layouts: ``1/sqrt(in_max)`` and ``1/sqrt(r)``.
        """
        in_max, out_max = max(s[0] for s in sizes), max(s[1] for s in sizes)
        key_a, key_b = jax.random.split(key)
        bound_a, bound_b = _kaiming_bound(in_max), _kaiming_bound(rank)
        shared_a = jax.random.uniform(key_a, (in_max, rank), dtype, -bound_a, bound_a)
        shared_b = jax.random.uniform(key_b, (rank, out_max), dtype, -bound_b, bound_b)
        return {"shared_a": shared_a, "shared_b": shared_b}

    @staticmethod
    def _vera_leaves(base, axes: Axes, shared, dtype):
        s, i, o = axes.split(base.ndim)
        stack_shape = tuple(base.shape[p] for p in s)
        out_shape = tuple(base.shape[p] for p in o)
        rank = shared["shared_a"].shape[-1]
        d = jnp.full((*stack_shape, rank), 0.1, dtype)
        b = jnp.zeros((*stack_shape, *out_shape), dtype)  # b = 0: identity at init
        return (s, i), d, b

    def low_rank(self) -> tuple[Array, Array, Array, Array]:
        rank = self.shared_a.shape[-1]
        n_in, n_out = _prod(self.in_shape), _prod(self.out_shape)
        a = self.shared_a[:n_in].reshape(*self.in_shape, rank)
        b = self.shared_b[:, :n_out].reshape(rank, *self.out_shape)
        return a, self.d, b, self.b

    def factors(self) -> tuple[Array, Array]:
        a, _, b, _ = self.low_rank()
        rank = a.shape[-1]
        d = self.d.reshape(*self.stack_shape, *(1,) * len(self.inputs), rank)
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
    options: ClassVar[frozenset[str]] = frozenset({"dropout"})
    without: ClassVar[str] = (
        "VeRA has no alpha (nor rsLoRA scale): its vectors d and b train the update's scale "
        "(method='vera')"
    )
    layout: ClassVar[dict[str, tuple[str, ...]]] = {
        "d": ("stack", "rank"),
        "b": ("stack", "out"),
    }
    base: Array
    shared_a: Array
    shared_b: Array
    d: Array
    b: Array
    stack: tuple[int, ...] = static(())
    inputs: tuple[int, ...] = static((0,))
    dropout: float = static(0.0)
    assumed_layout: bool = static(False)

    @classmethod
    def init(cls, base, axes, *, rank, key, shared, dtype=jnp.float32, dropout=0.0,
             assumed_layout=False, **_):  # fmt: skip
        (s, i), d, b = cls._vera_leaves(base, axes, shared, dtype)
        return cls(base, shared["shared_a"], shared["shared_b"], d, b, stack=s, inputs=i,
                   dropout=dropout, assumed_layout=assumed_layout)  # fmt: skip


@_pytree_dataclass
class DVoRA(_SharedRandomFactors, _Decomposed):
    """DVoRA (Liu et al. 2024, Sec. 5.6): DoRA's decomposition over VeRA's update.

    ``W' = m (W0 + dW) / ||W0 + dW||_c`` with ``dW = A_s diag(d) B_s diag(b)``; trainable
    ``magnitude``, ``d`` and ``b``.
    """

    trainable: ClassVar[tuple[str, ...]] = ("d", "b", "magnitude")
    options: ClassVar[frozenset[str]] = frozenset({"dropout", "exact_norm_grad"})
    without: ClassVar[str] = (
        "DVoRA has no alpha (nor rsLoRA scale): its vectors d and b train the update's scale "
        "(method='dvora')"
    )
    layout: ClassVar[dict[str, tuple[str, ...]]] = {
        "d": ("stack", "rank"),
        "b": ("stack", "out"),
        "magnitude": ("stack", "out"),
    }
    base: Array
    shared_a: Array
    shared_b: Array
    d: Array
    b: Array
    magnitude: Array
    stack: tuple[int, ...] = static(())
    inputs: tuple[int, ...] = static((0,))
    dropout: float = static(0.0)
    exact_norm_grad: bool = static(False)
    assumed_layout: bool = static(False)

    @classmethod
    def init(cls, base, axes, *, rank, key, shared, dtype=jnp.float32, dropout=0.0,
             exact_norm_grad=False, assumed_layout=False, path="", **_):  # fmt: skip
        (s, i), d, b = cls._vera_leaves(base, axes, shared, dtype)
        magnitude = magnitude_init(base, s, i, dtype, path)
        return cls(base, shared["shared_a"], shared["shared_b"], d, b, magnitude, stack=s,
                   inputs=i, dropout=dropout, exact_norm_grad=exact_norm_grad,
                   assumed_layout=assumed_layout)  # fmt: skip


def is_adapter(x: Any) -> bool:
    """True for an adapter node (use as ``is_leaf`` when mapping over adapted trees)."""
    return isinstance(x, Adapter)


@_pytree_dataclass
class Magnitude(_Decomposed):
    """Magnitude only (DoRA's ``Wdecompose_target_modules``): ``W' = m W0 / ||W0||_c``.

    The pre-trained direction is kept and only the per-output-feature magnitude
    ``magnitude (*stack, *out)`` trains (initialised to ``||W0||_c``, so the node starts as
    the base kernel). Its update is empty: ``factors()`` are rank-0 arrays, so every code
    path that asks a node for ``(L, R)`` works unchanged and forms nothing.
    """

    trainable: ClassVar[tuple[str, ...]] = ("magnitude",)
    # No low-rank branch: no scale, nothing to drop out of.
    options: ClassVar[frozenset[str]] = frozenset({"exact_norm_grad"})
    without: ClassVar[str] = (
        "a magnitude-only node has no low-rank update, so no scale and no dropout "
        "(method='magnitude')"
    )
    layout: ClassVar[dict[str, tuple[str, ...]]] = {"magnitude": ("stack", "out")}
    rank_bounded: ClassVar[bool] = False
    base: Array
    magnitude: Array
    stack: tuple[int, ...] = static(())
    inputs: tuple[int, ...] = static((0,))
    dropout: float = static(0.0)
    exact_norm_grad: bool = static(False)
    assumed_layout: bool = static(False)

    @classmethod
    def init(cls, base, axes, *, dtype=jnp.float32, exact_norm_grad=False,
             assumed_layout=False, path="", **_):  # fmt: skip
        s, i, _ = axes.split(base.ndim)
        magnitude = magnitude_init(base, s, i, dtype, path)
        return cls(base, magnitude, stack=s, inputs=i, exact_norm_grad=exact_norm_grad,
                   assumed_layout=assumed_layout)  # fmt: skip

    def factors(self) -> tuple[Array, Array]:
        dtype = self.magnitude.dtype
        left = jnp.zeros((*self.stack_shape, *self.in_shape, 0), dtype)
        right = jnp.zeros((*self.stack_shape, 0, *self.out_shape), dtype)
        return left, right


# Method name -> adapter kind (what wrap(method=...) and rules choose from).
KINDS: dict[str, type[Adapter]] = {
    "lora": LoRA, "dora": DoRA, "vera": VeRA, "dvora": DVoRA, "magnitude": Magnitude,
}  # fmt: skip
