"""Running an unmodified model with adapted params, without forming ``W0 + dW``.

:func:`apply` traces the user's function once with each adapter node standing in for its
base kernel, then evaluates the resulting jaxpr with an interpreter that follows every
adapted kernel through dtype casts, transposes, sharding constraints and reshards, nested
``jit``, ``remat``, ``scan``, ``cond``, ``while`` and ``shard_map``. The interpreter is a
table of rules, one per primitive family (:data:`RULES`); where an adapted kernel meets a
contraction (``dot_general`` with any contraction and batch pattern,
``conv_general_dilated``) or an embedding lookup (``gather``), the rule computes the
factored form (DoRA, Liu et al. 2024, Sec. 4.3)::

    y = (x W0 + (x L) R) * (m / ||W0 + L R||_c)

so no kernel-sized array is formed and autodiff never computes a weight gradient of the
frozen base. Any other use forms ``W'`` for that use and warns once (or raises with
``strict=True``). A use that contracts a kernel on other axes than it was adapted for is an
error: it would be a different DoRA. :func:`infer_axes` walks the program with the same
evaluator, its rules recording how each kernel is used instead of computing.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import itertools
import math
import types
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.extend import core as jcore
from jax.sharding import PartitionSpec as P

from dora_jax.adapters import (
    Adapter,
    _concrete_mesh,
    _Decomposed,
    _explicit_mesh,
    _pytree_dataclass,
    _spec_on,
    _varying_axes,
    is_adapter,
    reshard_in_steps,
    static,
    to_kernel_layout,
)
from dora_jax.axes import Axes
from dora_jax.tree import _check_whole, check_no_node_dicts, path_str

PyTree = Any


class FallbackWarning(UserWarning):
    """An adapted kernel was used in a way the factored forward does not cover."""


@jax.tree_util.register_pytree_node_class
class _Probe:
    """A kernel followed by :func:`infer_axes`: a stand-in value and where its axes came from.

    ``origin[k]`` is the original kernel axis of axis ``k`` of ``value``; ``scanned`` lists
    original axes already sliced off by enclosing scans or picked by a scalar index (stack
    axes); ``via`` the slices taken of it on the way (named with the use that leaves it
    unread, if any).
    """

    def __init__(self, value, index: int, origin: tuple[int, ...], scanned: tuple[int, ...],
                 via: tuple[str, ...] = ()):  # fmt: skip
        self.value, self.index, self.origin, self.scanned = value, index, origin, scanned
        self.via = via

    def tree_flatten(self):
        return (self.value,), (self.index, self.origin, self.scanned, self.via)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)


@jax.tree_util.register_pytree_node_class
class _View:
    """An adapted kernel as the traced function sees it.

    ``node`` is the adapter (or a :class:`_Probe` under :func:`infer_axes`); the value the
    program holds is the node's kernel with its axes permuted so that axis ``k`` is the
    node's axis ``axes[k]``, cast to ``dtype``, times ``factor`` (a scalar the program
    multiplied the kernel by, :func:`_scaled_rule`; None for none).
    """

    def __init__(self, node, dtype, path: str, axes: tuple[int, ...], factor=None):
        self.node, self.dtype, self.path, self.axes = node, dtype, path, axes
        self.factor = factor

    def tree_flatten(self):
        return (self.node, self.factor), (self.dtype, self.path, self.axes)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux, factor=children[1])

    def replace(self, **changes) -> _View:
        fields = dict(node=self.node, dtype=self.dtype, path=self.path, axes=self.axes,
                      factor=self.factor)  # fmt: skip
        return _View(**{**fields, **changes})


@dataclasses.dataclass
class _Context:
    key: jax.Array | None
    strict: bool
    warned: set
    uses: int = 0
    # infer_axes: {kernel index: set of (kind, Axes)} instead of computing, and
    # {kernel index: set of the operations that used it as something else}.
    found: dict | None = None
    unread: dict = dataclasses.field(default_factory=dict)
    # Inputs already put in a contraction's order: {(id, perm, shape): (input, result)}.
    arranged: dict = dataclasses.field(default_factory=dict)
    # Inside a scan body: DoRA scales its outputs with _rescaled (see there).
    in_scan: bool = False
    # Arrays broadcast from one value: {id: (array, the value as a scalar)} (_scalar_of).
    broadcasts: dict = dataclasses.field(default_factory=dict)

    @property
    def probing(self) -> bool:
        return self.found is not None

    def next_key(self) -> jax.Array:
        self.uses += 1
        return jax.random.fold_in(self.key, self.uses)

    def with_key(self, key, *, in_scan: bool | None = None) -> _Context:
        in_scan = self.in_scan if in_scan is None else in_scan
        return _Context(
            key, self.strict, self.warned, found=self.found, unread=self.unread, in_scan=in_scan,
            broadcasts=self.broadcasts,
        )  # fmt: skip

    def output(self, base: jax.Array, z: jax.Array, post, scale) -> jax.Array:
        """An adapted contraction's output ``(base + z * post) * scale`` in ``base``'s dtype,
        ``post`` (VeRA's ``b``) and ``scale`` (DoRA's ``m / ||W0 + dW||_c``) per output
        feature, broadcasting alike, either None. Inside a scan body the scaling has its
        own VJP (:func:`_rescaled`, :func:`_rescaled_sum`)."""
        if scale is None:
            return base + (z if post is None else z * post)
        if self.in_scan:
            if post is None:
                return _rescaled(base + z, scale)
            return _rescaled_sum(base, z, post, scale)
        pre = base + (z if post is None else z * post)
        return (pre * scale).astype(pre.dtype)

    def arrange(self, x: jax.Array, perm: list[int], shape: tuple[int, ...]) -> jax.Array:
        """``x`` transposed by ``perm`` and reshaped to ``shape``, once per input: projections
        that share an input (q, k and v) then share the array the backward pass keeps,
        instead of keeping one copy each (per layer, in a scan)."""
        key = (id(x), tuple(perm), shape)
        hit = self.arranged.get(key)
        if hit is not None and hit[0] is x:  # holding x keeps its id from being reused
            return hit[1]
        y = x if perm == list(range(x.ndim)) else jnp.transpose(x, perm)
        y = y.reshape(shape)
        self.arranged[key] = (x, y)
        return y

    def record(self, view: _View, kind: str, stack_axes, input_axes) -> None:
        """infer_axes: ``view``'s kernel is used with these (view) stack and input axes."""
        probe = view.node
        to_origin = [probe.origin[view.axes[d]] for d in range(len(view.axes))]
        stack = tuple(sorted([*probe.scanned, *(to_origin[d] for d in stack_axes)]))
        inputs = tuple(sorted(to_origin[d] for d in input_axes))
        self.found.setdefault(probe.index, set()).add((kind, Axes(stack, inputs)))


def _is_view(x) -> bool:
    return isinstance(x, _View)


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _identity(n: int) -> tuple[int, ...]:
    return tuple(range(n))


def _stand_in(view: _View):
    """The value of a probed kernel as the program sees it (infer_axes)."""
    value = view.node.value
    if view.axes != _identity(value.ndim):
        value = jnp.transpose(value, view.axes)
    return value.astype(view.dtype)


def _materialise(view: _View, ctx: _Context, why: str) -> jax.Array:
    if ctx.probing:
        ctx.unread.setdefault(view.node.index, set()).update((why, *view.node.via))
        return _stand_in(view)
    if ctx.strict:
        raise ValueError(
            f"Adapted kernel '{view.path}' is used by `{why}`, a use the factored forward "
            f"does not cover, and strict=True forbids forming W' = m (W0 + dW) / ||.|| for "
            f"it. To avoid it, adapt only kernels that the model contracts (matmul, einsum, "
            f"dot_general, ungrouped conv) or looks up (embedding gather) (wrap(..., "
            f"targets=)), or "
            f"pass strict=False to form W' for this use (slower, more memory)."
        )
    if (view.path, why) not in ctx.warned:
        ctx.warned.add((view.path, why))
        warnings.warn(
            f"dora_jax.apply: adapted kernel '{view.path}' is used by `{why}`, which the "
            f"factored forward does not cover; forming the full adapted kernel for this use "
            f"(slower, more memory). Pass strict=True to make this an error.",
            FallbackWarning,
            stacklevel=5,
        )
    node = dataclasses.replace(view.node, base=lax.stop_gradient(view.node.base))
    w = node.materialise()
    if view.axes != _identity(w.ndim):
        w = jnp.transpose(w, view.axes)
    return _times_factor(w.astype(view.dtype), view)


def _times_factor(y: jax.Array, view: _View) -> jax.Array:
    """``y`` times the scalar the program multiplied ``view``'s kernel by (if any), in
    ``y``'s dtype: a contraction is linear in its kernel, ``x (c W') = c (x W')``."""
    if view.factor is None:
        return y
    return (y * view.factor).astype(y.dtype)


def _plain(x, ctx: _Context, why: str):
    return _materialise(x, ctx, why) if _is_view(x) else x


# --- the evaluator -----------------------------------------------------------------------

Rule = Callable[[Any, list, _Context], "list | None"]
#: Primitive name -> rule. A rule gets the equation, its inputs (some of them views of
#: adapted kernels) and the context, and returns the outputs, or None when the use is not
#: covered (the kernel is then formed for it: FallbackWarning, or an error with strict).
RULES: dict[str, Rule] = {}


def _rule(*names: str):
    def register(fn: Rule) -> Rule:
        for name in names:
            RULES[name] = fn
        return fn

    return register


def _bind(eqn, invals, params=None):
    params = eqn.params if params is None else params
    with eqn.ctx.manager:
        ans = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))
    return ans if eqn.primitive.multiple_results else [ans]


def _eval(jaxpr, consts, args, ctx: _Context) -> list:
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for eqn in _live_eqns(jaxpr):
        invals = [read(v) for v in eqn.invars]
        outs = None
        if any(_is_view(x) for x in invals):
            rule = RULES.get(eqn.primitive.name)
            if rule is not None:
                # Under the equation's own context: its abstract mesh (Auto axes inside
                # jax.sharding.auto_axes, as an embedding lookup with out_sharding= uses).
                with eqn.ctx.manager:
                    outs = rule(eqn, invals, ctx)
            if outs is None:
                name = eqn.primitive.name
                outs = _bind(eqn, [_plain(x, ctx, name) for x in invals])
        else:
            outs = _bind(eqn, invals)
            if eqn.primitive.name == "broadcast_in_dim" and math.prod(np.shape(invals[0])) == 1:
                ctx.broadcasts[id(outs[0])] = (outs[0], jnp.reshape(invals[0], ()))
        for v, o in zip(eqn.outvars, outs):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


def _live_eqns(jaxpr) -> list:
    """The equations whose results the outputs need, or that have effects, in order.

    A dead use of a kernel (haliax's ``scan`` takes layer 0 of every stacked leaf only for
    its structure) is then neither recorded by ``infer_axes`` nor forms ``W'``; XLA would
    drop it from the compiled program anyway.
    """
    live = {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}
    kept = []
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(v in live for v in eqn.outvars):
            kept.append(eqn)
            live.update(v for v in eqn.invars if not isinstance(v, jcore.Literal))
    return kept[::-1]


def _zeros_like_outputs(eqn) -> list:
    """infer_axes: stand-in outputs of a use that was recorded instead of computed.

    Inside ``shard_map`` each takes the output's varying mesh axes, so that collectives
    after the use (``psum``) still type-check.
    """
    outs = []
    for v in eqn.outvars:
        z = jnp.zeros(v.aval.shape, v.aval.dtype)
        vma = tuple(sorted(_varying_axes(v.aval)))
        outs.append(lax.pcast(z, vma, to="varying") if vma else z)
    return outs


# --- casts, pass-throughs, transpose -----------------------------------------------------


@_rule("convert_element_type")
def _cast_rule(eqn, invals, ctx):
    if not jnp.issubdtype(eqn.params["new_dtype"], jnp.floating):
        return None
    return [invals[0].replace(dtype=eqn.params["new_dtype"])]


@_rule("copy", "copy_p", "name", "optimization_barrier")
def _pass_through_rule(eqn, invals, ctx):
    if len(invals) != 1:
        return None
    return list(invals)


@_rule("transpose")
def _transpose_rule(eqn, invals, ctx):
    view = invals[0]
    return [view.replace(axes=tuple(view.axes[p] for p in eqn.params["permutation"]))]


# --- slices of a kernel along its output or stack axes -------------------------------------
# Gemma's FeedForward reads its fused gate and up kernel as ``w_gating[0]`` and
# ``w_gating[1]``; a loop over a stacked kernel reads ``w[i]``. Output columns and stack
# entries are independent in every method without shared matrices: the norm is per column,
# the factors per layer. So a slice (or a squeezed size-1 axis) of those axes is the node
# with each field cut alike, and the factored forward goes on. Input axes (the norm sums
# over them), VeRA's shared matrices and quantised bases fall back to forming W'.


def _field_axis(node, roles: tuple[str, ...], axis: int) -> int | None:
    """Where node axis ``axis`` sits in a field laid out as ``roles``; None if absent."""
    groups = {"stack": node.stack, "in": node.inputs, "out": node.outputs, "rank": (None,)}
    pos = 0
    for role in roles:
        if axis in groups[role]:
            return pos + groups[role].index(axis)
        pos += len(groups[role])
    return None


def _cut_fields(node, axis: int, cut, *, whole: bool = False) -> dict | None:
    """``{field: cut(field, its axis)}`` for the base and every field holding node axis
    ``axis``; None when the node cannot be cut there (an input axis; any but a stack axis of
    a node with VeRA's shared matrices, which span the input and output axes but no stack
    axis, or of a quantised base, whose blocks run along the flattened input and output
    axes; a field not laid out as its ``layout`` says).

    ``whole``: ``cut`` keeps every entry of the axis, permuted or moved (a flip, a move to
    the front). An input axis may then be cut too (the column norm sums over it, so it is
    invariant to a permutation of its entries)."""
    if (node.shared or node.quantised) and axis not in node.stack:
        return None
    if (whole and not type(node).layout) or (not whole and axis in node.inputs):
        return None
    # A quantised base's codes, scales and offsets too: its stack axes lead every leaf.
    fields = {"base": jax.tree.map(lambda v: cut(v, axis), node.base)}
    sizes = {"stack": len(node.stack), "in": len(node.inputs), "out": len(node.outputs)}
    for name, roles in type(node).layout.items():
        value = getattr(node, name)
        if value is None or value.ndim != sum(sizes.get(r, 1) for r in roles):
            return None
        at = _field_axis(node, roles, axis)
        if at is not None:
            fields[name] = cut(value, at)
    return fields


@_rule("slice")
def _slice_rule(eqn, invals, ctx):
    view = invals[0]
    p = eqn.params
    if p["strides"] is not None and any(s != 1 for s in p["strides"]):
        return None
    shape = eqn.invars[0].aval.shape
    cuts = {
        d: lambda x, at, start=start, stop=stop: lax.slice_in_dim(x, start, stop, axis=at)
        for d, (start, stop) in enumerate(zip(p["start_indices"], p["limit_indices"]))
        if (start, stop) != (0, shape[d])
    }
    return _cut_view(view, cuts, op="slice")


@_rule("dynamic_slice")
def _dynamic_slice_rule(eqn, invals, ctx):
    """``w[i]`` with a traced ``i`` (a ``fori_loop`` over a stack): as ``slice``."""
    view, *starts = invals
    if not _is_view(view) or any(_is_view(s) for s in starts):
        return None
    shape = eqn.invars[0].aval.shape
    cuts = {
        d: lambda x, at, start=start, size=size: lax.dynamic_slice_in_dim(x, start, size, at)
        for d, (start, size) in enumerate(zip(starts, eqn.params["slice_sizes"]))
        if size != shape[d]
    }
    return _cut_view(view, cuts, op="dynamic_slice")


def _cut_view(view: _View, cuts: dict, *, whole: bool = False, op: str | None = None):
    """``[view]`` with program axis ``d`` cut by ``cuts[d](x, axis)`` in every field that
    holds it; None when the node cannot be cut there (see :func:`_cut_fields`). ``op``: the
    slice's name, which a probe keeps (:class:`_Probe`)."""
    node = view.node
    for d, cut in cuts.items():
        axis = view.axes[d]
        if isinstance(node, _Probe):
            via = node.via if op is None or op in node.via else (*node.via, op)
            node = _Probe(cut(node.value, axis), node.index, node.origin, node.scanned, via)
            continue
        fields = _cut_fields(node, axis, cut, whole=whole)
        if fields is None:
            return None
        node = dataclasses.replace(node, **fields)
    return [view.replace(node=node)]


@_rule("rev")
def _rev_rule(eqn, invals, ctx):
    """``jnp.flip`` of a kernel (Keras's ``Conv*DTranspose`` and Linen's ``ConvTranspose``
    with ``transpose_kernel=True`` flip the window): the node with the base and every field
    holding a reversed axis flipped alike. A reversed input axis permutes the rows of ``A``
    (the column norm is invariant to it), an output axis the columns of ``B`` and the
    magnitude, a stack axis the layers. Under :func:`infer_axes` the axes stay where they
    were: a flip permutes entries, not axes."""
    flip = lambda x, at: lax.rev(x, (at,))  # noqa: E731
    return _cut_view(invals[0], dict.fromkeys(eqn.params["dimensions"], flip), whole=True)


@_rule("squeeze")
def _squeeze_rule(eqn, invals, ctx):
    return _squeezed(invals[0], eqn.params["dimensions"])


def _squeezed(view: _View, dims) -> list | None:
    """``[view]`` with its size-1 program axes ``dims`` dropped from the node and every field
    holding them (a squeezed stack axis takes that layer's pieces); None when the node
    cannot be cut there. A probe takes a leading axis as a stack axis where a matrix is
    left (one slice of a stack), and otherwise forgets it: a contraction after it reads the
    others."""
    node, axes = view.node, list(view.axes)
    for d in sorted(dims, reverse=True):
        axis = axes.pop(d)
        axes = [a - (a > axis) for a in axes]
        if isinstance(node, _Probe):
            origin = node.origin[:axis] + node.origin[axis + 1 :]
            # One matrix picked from a stack (w[i], a fori_loop's dynamic slice, jnp.take of
            # a scalar): a leading axis is a stack axis, one adapter per slice, as a scanned
            # one. A pick of another axis (w[:, i]: stack axes lead a quantised base) or one
            # that leaves a vector (x @ w[:, 0]) forgets an output axis.
            picked = node.origin[axis]
            stacked = node.value.ndim > 2 and all(picked < o for o in origin)
            scanned = node.scanned + (picked,) * stacked
            node = _Probe(jnp.squeeze(node.value, axis), node.index, origin, scanned, node.via)
            continue
        if node.outputs == (axis,):
            return None  # its only output axis: no kernel left
        fields = _cut_fields(node, axis, lambda x, at: jnp.squeeze(x, at))
        if fields is None:
            return None
        node = dataclasses.replace(
            node,
            **fields,
            stack=tuple(a - (a > axis) for a in node.stack if a != axis),
            inputs=tuple(a - (a > axis) for a in node.inputs),
        )
    return [view.replace(node=node, axes=tuple(axes))]


def _single_slice(eqn, ids) -> bool:
    """Whether a gather picks one slice of its operand, with no batch of indices:
    ``jnp.take(w, i, axis)`` with a scalar ``i`` (haliax's ``hax.take`` of one layer), the
    same as a ``dynamic_slice`` and a squeeze of the collapsed axes. A lookup of token ids
    (``table[ids]``, ids of any shape, ``(batch, 1)`` in a decode step included) has
    batch dimensions of indices and is none."""
    dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
    shape = eqn.invars[0].aval.shape
    return (
        np.ndim(ids) == 1
        and not dn.operand_batching_dims
        and all(sizes[d] == n for d, n in enumerate(shape) if d not in dn.start_index_map)
    )


def _taken(eqn, view: _View, ids, ctx: _Context) -> list | None:
    """``[view]`` cut as the single-slice gather ``eqn`` cuts the kernel (see
    :func:`_single_slice`): each field holding a cut axis is gathered alike (same index,
    mode and fill), then the collapsed axes are squeezed, as ``dynamic_slice`` and
    ``squeeze`` do. A probe is followed through it, so that the contraction after it
    records the kernel's true axes (a layer picked from a stack is not a lookup). None when
    the node cannot be cut there (:func:`_cut_fields`): an input axis (a lookup of one row,
    which the lookup rule reads), or other than a stack axis of VeRA or a quantised base."""
    p = eqn.params
    dn, sizes = p["dimension_numbers"], p["slice_sizes"]
    shape = eqn.invars[0].aval.shape
    cuts = {}
    for k, d in enumerate(dn.start_index_map):
        if sizes[d] == shape[d] and d not in dn.collapsed_slice_dims:
            continue  # taken whole (its start clamped to 0)
        if not ctx.probing and view.axes[d] in view.node.inputs:
            return None

        def cut(x, at, k=k, size=sizes[d]):
            slice_sizes = list(x.shape)
            slice_sizes[at] = size
            dnums = lax.GatherDimensionNumbers(
                offset_dims=tuple(range(x.ndim)), collapsed_slice_dims=(), start_index_map=(at,)
            )
            # A quantised base's integer codes take their own dtype's fill (NaN would not
            # cast); its scales are filled as the kernel is.
            fill = p["fill_value"] if jnp.issubdtype(x.dtype, jnp.inexact) else None
            return lax.gather(
                x, ids[k : k + 1], dnums, tuple(slice_sizes), indices_are_sorted=True,
                unique_indices=True, mode=p["mode"], fill_value=fill,
            )  # fmt: skip

        cuts[d] = cut
    cut_view = _cut_view(view, cuts, op="gather")
    return cut_view and _squeezed(cut_view[0], dn.collapsed_slice_dims)


# --- a kernel times a scalar ----------------------------------------------------------------
# gemma3n's ``Einsum(w_scale=...)`` computes ``jnp.einsum(eqn, x, w * w_scale)``. Every
# adapted use is linear in the kernel, ``x (c W') = c (x W')``: the view carries the factor
# and the contraction (or lookup) scales its output by it.


def _scalar_of(x, ctx: _Context):
    """The scalar ``x`` holds (a literal, a 0-d or size-1 array, or an array broadcast from
    one in this program), or None."""
    if _is_view(x):
        return None
    if math.prod(np.shape(x)) == 1:
        return jnp.reshape(x, ())
    hit = ctx.broadcasts.get(id(x))
    return hit[1] if hit is not None and hit[0] is x else None


@_rule("mul", "div")
def _scaled_rule(eqn, invals, ctx):
    """``c * w``, ``w * c`` or ``w / c`` with a scalar ``c`` that is not the kernel: the view
    with the factor ``c`` (``1 / c``). Under :func:`infer_axes` the probe goes on through
    any product of the kernel's shape (a mask, a per-column scale): the contraction after
    it tells the kernel's axes; apply forms W' for a non-scalar product, as before."""
    a, b = invals
    if _is_view(a) == _is_view(b) or (eqn.primitive.name == "div" and not _is_view(a)):
        return None
    at = 0 if _is_view(a) else 1
    view, other = invals[at], invals[1 - at]
    aval = eqn.outvars[0].aval
    if aval.shape != eqn.invars[at].aval.shape or aval.dtype != view.dtype:
        return None  # the product broadcasts the kernel to another shape, or casts it
    op = eqn.primitive.name
    if ctx.probing:
        probe = view.node
        via = probe.via if op in probe.via else (*probe.via, op)
        return [view.replace(node=_Probe(probe.value, probe.index, probe.origin, probe.scanned,
                                         via))]  # fmt: skip
    c = _scalar_of(other, ctx)
    if c is None:
        return None
    if op == "div":
        c = 1 / c
    return [view.replace(factor=c if view.factor is None else view.factor * c)]


# --- sharding constraints and reshards of a kernel -----------------------------------------
# Flax's nn.with_partitioning constrains each boxed param to its spec when a mesh is set
# (``sharding_constraint``); on an Explicit mesh, FSDP gathers a kernel before its contraction
# with ``jax.sharding.reshard``. Either asks for a layout of the kernel, not for its values:
# the node stays a node, the base and every field laid out like the kernel axes they span.


def _field_specs(node: Adapter, kernel_spec: tuple) -> dict | None:
    """``{field: PartitionSpec}`` for the base and every field of ``node`` its kind lays out
    (``layout``), from the kernel's spec over the node's axes: ``A ([*stack,] *in, r)``
    takes the input axes' entries and None for the rank, ``B`` None and the output axes',
    the magnitude the output axes'. Shared fields (VeRA's matrices) are replicated, a
    quantised base is left out; None when a field does not fit its layout."""
    roles = {
        "stack": tuple(kernel_spec[p] for p in node.stack),
        "in": tuple(kernel_spec[p] for p in node.inputs),
        "out": tuple(kernel_spec[p] for p in node.outputs),
        "rank": (None,),
    }
    specs = {} if node.quantised else {"base": P(*kernel_spec)}
    # Replicated rather than left: a reshard may move the kernel onto another mesh (the
    # Auto-typed one of jax.sharding.auto_axes), where every piece must then be.
    specs.update({name: P(*(None,) * getattr(node, name).ndim) for name in node.shared})
    for name, layout in type(node).layout.items():
        value = getattr(node, name)
        if name in node.shared or value is None:
            continue
        spec = sum((roles[r] for r in layout), ())
        if value.ndim != len(spec):
            return None
        specs[name] = P(*spec)
    return specs


def _laid_out_rule(key: str):
    """The rule of a primitive that only changes a value's sharding (named by param
    ``key``): the same primitive on the base and on each field, with its spec."""

    def rule(eqn, invals, ctx):
        view, sharding = invals[0], eqn.params[key]
        if len(invals) != 1 or not isinstance(sharding, jax.sharding.NamedSharding):
            return None
        if eqn.params.get("layout") is not None:
            return None  # a memory layout is the kernel's own: no field has it
        if ctx.probing:
            return [view]
        node = view.node
        if node.quantised and key == "dst_sharding":
            return None  # its codes and scales are blocked over the input axes
        specs = _field_specs(node, _node_spec(view, sharding.spec))
        if specs is None:
            return None
        fields = {}
        for name, spec in specs.items():
            params = {**eqn.params, key: sharding.update(spec=spec)}
            if "unconstrained_dims" in params:
                params["unconstrained_dims"] = frozenset(
                    d for d, entry in enumerate(spec) if entry is P.UNCONSTRAINED
                )
            fields[name] = _bind(eqn, [getattr(node, name)], params)[0]
        return [view.replace(node=dataclasses.replace(node, **fields))]

    return rule


_rule("sharding_constraint")(_laid_out_rule("sharding"))
_rule("reshard")(_laid_out_rule("dst_sharding"))


# --- calls, remat, control flow ----------------------------------------------------------


def _concrete_sharding(s):
    return s if isinstance(s, jax.sharding.Sharding) else None


#: Primitives that only lay a kernel out anew (or scale it): their rules return views of it.
_LAYOUT_PRIMITIVES = frozenset(
    {"rev", "transpose", "slice", "squeeze", "convert_element_type", "copy", "copy_p",
     "dynamic_slice", "gather", "mul", "div"}
)  # fmt: skip


def _relays_only(jaxpr, p, invals) -> bool:
    """Whether a nested jit only lays its kernel operands out anew (``jnp.flip`` is a jit of
    one ``rev``) and asks for no sharding: inlined, its outputs stay views of the kernels.
    Other operations are allowed where they compute no output but the kernels' views
    (``jnp.take(w, i, axis=0)`` is a jit of a ``gather``, with arithmetic on ``i``)."""
    shardings = [*p.get("in_shardings", ()), *p.get("out_shardings", ())]
    if any(_concrete_sharding(s) is not None for s in shardings):
        return False
    kernels = {v for v, x in zip(jaxpr.invars, invals) if _is_view(x)}
    for e in jaxpr.eqns:
        if any(v in kernels for v in e.invars if not isinstance(v, jcore.Literal)):
            if e.primitive.name not in _LAYOUT_PRIMITIVES:
                return False
            kernels.update(e.outvars)
    return all(e.primitive.name in _LAYOUT_PRIMITIVES for e in jaxpr.eqns) or all(
        v in kernels for v in jaxpr.outvars if not isinstance(v, jcore.Literal)
    )


@_rule("jit", "pjit", "closed_call", "core_call")
def _call_rule(eqn, invals, ctx):
    p = eqn.params
    closed = p.get("jaxpr", p.get("call_jaxpr"))
    jaxpr, consts = (closed.jaxpr, closed.consts) if hasattr(closed, "jaxpr") else (closed, ())
    if eqn.primitive.name not in ("jit", "pjit") or ctx.probing or _relays_only(jaxpr, p, invals):
        return _eval(jaxpr, consts, invals, ctx)
    # Stay a jit: a nested jit keeps its name and the shardings it asked for. (Donation
    # only acts on a top-level call, never inside an outer trace, so none is lost.)
    in_sh = [_concrete_sharding(s) for s in p.get("in_shardings", ())]
    out_sh = [_concrete_sharding(s) for s in p.get("out_shardings", ())]

    def body(*args):
        args = [
            lax.with_sharding_constraint(a, s) if s is not None and not _is_view(a) else a
            for a, s in zip(args, in_sh + [None] * len(args))
        ]
        outs = _eval(jaxpr, consts, args, ctx)
        outs = [_plain(o, ctx, "returned from a nested jit") for o in outs]
        return [
            lax.with_sharding_constraint(o, s) if s is not None else o
            for o, s in zip(outs, out_sh + [None] * len(outs))
        ]

    body.__name__ = str(p.get("name", "jit"))
    return list(jax.jit(body, inline=bool(p.get("inline", False)))(*invals))


@_rule("remat2", "checkpoint")
def _remat_rule(eqn, invals, ctx):
    jaxpr = eqn.params["jaxpr"]

    # The key travels as an argument: a remat body must not close over outer tracers that
    # it would then save. The policy decides what is kept, so outputs are scaled plainly
    # (_rescaled would make a rematerialised body keep one more output-sized array).
    def body(key, *args):
        return _eval(jaxpr, (), args, ctx.with_key(key, in_scan=False))

    fn = jax.checkpoint(body, prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"])
    return fn(ctx.next_key() if ctx.key is not None else None, *invals)


def _scannable(view: _View):
    """``(the part a scan slices, shared leaves)`` when a scan may slice ``view`` along its
    program axis 0, a stack axis of its node wherever the node has it (Linen's ``nn.scan``
    with ``variable_axes={'params': 1}`` moves axis 1 to the front); None otherwise. The
    part sliced has that axis first in every leaf holding it. Under :func:`infer_axes` any
    axis may be scanned: it is recorded as a stack axis."""
    axis, node = view.axes[0], view.node
    if isinstance(node, _Probe):
        value = jnp.moveaxis(node.value, axis, 0)
        return _Probe(value, node.index, node.origin, node.scanned, node.via), {}
    if axis not in node.stack:
        return None
    sliced, shared = _split_shared(node)
    if axis == 0:  # the leading stack axis: first in the base and every stacked field
        return sliced, shared
    fields = _cut_fields(sliced, axis, lambda x, at: jnp.moveaxis(x, at, 0), whole=True)
    return None if fields is None else (dataclasses.replace(sliced, **fields), shared)


def _split_shared(node):
    """(part a scan slices, shared leaves): shared leaves (VeRA's matrices) are not sliced."""
    if isinstance(node, _Probe):
        return node, {}
    shared = {name: getattr(node, name) for name in node.shared}
    return dataclasses.replace(node, **dict.fromkeys(shared)), shared


def _sliced_view(view: _View, sliced, shared) -> _View:
    """The view of one slice of a scanned kernel: its scanned (stack) axis is gone."""
    axis = view.axes[0]
    if isinstance(sliced, _Probe):
        probe = view.node
        scanned = (*probe.scanned, probe.origin[axis])
        origin = probe.origin[:axis] + probe.origin[axis + 1 :]
        node = _Probe(sliced.value, probe.index, origin, scanned, probe.via)
    else:
        node = dataclasses.replace(
            sliced,
            stack=tuple(p - (p > axis) for p in view.node.stack if p != axis),
            inputs=tuple(p - (p > axis) for p in view.node.inputs),
            **shared,
        )
    return view.replace(node=node, axes=tuple(a - (a > axis) for a in view.axes[1:]))


def _scan_counts(params) -> tuple[int, int]:
    """``(number of consts, number of carries)`` of a ``scan`` equation."""
    if "num_consts" in params:  # jax <= 0.10
        return params["num_consts"], params["num_carry"]
    # jax >= 0.11: ``ft_in`` groups the inputs as (consts, carry, xs).
    consts, carry, _ = params["ft_in"].unpack()
    return len(consts), len(carry)


@_rule("scan")
def _scan_rule(eqn, invals, ctx):
    p = eqn.params
    nc, ncar = _scan_counts(p)
    consts, init, xs = invals[:nc], invals[nc : nc + ncar], invals[nc + ncar :]
    init = [_plain(x, ctx, "scan carry") for x in init]
    xs_in, rebuild = [], []
    for x in xs:
        lead = _scannable(x) if _is_view(x) else None
        if lead is not None:
            xs_in.append(lead[0])
            rebuild.append((x, lead[1]))
        else:
            xs_in.append(_plain(x, ctx, "scan over a non-stack axis"))
            rebuild.append(None)
    closed = p["jaxpr"]
    keys = None
    if ctx.key is not None:
        keys = jax.random.split(ctx.next_key(), p["length"])

    passed: dict[int, _View] = {}  # filled when the body is traced: output -> stacked kernel

    def body(carry, sliced):
        x_slices, key = sliced
        xs_body = [
            x if info is None else _sliced_view(info[0], x, info[1])
            for x, info in zip(x_slices, rebuild)
        ]
        body_ctx = ctx.with_key(key, in_scan=True)
        outs = _eval(closed.jaxpr, closed.consts, [*consts, *carry, *xs_body], body_ctx)
        ys = []
        for i, y in enumerate(outs[ncar:]):
            stacked = _passed_through(y, xs_body, rebuild)
            if stacked is not None:  # the layer's own kernel returned (nnx.remat's state)
                passed[i] = stacked
                y = jnp.zeros((), jnp.int8)
            ys.append(y)
        outs = [_plain(o, ctx, "scan output") for o in [*outs[:ncar], *ys]]
        return outs[:ncar], outs[ncar:]

    carry, ys = lax.scan(
        body, list(init), (xs_in, keys), length=p["length"], reverse=p["reverse"],
        unroll=p["unroll"],
    )  # fmt: skip
    return [*carry, *(passed.get(i, y) for i, y in enumerate(ys))]


def _passed_through(y, xs_body: list, rebuild: list) -> _View | None:
    """The stacked kernel whose slice the scan body returns unchanged as output ``y``, or
    None: the scan's output is then that kernel itself, stacked back as it came in."""
    if not _is_view(y):
        return None
    for x, info in zip(xs_body, rebuild):
        if (
            info is not None
            and x.factor is y.factor
            and (x.path, x.dtype, x.axes, type(x.node)) == (y.path, y.dtype, y.axes, type(y.node))
            and jax.tree.structure(x.node) == jax.tree.structure(y.node)
            and all(
                a.shape == b.shape
                for a, b in zip(jax.tree.leaves(x.node), jax.tree.leaves(y.node), strict=True)
            )
        ):
            return info[0]
    return None


@_rule("cond")
def _cond_rule(eqn, invals, ctx):
    index, *ops = invals

    def branch(closed, *args):
        # Branches must return arrays of one type: a kernel returned by one branch is formed.
        outs = _eval(closed.jaxpr, closed.consts, args, ctx)
        return [_plain(o, ctx, "returned from a cond branch") for o in outs]

    fns = [functools.partial(branch, br) for br in eqn.params["branches"]]
    return list(lax.switch(index, fns, *ops))


@_rule("while")
def _while_rule(eqn, invals, ctx):
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts = invals[:cn], invals[cn : cn + bn]
    init = [_plain(x, ctx, "while carry") for x in invals[cn + bn :]]
    cj, bj = p["cond_jaxpr"], p["body_jaxpr"]

    if ctx.key is not None:  # a key carried and split per iteration: fresh dropout masks
        return _keyed_while(cj, bj, cconsts, bconsts, init, ctx)

    def cond(carry):
        return _eval(cj.jaxpr, cj.consts, [*cconsts, *carry], ctx)[0]

    def body(carry):
        outs = _eval(bj.jaxpr, bj.consts, [*bconsts, *carry], ctx)
        return [_plain(o, ctx, "while output") for o in outs]

    return list(lax.while_loop(cond, body, init))


@_pytree_dataclass
class _Factored(Adapter):
    """An adapted kernel as the pieces the factored forward reads, its scale precomputed.

    Carries an adapter into ``shard_map``: the scale ``c = m / ||W0 + dW||_c`` is computed
    outside from the whole kernel (a column norm over one shard of the input axes would be
    wrong), and every piece is sharded like the kernel axes it spans. Fields: ``base`` in the
    kernel's layout, ``left ([*stack,] *in, r)``, ``mid (*stack, r)`` or None,
    ``right ([*stack,] r, *out)``, ``post (*stack, *out)`` or None, ``scale (*stack, *out)``
    or None.
    """

    base: jax.Array
    left: jax.Array
    mid: jax.Array | None
    right: jax.Array
    post: jax.Array | None
    scale: jax.Array | None
    stack: tuple[int, ...] = static(())
    inputs: tuple[int, ...] = static((0,))
    dropout: float = static(0.0)
    assumed_layout: bool = static(False)

    @classmethod
    def of(cls, node: Adapter) -> _Factored:
        """The pieces of ``node``, its output scale computed from its whole kernel."""
        left, mid, right, post = node.low_rank()
        return cls(
            node.base, left, mid, right, post, node.output_scale(),
            stack=node.stack, inputs=node.inputs, dropout=node.dropout,
            assumed_layout=node.assumed_layout,
        )  # fmt: skip

    def specs(self, kernel_spec) -> _Factored:
        """Partition specs of the pieces, given the kernel's: each follows its axes."""
        ks = (*kernel_spec, *(None,) * (self.base.ndim - len(kernel_spec)))
        stack = [ks[p] for p in self.stack]
        ins = [ks[p] for p in self.inputs]
        outs = [ks[p] for p in self.outputs]

        def own(x, *axes):  # shared pieces (VeRA) have no stack axes
            return None if x is None else P(*(stack if x.ndim > len(axes) else ()), *axes)

        return dataclasses.replace(
            self, base=P(*ks), left=own(self.left, *ins, None), mid=own(self.mid, None),
            right=own(self.right, None, *outs), post=own(self.post, *outs),
            scale=own(self.scale, *outs),
        )  # fmt: skip

    def low_rank(self):
        return self.left, self.mid, self.right, self.post

    def output_scale(self, base=None):
        return self.scale

    def factors(self):
        rank = self.left.shape[-1]
        left, right = self.left, self.right
        if self.mid is not None:
            left = left * self.mid.reshape(*self.stack_shape, *(1,) * len(self.inputs), rank)
        if self.post is not None:
            right = right * self.post.reshape(*self.stack_shape, 1, *self.out_shape)
        return left, right


def _node_spec(view: _View, spec) -> tuple:
    """The partition spec of ``view``'s node (kernel) from that of the value it shows."""
    spec = (*spec, *(None,) * (len(view.axes) - len(spec)))
    out = [None] * len(view.axes)
    for k, a in enumerate(view.axes):
        out[a] = spec[k]
    return tuple(out)


def _typed(x: jax.Array, spec, mesh) -> jax.Array:
    """``x`` resharded to ``spec`` where ``mesh`` has ``Explicit`` axes and ``x``'s type
    says otherwise: there ``shard_map`` checks its ``in_specs`` against the arguments' types,
    operands of an elementwise op must be sharded alike, and a piece made here (VeRA's ``B``
    cut from the replicated shared matrix, the scale, a formed ``W'``) or a factor placed
    apart from its kernel may be sharded unlike the piece of the kernel it meets."""
    if jax.sharding.AxisType.Explicit not in getattr(mesh, "axis_types", ()):
        return x
    want = (*spec, *(None,) * (x.ndim - len(spec)))
    have = getattr(jax.typeof(x).sharding, "spec", ())
    return reshard_in_steps(x, (*have, *(None,) * (x.ndim - len(have))), want, mesh)


def _placed_like_kernel(node: Adapter) -> Adapter:
    """``node`` with its small leaves resharded to follow the kernel axes they span, where
    they sit on ``Explicit`` mesh axes (else ``node`` itself, so that an ``Auto`` mesh
    compiles as before).

    There the pieces of :meth:`Adapter.low_rank` and :meth:`Adapter.output_scale` meet
    kernel-sized terms elementwise (``x W0 + (x L) R``, VeRA's ``A_s diag(d)``), which is a
    sharding type error when a user placed ``B``, the magnitude or VeRA's ``b`` and ``d``
    on other mesh axes than the kernel's: only those small leaves move (their gradients
    move back), never the base, its codes, or an activation. The specs are
    :func:`_field_specs`'s, the placement ``dora_jax.sharding.shardings`` gives, under
    which nothing moves."""
    mesh = _explicit_mesh(node)
    if mesh is None:
        return node
    specs = _field_specs(node, _spec_on(node._kernel_type(), mesh))
    if specs is None:
        return node
    target = _concrete_mesh(mesh, node)
    moved = {
        name: _typed(getattr(node, name), spec, target)
        for name, spec in specs.items()
        if name != "base"
    }
    return dataclasses.replace(node, **moved)


@_rule("shard_map")
def _shard_map_rule(eqn, invals, ctx):
    """A ``shard_map`` over adapted kernels: the factored forward inside, scale from outside.

    The output scale ``m / ||W0 + dW||_c`` is computed here, outside, from the whole kernel,
    and enters the body sharded like the kernel's output axes; the low-rank pieces follow
    the kernel's input and output axes. A body that sums partial products over a sharded
    input axis (``psum``) then sums scaled partials: the scale is per output feature, so
    that equals the scaled sum. Under :func:`infer_axes` the probed kernels enter sharded
    like the program asked and the body records their uses.
    """
    p = eqn.params
    args, specs, views = [], [], []
    for x, spec in zip(invals, p["in_specs"]):
        if not _is_view(x):
            args.append(x)
            specs.append(spec)
            views.append(None)
            continue
        if not ctx.probing and x.node.quantised:
            args.append(_typed(_plain(x, ctx, "shard_map"), spec, p["mesh"]))
            specs.append(spec)
            views.append(None)
            continue
        node_spec = _node_spec(x, spec)
        if ctx.probing:
            probe = x.node
            leaves, treedef = [probe.value], jax.tree.structure(probe)
            spec_leaves = [P(*node_spec)]
        else:
            node = _Factored.of(x.node)
            leaves, treedef = jax.tree.flatten(node)
            spec_leaves = treedef.flatten_up_to(node.specs(node_spec))
        if x.factor is not None:  # a scalar: enters replicated, after the node's pieces
            leaves, spec_leaves = [*leaves, jnp.asarray(x.factor)], [*spec_leaves, P()]
        views.append((len(leaves) - (x.factor is not None), treedef, x))
        args += [_typed(leaf, s, p["mesh"]) for leaf, s in zip(leaves, spec_leaves)]
        specs += spec_leaves
    axes = sorted(p["newly_manual_axes"])
    key = ctx.next_key() if ctx.key is not None else None

    def body(key, *flat):
        inputs, pos = [], 0
        for info in views:
            if info is None:
                inputs.append(flat[pos])
                pos += 1
            else:
                n, treedef, view = info
                node = jax.tree.unflatten(treedef, flat[pos : pos + n])
                pos += n
                factor = None
                if view.factor is not None:
                    factor, pos = flat[pos], pos + 1
                inputs.append(view.replace(node=node, factor=factor))
        if key is not None:  # a different dropout mask on every shard
            for name in axes:
                key = jax.random.fold_in(key, lax.axis_index(name))
        outs = _eval(p["jaxpr"], (), inputs, ctx.with_key(key))
        return tuple(_plain(o, ctx, "shard_map output") for o in outs)

    fn = jax.shard_map(
        body, mesh=p["mesh"], in_specs=(P(), *specs), out_specs=p["out_specs"],
        check_vma=p["check_vma"], axis_names=set(p["newly_manual_axes"]),
    )  # fmt: skip
    return list(fn(key, *args))


@_rule("pvary")
def _pvary_rule(eqn, invals, ctx):
    """A type-level marker: views pass through (their pieces are marked where used)."""
    outs = list(invals)
    plain = [i for i, x in enumerate(invals) if not _is_view(x)]
    if plain:
        for i, a in zip(plain, _bind(eqn, [invals[i] for i in plain])):
            outs[i] = a
    return outs


def _keyed_while(cj, bj, cconsts, bconsts, init, ctx: _Context) -> list:
    """The while loop with a key carried and split per iteration (fresh dropout masks)."""

    def cond(carry):
        return _eval(cj.jaxpr, cj.consts, [*cconsts, *carry[0]], ctx)[0]

    def body(carry):
        values, key = carry
        key, use = jax.random.split(key)
        outs = _eval(bj.jaxpr, bj.consts, [*bconsts, *values], ctx.with_key(use))
        return [_plain(o, ctx, "while output") for o in outs], key

    return list(lax.while_loop(cond, body, (init, ctx.next_key()))[0])


# --- contractions: dot_general, conv, gather ---------------------------------------------


def _layout_error(view: _View, stack_axes, input_axes, use: str) -> ValueError:
    """The kernel is contracted on other axes than its node was adapted for."""
    node = view.node
    shape = tuple(node.base.shape)
    built = Axes(node.stack, node.inputs)
    stack_axes, input_axes = tuple(sorted(stack_axes)), tuple(sorted(input_axes))
    assumed = (
        " (assumed: a 2-D kernel is taken as Flax's (in, out) unless its axes are given)"
        if node.assumed_layout
        else ""
    )
    try:
        hint = Axes(stack_axes, input_axes).einsum_hint(len(shape))
    except ValueError:
        hint = "?"
    return ValueError(
        f"Adapted kernel '{view.path}' with shape {shape} was adapted as {built!r}{assumed}, "
        f"but {use} contracts it over axes {input_axes} (batch axes {stack_axes}). DoRA's "
        f"magnitude must sit on the outputs of the use, so this would be a different DoRA. "
        f"If that is the kernel's layout (e.g. an Equinox / torch (out, in) weight used as "
        f"x @ w.T), wrap it with axes={{'{view.path}': dora_jax.Axes(stack={stack_axes}, "
        f"inputs={input_axes})}} (in einsum letters: dora_jax.Axes.from_einsum('{hint}')), "
        f"or learn the axes from the model with axes=dora_jax.infer_axes(fn, params, *args)."
        + (
            f" If the kernel is (in, out) and this is a deliberate use of W' transposed (a tied "
            f"embedding or decoder), give its axes explicitly, axes={{'{view.path}': "
            f"dora_jax.Axes(0, 1)}}, to allow it."
            if node.assumed_layout
            else ""
        )
    )


def _align(v: jax.Array, labels, target) -> jax.Array:
    """``v`` (axes named by ``labels``) transposed and expanded to broadcast on ``target``."""
    labels = list(labels)
    order = sorted(range(len(labels)), key=lambda i: target.index(labels[i]))
    if order != list(range(len(labels))):
        v = jnp.transpose(v, order)
        labels = [labels[i] for i in order]
    shape = [v.shape[labels.index(t)] if t in labels else 1 for t in target]
    return v.reshape(shape)


def _base_terms(node: Adapter, compute: Callable, x: jax.Array):
    """``(compute(W0, x), output scale)``; a quantised base is dequantised again in the
    backward pass instead of being saved (saved, the dequantised kernels would form a
    full-precision copy of the base: QDoRA)."""

    def terms(node, x):
        base = node.dequantised_base()  # frozen: its gradient was stopped on entry
        scale = node.output_scale(base)
        return compute(base, x, scale), scale

    if node.quantised:
        terms = jax.checkpoint(terms)
    return terms(node, x)


def _dropped(node: Adapter, x: jax.Array, ctx: _Context) -> jax.Array:
    """The low-rank branch's input, with adapter dropout when active."""
    if node.dropout > 0.0 and ctx.key is not None:
        keep = _dropout_keep(ctx.next_key(), x.shape, node.dropout)
        return jnp.where(keep, x / (1.0 - node.dropout), 0).astype(x.dtype)
    return x


@jax.custom_vjp
def _rescaled(pre: jax.Array, scale: jax.Array) -> jax.Array:
    """``pre * scale`` in ``pre``'s dtype, ``scale`` broadcasting over ``pre``'s rows: the
    DoRA output ``(x W0 + s x A B) * m / ||W0 + s A B||_c``.

    Its backward pass keeps the output ``y`` itself, in its own dtype, and gets the scale's
    gradient from it: ``d(scale) = sum_rows(g * y) / scale``. Where the model keeps ``y``
    anyway (a SwiGLU's gate and up projections, attention's flat q, k, v), that is one
    array instead of two per projection and layer, which a ``scan`` would otherwise stack
    (scanned bench Llama: DoRA's step 463.5 -> 414.2 MB, LoRA's 366.6), and a bfloat16
    model keeps no float32 copy of it. Only scan bodies use it: unscanned, XLA's buffer
    assignment does better with the plain product (the same step: 379.2 MB plain, 467.2 MB
    with this rule).

    A custom VJP rather than a custom JVP: written as a JVP, the magnitude term ``y *
    ratio`` either keeps a float32 copy of a low-precision ``y`` or, as a ``dot_general``
    without contraction, runs as a transposed reduction (scanned bench step 1.29x LoRA's
    on the CPU, against 1.04-1.07x here). So scan bodies with DoRA or DVoRA adapters
    support reverse-mode differentiation (``grad``, ``vjp``, Hessian-vector products
    reverse-over-reverse) but not forward mode (``jvp``, ``jacfwd``, Hessian-vector products
    through ``jvp``); unscanned models support both.

    Exact wherever the scale is nonzero. A column whose magnitude is exactly 0 gets a zero
    magnitude gradient (``y`` is 0 there, so ``pre`` cannot be recovered). That is the
    true gradient for a kernel column of zeros (wrap warns about those: its magnitude
    starts at 0 and the column's low-rank update, scaled by 0, stays 0), but not for a
    nonzero column whose magnitude was set to exactly 0 by hand.
    """
    return (pre * scale).astype(pre.dtype)


def _rescaled_fwd(pre: jax.Array, scale: jax.Array):
    y = _rescaled(pre, scale)
    return y, (y, scale)


def _row_sum(g: jax.Array, v: jax.Array, scale: jax.Array) -> jax.Array:
    """``sum(g * v)`` over the rows ``scale`` broadcasts along, in float32 or wider, shaped
    like ``scale``; 0 where ``scale`` is 0.

    Written for XLA:CPU, which does not fuse a reduction with the product it sums: it forms
    the product elementwise and sums it with a library (YNNPACK) reduction. Here the
    products of the first row axis's :data:`_ROW_BLOCKS` contiguous blocks are summed: XLA:CPU
    forms each block's product in its own elementwise pass and adds the blocks inside the
    reduction (scanned bench DoRA step about 1.5% faster and 2 MB less than one product of
    all rows; no measurable difference at SmolLM2's shape). The mask inside the product
    keeps each elementwise pass reading the saved ``v`` in place from a scan's stack (a bare
    multiply-and-sum is taken into the library reduction whole, which first copies ``v``
    out: +5.5 MB on the scanned bench step). Backends that fuse reductions read ``g`` and
    ``v`` once either way."""
    acc = jnp.promote_types(scale.dtype, jnp.float32)
    lead = v.ndim - scale.ndim
    rows = tuple(range(lead)) + tuple(
        lead + i for i, d in enumerate(scale.shape) if d == 1 and v.shape[lead + i] != 1
    )
    keep = scale != 0
    if not rows:
        return jnp.where(keep, g.astype(acc) * v.astype(acc), 0).reshape(scale.shape)
    axis, n = rows[0], v.shape[rows[0]]

    def product(start: int, stop: int) -> jax.Array:
        gb, vb = (lax.slice_in_dim(a, start, stop, axis=axis) for a in (g, v))
        return jnp.where(keep, gb.astype(acc) * vb.astype(acc), 0)

    blocks = _ROW_BLOCKS if n >= 2 * _ROW_BLOCKS else 1
    size = n // blocks
    partial = product(0, size)
    for b in range(1, blocks):
        partial = partial + product(b * size, (b + 1) * size)
    total = jnp.sum(partial, axis=rows)
    if blocks * size < n:
        total = total + jnp.sum(product(blocks * size, n), axis=rows)
    return total.reshape(scale.shape)


# Blocks of rows whose products _row_sum adds before reducing them.
_ROW_BLOCKS = 8


def _rescaled_bwd(residuals, g: jax.Array):
    y, scale = residuals
    d_scale = _row_sum(g, y, scale) / jnp.where(scale != 0, scale, 1)
    return (g * scale).astype(y.dtype), d_scale.astype(scale.dtype)


_rescaled.defvjp(_rescaled_fwd, _rescaled_bwd)


@jax.custom_vjp
def _rescaled_sum(base: jax.Array, z: jax.Array, post: jax.Array, scale: jax.Array):
    """``(base + z * post) * scale`` in ``base``'s dtype: DVoRA's output, ``z`` the low-rank
    branch before VeRA's output scaling ``post`` (``b``). As :func:`_rescaled`, with ``post``
    inside: the backward pass keeps ``y`` and ``z`` (VeRA keeps ``z`` for ``b``'s gradient)
    and forms the two cotangents ``g * scale`` and ``g * scale * post`` straight from ``g``
    (autodiff of the two products keeps one more output-sized temporary per projection:
    scanned bench DVoRA 495.2 -> 487.2 MB, VeRA 466.7)."""
    return ((base + z * post) * scale).astype(base.dtype)


def _rescaled_sum_fwd(base, z, post, scale):
    y = _rescaled_sum(base, z, post, scale)
    return y, (y, z, post, scale)


def _rescaled_sum_bwd(residuals, g: jax.Array):
    y, z, post, scale = residuals
    d_scale = _row_sum(g, y, scale) / jnp.where(scale != 0, scale, 1)
    d_post = _row_sum(g, z, scale) * scale
    return (
        (g * scale).astype(y.dtype),
        (g * (scale * post)).astype(z.dtype),
        d_post.astype(post.dtype),
        d_scale.astype(scale.dtype),
    )


_rescaled_sum.defvjp(_rescaled_sum_fwd, _rescaled_sum_bwd)


def _stacked(leaf, node: Adapter, unstacked_ndim: int) -> bool:
    """Whether a low-rank leaf carries the node's stack axes (VeRA's shared ones do not)."""
    return len(node.stack) > 0 and leaf.ndim != unstacked_ndim


@_rule("dot_general")
def _dot_general_rule(eqn, invals, ctx):
    lhs, rhs = invals
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if _is_view(rhs) and not _is_view(lhs):
        view, x, kc, xc, kb, xb, kernel_first = rhs, lhs, rc, lc, rb, lb, False
    elif _is_view(lhs) and not _is_view(rhs):
        view, x, kc, xc, kb, xb, kernel_first = lhs, rhs, lc, rc, lb, rb, True
    else:
        return None
    if ctx.probing:
        ctx.record(view, "contract", kb, kc)
        return _zeros_like_outputs(eqn)
    out_sharding = eqn.params.get("out_sharding")
    if out_sharding is not None:
        # Explicit mesh axes, the output's sharding named (flax's Gemma: out_sharding= on
        # every einsum): the factored products run with the axes made Auto, as XLA
        # propagates shardings on an Auto mesh, and the result takes the named sharding.
        # Their own operands may be sharded inconsistently (x's features over one axis,
        # the kernel's input axis over another), which Explicit axes refuse unnamed.
        def run(x, node):
            return _factored_dot_general(eqn, view.replace(node=node), x, kc, xc, kb, xb,
                                         kernel_first, ctx)  # fmt: skip

        mesh = jax.sharding.get_abstract_mesh()
        if isinstance(out_sharding, P) and mesh.empty:
            mesh = jax.typeof(x).sharding.mesh
        with jax.sharding.use_abstract_mesh(mesh):
            y = jax.sharding.auto_axes(run, out_sharding=out_sharding)(x, view.node)
        return [_times_factor(y, view)]
    y = _factored_dot_general(eqn, view, x, kc, xc, kb, xb, kernel_first, ctx)
    return [_times_factor(y, view)]


def _factored_dot_general(eqn, view, x, kc, xc, kb, xb, kernel_first, ctx):
    """The factored ``dot_general`` of ``x`` with the adapted kernel of ``view``."""
    node = _placed_like_kernel(view.node)
    nkc = [view.axes[d] for d in kc]  # as node (kernel) axes
    nkb = [view.axes[d] for d in kb]
    stack, inputs, outputs = node.stack, node.inputs, node.outputs
    if set(nkc) == set(inputs) and set(nkb) <= set(stack):
        transposed = False
    elif set(nkc) == set(outputs) and set(nkb) == set(stack) and not node.assumed_layout:
        transposed = True  # W'^T, e.g. a tied embedding's attend
    else:
        raise _layout_error(view, nkb, nkc, "a dot_general (matmul / einsum)")

    # x in (batch stack..., free..., contracted...) order, stack and contracted axes in
    # kernel order, free axes flattened into one: XLA on CPU differentiates 2-D matmuls much
    # faster than 3-D ones, and the reshape costs nothing.
    pair = dict(zip(nkc, xc)) | dict(zip(nkb, xb))
    sb = [s for s in stack if s in nkb]
    contracted = outputs if transposed else inputs
    free_x = [d for d in range(x.ndim) if d not in xc and d not in xb]
    perm = [pair[s] for s in sb] + free_x + [pair[a] for a in contracted]
    arranged = [x.shape[d] for d in perm]
    free_shape = tuple(arranged[len(sb) : len(sb) + len(free_x)])
    x = ctx.arrange(
        x, perm, (*arranged[: len(sb)], math.prod(free_shape), *arranged[len(sb) + len(free_x) :])
    )
    kw = dict(
        precision=eqn.params["precision"],
        preferred_element_type=eqn.params["preferred_element_type"],
    )
    dtypes = (view.dtype, _compute_dtype(eqn, view))
    if transposed:
        y, labels = _contract_outputs(node, x, *dtypes, kw, ctx)
    elif len(sb) == len(stack):
        y, labels = _contract_batched(node, x, *dtypes, kw, ctx)
    else:
        y, labels = _contract_inputs(node, x, sb, *dtypes, kw, ctx)

    # Unflatten the free axes and put the result in dot_general's output order: batch axes,
    # then the free axes of lhs, then those of rhs.
    at = labels.index("F")
    y = y.reshape(*y.shape[:at], *free_shape, *y.shape[at + 1 :])
    labels = [*labels[:at], *(("x", d) for d in free_x), *labels[at + 1 :]]
    kernel_free = [("k", a) for d, a in enumerate(view.axes) if d not in kc and d not in kb]
    x_free = [("x", d) for d in free_x]
    target = [("s", s) for s in nkb] + (
        kernel_free + x_free if kernel_first else x_free + kernel_free
    )
    order = [labels.index(t) for t in target]
    if order != list(range(len(order))):
        y = jnp.transpose(y, order)
    aval = eqn.outvars[0].aval
    if y.shape != aval.shape:  # pragma: no cover - would be a bug in the layout maths
        raise AssertionError(f"factored dot_general gave {y.shape}, expected {aval.shape}")
    return y.astype(aval.dtype)


def _compute_dtype(eqn, view: _View):
    """The dtype the program computes a contraction of ``view``'s kernel in: its output's,
    which is the ``preferred_element_type`` when set, else the operands' promoted type.

    The low-rank branch runs in it, the base product as the program wrote it (the kernel in
    ``view.dtype``). ``x_f32 @ w_bf16`` (``x @ w`` casts neither operand) thus keeps the
    float32 ``A`` and ``s B`` in float32, as the float32 product of ``x`` with ``W'`` would;
    cast to the kernel's storage dtype they would be rounded (to 4.7e-2 relative error on
    the update for a float8 kernel). A bfloat16 program stays bfloat16.
    """
    dtype = eqn.outvars[0].aval.dtype
    return dtype if jnp.issubdtype(dtype, jnp.floating) else view.dtype


def _contract_batched(node: Adapter, x, kernel_dtype, dtype, kw, ctx):
    """All stack axes batched (the common case): flattened 2-D matmuls.

    ``x``: ``(*stack, n, *in)``. Returns ``(*stack, n, *out)`` and its labels. The base
    kernel is used in ``kernel_dtype`` (the program's), the low-rank branch runs in
    ``dtype`` (:func:`_compute_dtype`), on flattened ``(n, in) @ (in, r) @ (r, out)``
    products whatever the kernel's layout (XLA on CPU computes their weight gradients
    several times faster than those of the same products with the outputs unflattened); a
    kernel in ``(*stack, *in, *out)`` order is read as a flat matrix too, any other layout
    by one ``dot_general`` in place.

    Autodiff differentiates it. The backward pass keeps ``x``, ``x L`` and, for a scaled
    (decomposed) method, one ``(n, out)`` array for the gradient of the scale: the
    unscaled output, or inside a scan the scaled output itself (:func:`_rescaled`), which
    the model may keep anyway. Measured alternatives (README, "DoRA vs LoRA in scanned
    stacks"): a custom VJP keeps as much in a scan and defeats XLA's buffer sharing in
    unscanned models; recomputing ``x W0`` in the backward pass brings scanned memory to
    LoRA's but costs 1.46x LoRA's step time.
    """
    ns = len(node.stack)
    stack_shape, in_shape, out_shape = node.stack_shape, node.in_shape, node.out_shape
    n_i, n_o = math.prod(in_shape), math.prod(out_shape)
    n = x.shape[ns]
    x2 = x.reshape(*stack_shape, n, n_i)
    canonical = node.stack == _identity(ns) and node.inputs == tuple(range(ns, ns + len(in_shape)))
    left, mid, right, post = node.low_rank()
    rank = left.shape[-1]
    s = tuple(range(ns))
    dims = (((ns + 1,), (ns,)), (s, s))

    def matmul(h, w, rows: int, cols: int, unstacked_ndim: int):
        """``(*stack, n, rows) @ ([*stack,] rows, cols)``; ``w`` may be shared by the stack."""
        if ns and w.ndim == unstacked_ndim:
            w = w.reshape(rows, cols).astype(dtype)
            return lax.dot_general(h, w, (((ns + 1,), (0,)), ((), ())), **kw)
        w = w.reshape(*stack_shape, rows, cols).astype(dtype)
        return lax.dot_general(h, w, dims, **kw)

    def compute(base, x2, _):
        if canonical:
            w2 = base.reshape(*stack_shape, n_i, n_o).astype(kernel_dtype)
            return lax.dot_general(x2, w2, dims, **kw)
        # (*stack, n, *in) against the kernel in its own layout: (*stack, n, *out).
        xs = x2.reshape(*stack_shape, n, *in_shape)
        x_in = tuple(range(ns + 1, ns + 1 + len(in_shape)))
        dn = ((x_in, node.inputs), (s, node.stack))
        y = lax.dot_general(xs, base.astype(kernel_dtype), dn, **kw)
        return y.reshape(*stack_shape, n, n_o)

    y, scale = _base_terms(node, compute, x2)
    h = matmul(_dropped(node, x2, ctx), left, n_i, rank, len(in_shape) + 1)
    if mid is not None:
        h = h * mid.reshape(*stack_shape, 1, rank).astype(dtype)
    z = matmul(h, right, rank, n_o, 1 + len(out_shape))
    post = None if post is None else post.reshape(*stack_shape, 1, n_o).astype(dtype)
    scale = None if scale is None else scale.reshape(*stack_shape, 1, n_o)
    y = ctx.output(y, z, post, scale)
    y = y.reshape(*stack_shape, n, *out_shape)
    labels = [*(("s", a) for a in node.stack), "F", *(("k", o) for o in node.outputs)]
    return y, labels


def _contract_inputs(node: Adapter, x, sb, kernel_dtype, dtype, kw, ctx):
    """Some stack axes free: ``x (*batch_stack, n, *in)``, the kernel in its own layout.

    Stack axes not in ``sb`` are free (a ``vmap`` ensemble over a shared input, Gemma's
    ``kv_einsum`` 2-axis given as a stack axis): the result carries them. Returns
    ``(*batch_stack, n, *free_stack, *out)`` and its labels.
    """
    ndim = node.base.ndim
    stack, inputs, outputs = list(node.stack), list(node.inputs), list(node.outputs)
    sf = [s for s in stack if s not in sb]
    F, R = ndim, ndim + 1  # einsum labels besides the kernel's own axes 0..ndim-1
    x_lab = [*sb, F, *inputs]
    out_lab = [*sb, F, *sf, *outputs]
    left, mid, right, post = node.low_rank()

    def compute(base, x, _):
        return jnp.einsum(x, x_lab, base.astype(kernel_dtype), list(range(ndim)), out_lab, **kw)

    y, scale = _base_terms(node, compute, x)
    l_lab = [*stack, *inputs, R] if _stacked(left, node, len(inputs) + 1) else [*inputs, R]
    h_lab = [*sb, F, *(s for s in sf if s in l_lab), R]
    h = jnp.einsum(_dropped(node, x, ctx), x_lab, left.astype(dtype), l_lab, h_lab, **kw)
    if mid is not None:
        full = [*sb, F, *sf, R]
        h = _align(h, h_lab, full) * _align(mid.astype(dtype), [*stack, R], full)
        h_lab = full
    r_lab = [*stack, R, *outputs] if _stacked(right, node, len(outputs) + 1) else [R, *outputs]
    z = jnp.einsum(h, h_lab, right.astype(dtype), r_lab, out_lab, **kw)
    if post is not None:
        post = _align(post.astype(dtype), [*stack, *outputs], out_lab)
    if scale is not None:
        scale = _align(scale, [*stack, *outputs], out_lab)
    y = ctx.output(y, z, post, scale)
    labels = [*(("s", s) for s in sb), "F", *(("k", a) for a in [*sf, *outputs])]
    return y, labels


def _contract_outputs(node: Adapter, x, kernel_dtype, dtype, kw, ctx):
    """The transposed use ``h W'^T`` (a tied embedding's ``attend``), every stack axis batched.

    ``W'^T`` contracts the output axes, so the per-output DoRA factor scales ``h`` first:
    ``h W'^T = (h * s) W0^T + (((h * s * e) R^T) * d) L^T`` with ``s = m / ||W0 + dW||_c``.
    ``x``: ``(*stack, n, *out)``; returns ``(*stack, n, *in)`` and its labels.
    """
    ndim = node.base.ndim
    stack, inputs, outputs = list(node.stack), list(node.inputs), list(node.outputs)
    F, R = ndim, ndim + 1
    x_lab = [*stack, F, *outputs]
    out_lab = [*stack, F, *inputs]
    left, mid, right, post = node.low_rank()

    def compute(base, x, scale):
        if scale is not None:
            x = (x * _align(scale, [*stack, *outputs], x_lab)).astype(dtype)
        return jnp.einsum(x, x_lab, base.astype(kernel_dtype), list(range(ndim)), out_lab, **kw)

    y, scale = _base_terms(node, compute, x)
    h = _dropped(node, x, ctx)
    if scale is not None:
        h = (h * _align(scale, [*stack, *outputs], x_lab)).astype(dtype)
    if post is not None:
        h = h * _align(post.astype(dtype), [*stack, *outputs], x_lab)
    r_lab = [*stack, R, *outputs] if _stacked(right, node, len(outputs) + 1) else [R, *outputs]
    t_lab = [*stack, F, R]
    t = jnp.einsum(h, x_lab, right.astype(dtype), r_lab, t_lab, **kw)
    if mid is not None:
        t = t * _align(mid.astype(dtype), [*stack, R], t_lab)
    l_lab = [*stack, *inputs, R] if _stacked(left, node, len(inputs) + 1) else [*inputs, R]
    z = jnp.einsum(t, t_lab, left.astype(dtype), l_lab, out_lab, **kw)
    labels = [*(("s", s) for s in stack), "F", *(("k", i) for i in inputs)]
    return y + z, labels


def _feature_output(y, h, axis: int, node: Adapter, low_rank, scale, dtype, ctx: _Context):
    """``(y + ((h * d) R) * e) * scale`` over the feature axis ``axis`` of ``y`` and ``h``
    (conv channels, gather offsets; ``h`` carries the rank there); ``low_rank`` is
    ``node.low_rank()``."""
    _, mid, right, post = low_rank
    rank = right.shape[0]
    n_out = math.prod(node.out_shape)

    def on_axis(v, n):
        shape = [1] * h.ndim
        shape[axis] = n
        return None if v is None else v.reshape(shape)

    if mid is not None:
        h = h * on_axis(mid.astype(dtype), rank)
    z = lax.dot_general(h, right.reshape(rank, n_out).astype(dtype), (((axis,), (0,)), ((), ())))
    z = jnp.moveaxis(z, -1, axis)
    post = None if post is None else on_axis(post.astype(dtype), n_out)
    return ctx.output(y, z, post, on_axis(scale, n_out))


@_rule("conv_general_dilated")
def _conv_rule(eqn, invals, ctx):
    """LoRA for conv as PEFT: ``conv(x, W0) + conv(conv(x, A), B)``, ``A`` a conv with the
    base's window and ``r`` output channels, ``B`` a 1x1 conv ``(r, out)``."""
    x, view = invals
    if _is_view(x) or not _is_view(view):
        return None
    p = eqn.params
    dn = p["dimension_numbers"]
    if ctx.probing:
        ctx.record(view, "conv", (), dn.rhs_spec[1:])
        return _zeros_like_outputs(eqn)
    groups = [f"{k}={p[k]}" for k in ("feature_group_count", "batch_group_count") if p[k] != 1]
    if groups:  # grouped / depthwise: each output sees one group of inputs; W' is formed
        w = _materialise(view, ctx, f"a grouped convolution ({', '.join(groups)})")
        return _bind(eqn, [x, w])
    node = _placed_like_kernel(view.node)
    rhs = tuple(view.axes[d] for d in dn.rhs_spec)  # (out, in, *window) as node axes
    if node.stack or set(rhs[1:]) != set(node.inputs) or (rhs[0],) != node.outputs:
        raise _layout_error(view, (), rhs[1:], "a convolution")
    params = dict(p, dimension_numbers=dn._replace(rhs_spec=rhs))
    dtype = _compute_dtype(eqn, view)  # a preferred_element_type, else the kernel's
    feature = dn.out_spec[1]

    def compute(base, x, _):
        return _bind(eqn, [x, base.astype(view.dtype)], params)[0]

    y, scale = _base_terms(node, compute, x)
    low_rank = node.low_rank()
    left = low_rank[0]
    # A as a conv kernel in the base's layout, r output channels where the base has out;
    # a convolution takes operands of one dtype.
    a = to_kernel_layout(left.astype(dtype), node.base.ndim, (), node.inputs)
    h = _bind(eqn, [_dropped(node, x, ctx).astype(dtype), a], params)[0]
    y = _feature_output(y, h, feature, node, low_rank, scale, dtype, ctx)
    return [_times_factor(y.astype(eqn.outvars[0].aval.dtype), view)]


def _looked_up(dn, sizes, shape) -> tuple[int, ...] | None:
    """The looked-up axes of a gather that reads whole rows of a table: each indexed axis
    sliced to one entry (collapsed, as ``w[ids]``, or kept with size 1, as in a vmapped
    ``w[i]``) or whole (its start index then clamped to 0), every other axis whole. None
    for any other gather."""
    mapped = set(dn.start_index_map)
    if dn.operand_batching_dims or not set(dn.collapsed_slice_dims) <= mapped:
        return None
    looked = []
    for d, n in enumerate(shape):
        if d in dn.collapsed_slice_dims or (d in mapped and sizes[d] == 1 and n > 1):
            looked.append(d)
        elif sizes[d] != n:
            return None
    return tuple(looked) or None


@_rule("gather")
def _gather_rule(eqn, invals, ctx):
    """Embedding lookup ``W'[ids] = (W0[ids] + A[ids] R) * s``, input axis the vocabulary."""
    view, ids = invals
    if _is_view(ids) or not _is_view(view):
        return None
    p = eqn.params
    dn = p["dimension_numbers"]
    shape = eqn.invars[0].aval.shape
    if _single_slice(eqn, ids):
        taken = _taken(eqn, view, ids, ctx)
        if taken is not None:
            return taken
    looked = _looked_up(dn, p["slice_sizes"], shape)
    if looked is None:
        return None
    if ctx.probing:
        ctx.record(view, "gather", (), looked)
        return _zeros_like_outputs(eqn)
    node, axes = view.node, view.axes
    if (
        node.stack
        or tuple(sorted(axes[d] for d in looked)) != node.inputs
        or len(node.outputs) != 1
    ):
        return None
    node = _placed_like_kernel(node)
    dtype = view.dtype
    kept = [d for d in range(len(shape)) if d not in dn.collapsed_slice_dims]
    out = axes.index(node.outputs[0])  # the feature axis, in the program's layout
    feature = dn.offset_dims[kept.index(out)]

    def arranged(w):  # a kernel-layout array in the program's layout (penzai: transposed)
        return w if axes == _identity(len(axes)) else jnp.transpose(w, axes)

    def compute(base, ids, _):
        return _bind(eqn, [arranged(base).astype(dtype), ids])[0]

    y, scale = _base_terms(node, compute, ids)
    low_rank = node.low_rank()
    left = low_rank[0]
    rank = left.shape[-1]
    a = arranged(to_kernel_layout(left.astype(dtype), node.base.ndim, (), node.inputs))
    sizes = list(p["slice_sizes"])
    sizes[out] = rank
    h = _bind(eqn, [a, ids], dict(p, slice_sizes=tuple(sizes)))[0]
    y = _feature_output(y, h, feature, node, low_rank, scale, dtype, ctx)
    return [_times_factor(y.astype(eqn.outvars[0].aval.dtype), view)]


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser: a bijection that mixes every input bit into all."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _dropout_keep(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """Boolean keep-mask of ``shape``: each element kept with probability ``1 - rate``.

    The bits are a keyed hash of each element's (row, column) index, seeded with 64 bits
    drawn from ``key`` by threefry, instead of threefry for every element: ample
    randomness for dropout and about 20x cheaper on CPU, where per-element threefry made
    adapter dropout cost ~15% of a LoRA training step on the benchmark Llama.
    """
    seed = jax.random.bits(key, (2,), jnp.uint32)
    rows, stride = jnp.zeros(shape, jnp.uint32), 1  # row index over all leading axes
    for axis in reversed(range(len(shape) - 1)):
        rows = rows + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    cols = lax.broadcasted_iota(jnp.uint32, shape, len(shape) - 1)
    h = _fmix32(_fmix32(rows ^ seed[0]) + cols)
    h = _fmix32(h ^ seed[1])
    threshold = min(round(rate * 2.0**32), 2**32 - 1)
    return h >= jnp.uint32(threshold)


def apply(fn: Callable, *, key: jax.Array | None = None, strict: bool = False) -> Callable:
    """Returns ``fn`` made to accept adapted params, computing adapted layers factored.

    Every contraction of an adapted kernel over its input axes (``dot_general`` with any
    contraction and batch pattern, the kernel on either side; ``conv_general_dilated``), its
    transposed use over its output axes (a tied embedding's ``attend``) and its embedding
    lookups (``gather``) are computed as ``(x W0 + s (x A) B) * (m / ||W0 + s A B||_c)``
    (DoRA; LoRA without the factor), never forming ``W0 + s A B`` or ``W'``. Works under
    ``jit``, ``grad``, ``remat``, ``vmap``, inside ``nn.scan`` / ``nnx.scan`` stacks and
    inside ``shard_map``. Inside a scan body DoRA's output scaling has its own VJP (the
    backward pass keeps the output instead of a second copy per layer), so a scanned model
    with decomposed adapters (DoRA, DVoRA) supports reverse-mode differentiation only
    (Hessian-vector products reverse-over-reverse), not ``jvp`` / ``jacfwd``.
    Adapter nodes may sit anywhere in the arguments; one that the function returns
    unchanged is returned as the node. The base kernels get no gradient (they are frozen).

    Args:
      fn: any function of arrays, e.g. ``model.apply`` or a function that calls
        ``nnx.merge(graphdef, state)``.
      key: PRNG key for adapter dropout (``wrap(..., dropout=p)``); None disables it
        (evaluation). Pass a fresh key each training step.
      strict: raise instead of warning when an adapted kernel is used in a way the
        factored forward does not cover (it then forms ``W'`` for that use).

    Returns:
      A function with ``fn``'s signature. Called under ``jit``/``grad``/``vmap`` it traces
      into the caller's program. Called eagerly, it compiles the factored program with
      ``jax.jit`` once per call signature and reuses it. The signature is the arguments'
      tree structure, the shapes and dtypes of their arrays (jax and numpy arrays and
      scalars, and the adapter nodes' leaves: the dynamic inputs) and the values of every
      other leaf (Python ``int``, ``float``, ``bool``, ``str``, functions, config objects:
      the static inputs, part of the program as ``jax.jit``'s static arguments, so a model
      may use them as shapes or loop counts). A new static value traces and compiles
      again: pass what changes from call to call (a decoding step, a temperature) as a
      ``jnp`` array, or ``jax.jit`` the caller; a warning names the arguments once one
      structure has compiled more than 8 programs for different static values. The 32 most
      recently used programs are kept. A static leaf that cannot be hashed, or that is
      hashed and compared by identity (a plain object whose attributes may change between
      calls; functions, methods and classes are code and are cached), is never cached: such
      a call traces again every time and sees the object's current attributes. As with
      ``jax.jit``, state that ``fn`` or a static function closes over is read when it is
      traced. NNX modules (and ``nnx.Rngs``) among the arguments are left as ``fn`` called
      directly would leave them: they are split together, as ``nnx.jit`` does (state
      reachable from two arguments, such as the ``nnx.Rngs`` a model keeps and is also
      passed, stays one variable), and what the call updates in place (BatchNorm
      statistics, dropout RNG counters, a decoding cache, sown values) is written back;
      ``Param`` variables are not (a forward does not assign its parameters). Their graph
      (module structure and static attributes) is part of the signature.

    Raises:
      ValueError: when the model contracts an adapted kernel on other axes than its node
        was adapted for (the message says how to give the right axes).

    Example::

      logits = dora_jax.apply(model.apply)({"params": adapted}, tokens)
    """
    warned: set = set()
    # Eager calls run the interpreter under jax.jit, one compiled program per call signature:
    # interpreted op by op, every eager call would trace the whole model again. The least
    # recently used programs go: a static value that changes every call (a step passed as a
    # Python int) would otherwise keep one program per value for ever.
    compiled: collections.OrderedDict = collections.OrderedDict()
    structures: collections.OrderedDict = collections.OrderedDict()  # see _note_program

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        objects = _nnx_objects((args, kwargs))
        tree = (args, kwargs, None)
        graphdef = None
        if objects:
            # One split of all NNX objects together, as nnx.jit does: a variable reachable
            # from two arguments (a model's nnx.Rngs also passed) is one leaf, updated once.
            # The objects' places in the arguments keep static placeholders.
            graphdef, state = nnx.split(tuple(objects))
            tree = (*_slotted((args, kwargs)), state)
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_adapter)
        leaves = [leaf for _, leaf in flat]
        if not any(is_adapter(leaf) for leaf in leaves):
            check_no_node_dicts(tree, "dora_jax.apply")  # adapters restored as dicts?
            return fn(*args, **kwargs)
        dynamic = [i for i, leaf in enumerate(leaves) if is_adapter(leaf) or _is_array(leaf)]
        values = [leaves[i] for i in dynamic]
        # The traced program closes over the static leaves only, never over the arrays.
        static = [None if i in dynamic else leaf for i, leaf in enumerate(leaves)]
        # Paths inside the argument (or the NNX object): "layer/kernel".
        paths = {i: path_str(flat[i][0][2:]) for i in dynamic}
        traced = _with_nnx_state(fn, graphdef) if objects else _called(fn)
        run = functools.partial(_run, traced, treedef, static, dynamic, paths, strict, warned)
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((values, key))):
            return _updated(objects, run(values, key))
        signature = _signature((treedef, graphdef), static, values)
        if signature is None:  # a static leaf not hashable by value: trace every call
            return _updated(objects, run(values, key))
        if signature in compiled:
            compiled.move_to_end(signature)
        else:
            _note_program(structures, signature, fn, flat, warned)
            passed: dict = {}  # filled when traced: output leaf -> input node passed through
            compiled[signature] = (jax.jit(functools.partial(run, passed=passed)), passed)
            if len(compiled) > _PROGRAMS_KEPT:
                compiled.popitem(last=False)
        call, passed = compiled[signature]
        out = call(values, key)
        if passed:
            # A node returned unchanged comes back as the caller's node, not a copy from jit.
            out_leaves, out_def = jax.tree.flatten(out, is_leaf=is_adapter)
            for j, k in passed.items():
                out_leaves[j] = values[k]
            out = jax.tree.unflatten(out_def, out_leaves)
        return _updated(objects, out)

    return wrapped


# Compiled programs an eager applied function keeps, and the programs one call structure
# may compile for different static values before apply warns (see apply's docstring).
_PROGRAMS_KEPT = 32
_PROGRAMS_BEFORE_WARNING = 8


def _note_program(structures: dict, signature, fn: Callable, flat: list, warned: set) -> None:
    """Counts a new program of an eager applied function by call structure (its signature
    less the static values) in ``structures``, an LRU dict of ``{structure: (programs, first
    static values, positions of the static leaves that changed)}``; warns once per applied
    function when one structure passes :data:`_PROGRAMS_BEFORE_WARNING`, naming the
    arguments whose values changed."""
    treedef, static, avals = signature
    structure = (treedef, avals, tuple(v is None for v in static))
    count, first, changed = structures.pop(structure, (0, static, frozenset()))
    changed = changed | {i for i, (a, b) in enumerate(zip(first, static)) if a is not b and a != b}
    structures[structure] = (count + 1, first, changed)
    if len(structures) > _PROGRAMS_KEPT:
        structures.popitem(last=False)
    if count + 1 <= _PROGRAMS_BEFORE_WARNING or not changed or _RETRACE_WARNING in warned:
        return
    warned.add(_RETRACE_WARNING)
    names = ", ".join(sorted({_argument_name(fn, flat[i][0]) for i in changed}))
    warnings.warn(
        f"dora_jax.apply({getattr(fn, '__name__', 'fn')}) has compiled "
        f"{count + 1} programs for calls that differ only in the values of static "
        f"(non-array) arguments: {names}. Every new value of a Python scalar or other "
        f"non-array argument is part of the program and compiles a new one. Pass a value "
        f"that changes from call to call as a jax array (e.g. jnp.asarray(step)), or "
        f"jax.jit the function that calls it.",
        stacklevel=3,
    )


_RETRACE_WARNING = ("", "static arguments retraced")  # its key in apply's `warned` set


def _argument_name(fn: Callable, keypath) -> str:
    """Where a leaf of ``(args, kwargs, nnx state)`` sits, for messages: ``step``,
    ``args[2]``, ``config['temperature']``, ``NNX state rngs/dropout/count``."""
    part, where, *inner = keypath
    rest = jax.tree_util.keystr(tuple(inner))
    if part.idx == 2:
        return f"NNX state {path_str(keypath[1:])}"
    if part.idx == 1:
        return f"{where.key}{rest}"
    try:
        parameter = list(inspect.signature(fn).parameters.values())[where.idx]
    except (TypeError, ValueError, IndexError):
        parameter = None
    if parameter is not None and parameter.kind in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        return f"{parameter.name}{rest}"
    return f"args[{where.idx}]{rest}"


def _unchecked_shard_map_body() -> bool:
    """Whether this trace is inside a ``shard_map`` body with ``check_vma=False``, where
    jax records no mesh axes a value is split over (jax's own flag; False if it is gone)."""
    from jax._src import config as jax_config  # the flag has no public accessor

    flag = getattr(jax_config, "_check_vma", None)
    manual = getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ())
    return bool(manual) and flag is not None and not flag.value


def _check_fields_fit(path: str, node) -> None:
    """Refuses a node whose fields no longer fit its axes: ``jax.vmap`` over an adapted tree
    slices every field along a stack axis that the node's axes still count."""
    sizes = {"stack": len(node.stack), "in": len(node.inputs), "out": len(node.outputs)}
    fields = {name: getattr(node, name) for name in type(node).layout}
    if node.outputs and all(
        v is None or v.ndim == sum(sizes.get(r, 1) for r in type(node).layout[name])
        for name, v in fields.items()
    ):
        return
    shapes = ", ".join(f"{n} {tuple(v.shape)}" for n, v in fields.items() if v is not None)
    raise ValueError(
        f"Adapter '{path}' ({type(node).__name__}, {node.axes!r}) has fields that do not fit "
        f"its axes: base {tuple(node.base.shape)}, {shapes}. A transform such as jax.vmap over "
        f"the adapted params slices every field along a stack axis that the node still counts. "
        f"Map over the kernel inside the function given to dora_jax.apply (e.g. jax.vmap over "
        f"p[...] in it), where the node's stack axis is followed, or wrap each member's params "
        f"on its own."
    )


def _check_nodes(nodes: dict) -> None:
    """Clear errors for adapter nodes ``{path: node}`` :func:`apply` cannot use: one half of
    a partition, or (inside a ``shard_map`` body) a node split across devices whose forward
    needs the whole kernel; a warning where such a body has ``check_vma=False`` and the
    split cannot be seen. Run when tracing (once per signature of an eager call)."""
    _check_whole(nodes, "dora_jax.apply", plain_ok=True)

    def varying(x) -> set:  # the shard_map axes x is split (varies) over
        return set().union(*(_varying_axes(jax.typeof(leaf)) for leaf in jax.tree.leaves(x)))

    if _unchecked_shard_map_body():
        # jax tracks no splits here: a node whose forward needs the whole kernel cannot be
        # told from its replicated form, so say what the result depends on.
        whole = [
            p for p, n in nodes.items() if n.shared or n.quantised or isinstance(n, _Decomposed)
        ]
        if whole:
            warnings.warn(
                f"dora_jax.apply was called inside a shard_map body with check_vma=False, so "
                f"it cannot see whether adapters {whole} are split over devices. Their "
                f"forward is right only if they enter the body replicated (DoRA also when split "
                f"on output columns only); split otherwise, each device would use its shard "
                f"where the whole kernel is needed. Use check_vma=True (jax's default) so "
                f"dora_jax can check, or call dora_jax.apply outside the shard_map.",
                stacklevel=4,
            )
    for path, node in nodes.items():
        _check_fields_fit(path, node)
        split = sorted(varying(node))
        if not split:
            continue
        # Split on output axes only (A whole, the base varying only where the magnitude or
        # B does), each device holds whole columns: LoRA's and DoRA's forward is local.
        columns = not varying(getattr(node, "a", None)) and varying(node.base) <= varying(
            [getattr(node, "magnitude", None), getattr(node, "b", None)]
        )
        if node.shared:
            needs = "its shared random matrices are cut to the whole kernel's shape"
        elif node.quantised:
            needs = "its quantised base is dequantised block by block over the whole kernel"
        elif isinstance(node, _Decomposed) and not columns:
            needs = "its column norm ||W0 + s A B||_c sums over the whole input axis"
        else:
            continue  # each device's shard of x W0 + s (x A) B (and its columns' norms)
        raise ValueError(
            f"dora_jax.apply was called inside a shard_map body with adapter '{path}' "
            f"({type(node).__name__}) split over mesh axes {split}, but {needs}; the body "
            f"sees only this device's shard. Call dora_jax.apply outside and jax.shard_map "
            f"inside the function you give it (apply then uses the whole kernel and hands "
            f"each device its shard), or pass the adapted params replicated (in_specs P())."
        )


def _is_nnx_object(x) -> bool:
    return isinstance(x, nnx.Pytree)


def _nnx_objects(tree) -> list:
    """The NNX objects (modules, ``nnx.Rngs``) in ``tree``, outermost only, in tree order."""
    return [x for x in jax.tree.leaves(tree, is_leaf=_is_nnx_object) if _is_nnx_object(x)]


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where the ``index``-th NNX object of :func:`apply`'s arguments goes: a static leaf
    (its state is passed apart, split with the other objects')."""

    index: int


def _slotted(tree):
    """``tree`` with its NNX objects (see :func:`_nnx_objects`) replaced by placeholders
    (:class:`_Slot`)."""
    slots = (_Slot(k) for k in itertools.count())
    return jax.tree.map(
        lambda x: next(slots) if _is_nnx_object(x) else x, tree, is_leaf=_is_nnx_object
    )


def _called(fn: Callable) -> Callable:
    """``fn`` taking ``(args, kwargs, None)``, as :func:`_run` passes them without NNX objects."""
    return lambda args, kwargs, _: fn(*args, **kwargs)


def _with_nnx_state(fn: Callable, graphdef) -> Callable:
    """``fn`` taking ``(args, kwargs, state)``: the arguments with placeholders (:class:`_Slot`)
    where the NNX objects were and the objects' joint state (``nnx.split`` of all of them, so a
    variable shared between two arguments is one). Returns ``fn``'s output and the state
    the objects hold after the call, all but their ``Param`` variables: batch statistics, RNG
    counters, caches, sown values; the objects ``fn`` sees are the traced program's, so
    what a model updates in place would otherwise be lost."""

    def call(args, kwargs, state):
        objects = nnx.merge(graphdef, state)
        args, kwargs = jax.tree.map(
            lambda x: objects[x.index] if isinstance(x, _Slot) else x, (args, kwargs)
        )
        out = fn(*args, **kwargs)
        return out, nnx.state(objects, nnx.Not(nnx.Param))

    return call


def _updated(objects: list, result):
    """Writes the state returned by :func:`_with_nnx_state` into the caller's NNX objects,
    as ``fn`` called directly would have left them; returns ``fn``'s own output."""
    if not objects:
        return result
    out, state = result
    nnx.update(tuple(objects), state)  # one joint state: each shared variable once
    return out


def _signature(treedef, static: list, values: list):
    """A hashable key of one call: tree structure, static leaves, shapes and dtypes; None
    when a static leaf has no value to key on (unhashable, or compared by identity)."""
    if any(v is not None and _compared_by_identity(v) for v in static):
        return None
    avals = []
    for v in values:
        leaves, structure = jax.tree.flatten(v)
        avals.append((structure, tuple((x.shape, x.dtype, getattr(x, "weak_type", False))
                                       for x in map(jax.typeof, leaves))))  # fmt: skip
    signature = (treedef, tuple(static), tuple(avals))
    try:
        hash(signature)
    except TypeError:
        return None
    return signature


def _compared_by_identity(x) -> bool:
    """Whether static leaf ``x`` is hashed and compared by identity (``object.__hash__``,
    ``object.__eq__``) while its contents may change: a plain config object, whose changed
    attribute a cached program would not see. Code is keyed by identity like ``jax.jit``'s
    static functions (functions, methods, classes, ``jit``- or ``custom_jvp``-wrapped
    functions, partials, callable objects: what they close over is read when traced), and
    modules, ``object()`` sentinels, ``...`` and ``NotImplemented`` hold nothing to change."""
    kind = type(x)
    if kind.__hash__ is not object.__hash__ or kind.__eq__ is not object.__eq__:
        return False
    immutable = kind is object or x is Ellipsis or x is NotImplemented
    return not (immutable or callable(x) or isinstance(x, types.ModuleType))


def _run(fn, treedef, static, dynamic, paths, strict, warned, values, key, passed=None):
    """Traces ``fn`` (of ``(args, kwargs, NNX state)``, see :func:`_called`) with stand-ins
    for the adapter nodes and interprets it factored.

    ``passed``, if given, gets ``{output leaf: position in values}`` for the nodes that
    ``fn`` returns unchanged.
    """

    def flat_fn(*vals):
        full = list(static)
        for i, v in zip(dynamic, vals):
            full[i] = v
        return fn(*jax.tree.unflatten(treedef, full))  # (args, kwargs, NNX state)

    _check_nodes({paths[i]: v for i, v in zip(dynamic, values) if is_adapter(v)})
    # Trace with a stand-in of the (dequantised) kernel's type in place of each node.
    stand_ins = [_kernel_type(v) if is_adapter(v) else v for v in values]
    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*stand_ins)
    inputs, originals = [], {}
    for k, (i, leaf, stand_in) in enumerate(zip(dynamic, values, stand_ins)):
        if is_adapter(leaf):
            # Stop the base's gradient once, here: stopped again inside a scan body, the
            # sliced kernel would become a new value that the backward pass saves for
            # every layer, instead of reusing the stacked input.
            # Shared leaves (VeRA's random matrices) are frozen too.
            frozen = {n: getattr(leaf, n) for n in ("base", *leaf.shared)}
            node = dataclasses.replace(leaf, **jax.tree.map(lax.stop_gradient, frozen))
            originals[id(node)] = (leaf, k)
            inputs.append(_View(node, stand_in.dtype, paths[i], _identity(leaf.base.ndim)))
        else:
            inputs.append(leaf)
    ctx = _Context(key, strict, warned)
    outs = _eval(closed.jaxpr, closed.consts, inputs, ctx)
    results = []
    for j, o in enumerate(outs):
        value, k = _returned(o, originals, ctx)
        if k is not None and passed is not None:
            passed[j] = k
        results.append(value)
    outs = results
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)


def _kernel_type(node: Adapter) -> jax.ShapeDtypeStruct:
    """The type the traced program sees for ``node``'s kernel: the base's shape, dtype and,
    where the base is split over ``Explicit`` mesh axes, its sharding, which is part of the
    type there (a ``shard_map`` over the kernel checks its ``in_specs`` against it; unsharded,
    the stand-in would tell the model the kernel is replicated)."""
    base = node.base
    if not node.quantised:
        return _typed_like(jax.typeof(base))
    split = [_typed_like(jax.typeof(x)).sharding for x in jax.tree.leaves(base)]
    if any(s is not None for s in split):  # as its dequantised kernel is split
        return _typed_like(jax.eval_shape(lambda q: q.dequantize(), base))
    return jax.ShapeDtypeStruct(base.shape, base.dtype)


def _typed_like(aval) -> jax.ShapeDtypeStruct:
    """A stand-in of ``aval``'s shape and dtype, with its sharding where that names
    ``Explicit`` mesh axes (part of the type there, as :func:`_kernel_type` says)."""
    sharding = getattr(aval, "sharding", None)
    if not (isinstance(sharding, jax.sharding.NamedSharding) and _names_explicit(sharding)):
        sharding = None
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, sharding=sharding)


def _names_explicit(sharding) -> bool:
    """Whether a NamedSharding's spec splits an axis over an ``Explicit`` mesh axis."""
    kinds = dict(zip(sharding.mesh.axis_names, sharding.mesh.axis_types))
    return any(
        kinds.get(name) == jax.sharding.AxisType.Explicit
        for entry in sharding.spec
        if entry is not None and entry is not P.UNCONSTRAINED
        for name in ((entry,) if isinstance(entry, str) else entry)
    )


def _returned(out, originals: dict, ctx: _Context):
    """``(output, position)``: an adapter passed through unchanged is returned as the node
    itself, with its position among the inputs; any other output with position None."""
    if _is_view(out) and out.factor is None and id(out.node) in originals:
        leaf, k = originals[id(out.node)]
        if out.axes == _identity(leaf.base.ndim) and out.dtype == leaf.base.dtype:
            return leaf, k
    return _plain(out, ctx, "returned from the function"), None


def infer_axes(fn: Callable, params: PyTree, *args, **kwargs) -> InferredAxes:
    """Learns each kernel's stack and input axes by tracing ``fn(params, *args, **kwargs)``.

    Walks the traced program with the evaluator :func:`apply` uses, following every float
    leaf of ``params`` with at least 2 axes (through casts, transposes, slices, ``jit``,
    ``remat``, ``scan``, ``cond``, ``while``, ``shard_map``) to the uses that consume it:

    - a ``dot_general`` (matmul, einsum; the kernel on either side): its contracted axes
      are input axes, its batch axes stack axes (``'BTD,NDH->BTNH'`` gives
      ``Axes((), (1,))``; a torch-layout ``x @ w.T`` gives ``Axes((), (1,))``). A kernel
      axis that stays free is an output axis: Gemma's fused ``kv_einsum`` ``(2, K, D, H)``
      and ``gating_einsum`` ``(2, H, F)`` get one adapter over both halves, and an
      ``nn.vmap`` ensemble's member axis is an output axis too (give ``Axes((0,), ...)``
      by hand for one adapter per half or per member);
    - a ``conv_general_dilated``: the window and input-feature axes are input axes;
    - a ``gather`` embedding lookup: the looked-up (vocabulary) axis is the input axis; a
      tied ``attend`` that contracts the other axis is then its transposed use;
    - a scanned-over axis counts as a stack axis, and so does a leading axis indexed by a
      scalar before a contraction (``w[i]`` in a Python or ``fori_loop`` loop over layers,
      ``jnp.take(w, i, axis=0)``, Gemma's ``w_gating[0]`` and ``w_gating[1]``): one
      adapter per slice, as for separate matrices (an axis after others, ``w[:, i]``, is
      an output axis).

    Nothing is computed: the function is only traced.

    Returns:
      ``{path: Axes}`` for every kernel used in one consistent way; pass it to
      :func:`dora_jax.wrap` as ``axes=``. Kernels used only otherwise (a reshape or slice
      before the contraction, as Keras's depthwise convolution does; a lookup of part of
      a row) are left out and listed, with the operations, in its ``unread`` attribute;
      ``wrap`` names them if they are targeted.

    Raises:
      ValueError: if a kernel is used in two inconsistent ways.

    Example::

      axes = dora_jax.infer_axes(lambda p, x: model.apply({"params": p}, x), params, x)
      adapted = dora_jax.wrap(params, rank=8, axes=axes)
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [leaf for _, leaf in flat]
    # Leaves that are not values (an Equinox module's activation function) stay as they are.
    dynamic = [i for i, x in enumerate(leaves) if _is_array(x) or type(x) in (int, float)]
    paths = [path_str(flat[i][0]) for i in dynamic]
    n_params = len(dynamic)

    def flat_fn(param_leaves, rest):
        full = list(leaves)
        for i, v in zip(dynamic, param_leaves):
            full[i] = v
        p = jax.tree.unflatten(treedef, full)
        a, k = rest
        return fn(p, *a, **k)

    param_leaves = [leaves[i] for i in dynamic]
    closed = jax.make_jaxpr(flat_fn)(param_leaves, (args, kwargs))
    found: dict[int, set] = {}
    ctx = _Context(None, False, set(), found=found)

    def probe(*values):
        inputs = list(values)
        for i in range(n_params):
            v = values[i]
            if v.ndim >= 2 and jnp.issubdtype(v.dtype, jnp.floating):
                node = _Probe(v, i, _identity(v.ndim), ())
                inputs[i] = _View(node, v.dtype, paths[i], _identity(v.ndim))
        outs = _eval(closed.jaxpr, closed.consts, inputs, ctx)
        return [_plain(o, ctx, "output") for o in outs]

    avals = [_typed_like(v.aval) for v in closed.jaxpr.invars]
    jax.make_jaxpr(probe)(*avals)
    result = InferredAxes()
    for i, seen in sorted(found.items()):
        ndim = len(np.shape(param_leaves[i]))
        ax = _consistent_axes(paths[i], ndim, seen)
        if "gather" in ctx.unread.get(i, ()) and not any(kind == "gather" for kind, _ in seen):
            continue  # a lookup not read: a contraction alone cannot tell a table's axes
        if ax is not None:
            result[paths[i]] = ax
    result.unread = {
        paths[i]: tuple(sorted(uses)) for i, uses in sorted(ctx.unread.items())
        if paths[i] not in result
    }  # fmt: skip
    return result


class InferredAxes(dict):
    """What :func:`infer_axes` returns: ``{path: Axes}``, plus ``unread``: ``{path: the
    operations}`` for each kernel the model uses only in ways that do not say its axes (a
    reshape or slice before its contraction, a lookup of part of a row, an elementwise use);
    :func:`dora_jax.wrap` names them when such a kernel is targeted."""

    unread: dict[str, tuple[str, ...]] = {}


def _consistent_axes(path: str, ndim: int, seen: set) -> Axes | None:
    """One kernel's axes from all its recorded uses, or None when no use tells them."""

    def fits(ax):
        try:
            ax.split(ndim)
        except ValueError:
            return False
        return True

    lookups = {ax for kind, ax in seen if kind == "gather" and fits(ax)}
    contractions = {ax for kind, ax in seen if kind != "gather" and fits(ax)}
    if lookups:
        candidates = lookups
        if len(lookups) == 1:
            ax = next(iter(lookups))
            outputs = ax.split(ndim)[2]
            # A contraction over the table's other axes is its transposed use (tied attend).
            contractions = {c for c in contractions if c.inputs != outputs or c.stack != ax.stack}
            candidates = lookups | contractions
    else:
        candidates = contractions
    if not candidates:
        return None
    if len(candidates) > 1:
        listed = ", ".join(
            f"{ax!r} = Axes.from_einsum('{ax.einsum_hint(ndim)}')"
            for ax in sorted(candidates, key=repr)
        )
        raise ValueError(
            f"Kernel '{path}' is used in inconsistent ways: {listed}. Say which axes are "
            f"its inputs with axes={{'{path}': dora_jax.Axes(stack=..., inputs=...)}}, or "
            f"leave it out with targets=."
        )
    return next(iter(candidates))
