"""Running an unmodified model with adapted params, without forming ``W0 + dW``.

:func:`apply` traces the user's function once with each adapter node standing in for its
base kernel, then evaluates the resulting jaxpr with an interpreter that follows every
adapted kernel through dtype casts, nested ``jit``, ``remat``, ``scan``, ``cond`` and
``while``. Where the kernel meets a ``dot_general`` that contracts its input axes, the
contraction is replaced by the factored form (DoRA, Liu et al. 2024, Sec. 4.3)::

    y = (x W0 + (x L) R) * (m / ||W0 + L R||_c)

so no kernel-sized array is formed and autodiff never computes a weight gradient of the
frozen base. Any other use forms ``W'`` for that use and warns once (or raises with
``strict=True``). One mechanism serves Linen, NNX and plain functions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from dora_jax.adapters import Adapter, is_adapter
from dora_jax.tree import Axes, path_str

PyTree = Any

# Primitives that pass a kernel through unchanged (as far as its values go).
_PASS_THROUGH = frozenset({"copy", "copy_p", "name", "optimization_barrier"})
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})
_REMAT = frozenset({"remat2", "checkpoint"})


class FallbackWarning(UserWarning):
    """An adapted kernel was used in a way the factored forward does not cover."""


@jax.tree_util.register_pytree_node_class
class _View:
    """An adapter node as the traced function sees it: its kernel, possibly cast."""

    def __init__(self, node: Adapter, dtype, path: str):
        self.node, self.dtype, self.path = node, dtype, path

    def tree_flatten(self):
        return (self.node,), (self.dtype, self.path)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)


@dataclasses.dataclass
class _Context:
    key: jax.Array | None
    strict: bool
    warned: set
    uses: int = 0

    def next_key(self) -> jax.Array:
        self.uses += 1
        return jax.random.fold_in(self.key, self.uses)


def _is_view(x) -> bool:
    return isinstance(x, _View)


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _materialise(view: _View, ctx: _Context, why: str) -> jax.Array:
    if ctx.strict:
        raise ValueError(
            f"Adapted kernel '{view.path}' is used by `{why}`, which the factored forward "
            f"does not handle, and strict=True forbids forming W0 + dW. Adapt only kernels "
            f"used by plain contractions (targets=), or pass strict=False to form W' for "
            f"this use."
        )
    if (view.path, why) not in ctx.warned:
        ctx.warned.add((view.path, why))
        warnings.warn(
            f"dora_jax.apply: adapted kernel '{view.path}' is used by `{why}`; forming the "
            f"full adapted kernel for this use (slower, more memory). Pass strict=True to "
            f"make this an error.",
            FallbackWarning,
            stacklevel=4,
        )
    node = dataclasses.replace(view.node, base=lax.stop_gradient(view.node.base))
    return node.materialise().astype(view.dtype)


def _plain(x, ctx: _Context, why: str):
    return _materialise(x, ctx, why) if _is_view(x) else x


def _eval(jaxpr, consts, args, ctx: _Context) -> list:
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if any(_is_view(x) for x in invals):
            outs = _adapted_eqn(eqn, invals, ctx)
        else:
            with eqn.ctx.manager:
                ans = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            outs = ans if eqn.primitive.multiple_results else [ans]
        for v, o in zip(eqn.outvars, outs):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


def _adapted_eqn(eqn, invals, ctx: _Context) -> list:
    name = eqn.primitive.name
    params = eqn.params
    if name == "convert_element_type" and jnp.issubdtype(params["new_dtype"], jnp.floating):
        view = invals[0]
        return [_View(view.node, params["new_dtype"], view.path)]
    if name in _PASS_THROUGH and len(invals) == 1:
        return list(invals)
    if name == "dot_general":
        out = _dot_general(eqn, invals, ctx)
        if out is not None:
            return [out]
    elif name in _CALLS:
        closed = params["jaxpr"]
        return _eval(closed.jaxpr, closed.consts, invals, ctx)
    elif name in _REMAT:
        return _remat(eqn, invals, ctx)
    elif name == "scan":
        return _scan(eqn, invals, ctx)
    elif name == "cond":
        return _cond(eqn, invals, ctx)
    elif name == "while":
        return _while(eqn, invals, ctx)
    plain = [_plain(x, ctx, name) for x in invals]
    with eqn.ctx.manager:
        ans = eqn.primitive.bind(*plain, **eqn.primitive.get_bind_params(params))
    return ans if eqn.primitive.multiple_results else [ans]


def _with_key(ctx: _Context, key) -> _Context:
    return _Context(key, ctx.strict, ctx.warned)


def _remat(eqn, invals, ctx: _Context) -> list:
    jaxpr = eqn.params["jaxpr"]

    # The key travels as an argument: a remat body must not close over outer tracers that
    # it would then save.
    def body(key, *args):
        return _eval(jaxpr, (), args, _with_key(ctx, key))

    fn = jax.checkpoint(body, prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"])
    return fn(ctx.next_key() if ctx.key is not None else None, *invals)


def _split_shared(node: Adapter):
    """(stacked part, shared leaves): shared leaves (VeRA's matrices) are not sliced."""
    shared = {name: getattr(node, name) for name in getattr(node, "shared", ())}
    return dataclasses.replace(node, **dict.fromkeys(shared)), shared


def _scan(eqn, invals, ctx: _Context) -> list:
    p = eqn.params
    nc, ncar = p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc : nc + ncar], invals[nc + ncar :]
    init = [_plain(x, ctx, "scan carry") for x in init]
    xs_in, rebuild = [], []
    for x in xs:
        if _is_view(x) and x.node.stack >= 1:
            stacked, shared = _split_shared(x.node)
            xs_in.append(stacked)
            rebuild.append((x, shared))
        else:
            xs_in.append(_plain(x, ctx, "scan over a non-stack axis"))
            rebuild.append(None)
    closed = p["jaxpr"]
    keys = None
    if ctx.key is not None:
        keys = jax.random.split(ctx.next_key(), p["length"])

    def body(carry, sliced):
        x_slices, key = sliced
        xs_body = []
        for x, info in zip(x_slices, rebuild):
            if info is None:
                xs_body.append(x)
            else:
                view, shared = info
                node = dataclasses.replace(x, stack=view.node.stack - 1, **shared)
                xs_body.append(_View(node, view.dtype, view.path))
        outs = _eval(closed.jaxpr, closed.consts, [*consts, *carry, *xs_body], _with_key(ctx, key))
        outs = [_plain(o, ctx, "scan output") for o in outs]
        return outs[:ncar], outs[ncar:]

    carry, ys = lax.scan(
        body, list(init), (xs_in, keys), length=p["length"], reverse=p["reverse"],
        unroll=p["unroll"],
    )  # fmt: skip
    return [*carry, *ys]


def _cond(eqn, invals, ctx: _Context) -> list:
    index, *ops = invals

    def branch(closed, *args):
        # Branches must return arrays of one type: a kernel returned by one branch is formed.
        outs = _eval(closed.jaxpr, closed.consts, args, ctx)
        return [_plain(o, ctx, "returned from a cond branch") for o in outs]

    fns = [functools.partial(branch, br) for br in eqn.params["branches"]]
    return list(lax.switch(index, fns, *ops))


def _while(eqn, invals, ctx: _Context) -> list:
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
        return _eval(bj.jaxpr, bj.consts, [*bconsts, *carry], ctx)

    return list(lax.while_loop(cond, body, init))


def _keyed_while(cj, bj, cconsts, bconsts, init, ctx: _Context) -> list:
    def cond(carry):
        return _eval(cj.jaxpr, cj.consts, [*cconsts, *carry[0]], ctx)[0]

    def body(carry):
        values, key = carry
        key, use = jax.random.split(key)
        return _eval(bj.jaxpr, bj.consts, [*bconsts, *values], _with_key(ctx, use)), key

    return list(lax.while_loop(cond, body, (init, ctx.next_key()))[0])


def _dot_general(eqn, invals, ctx: _Context):
    """The factored contraction, or None when the kernel is not contracted on its inputs."""
    lhs, rhs = invals
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if _is_view(rhs) and not _is_view(lhs):
        view, x, kc, xc, kb, xb, kernel_is_lhs = rhs, lhs, rc, lc, rb, lb, False
    elif _is_view(lhs) and not _is_view(rhs):
        view, x, kc, xc, kb, xb, kernel_is_lhs = lhs, rhs, lc, rc, lb, rb, True
    else:
        return None
    node = view.node
    n_stack, n_in = node.stack, node.inputs
    if tuple(kb) != tuple(range(n_stack)) or sorted(kc) != list(range(n_stack, n_stack + n_in)):
        return None

    # Put x in (stack..., free..., in...) order with its contracted axes in kernel order, and
    # flatten to one free and one contracted axis: XLA on CPU differentiates 2-D matmuls
    # much faster than 3-D ones, and the reshape costs nothing.
    order = sorted(range(n_in), key=lambda i: kc[i])
    xc = [xc[i] for i in order]
    free = [d for d in range(x.ndim) if d not in xb and d not in xc]
    perm = [*xb, *free, *xc]
    if perm != list(range(x.ndim)):
        x = jnp.transpose(x, perm)
    stack_shape, in_shape, out_shape = node.stack_shape, node.in_shape, node.out_shape
    free_shape = tuple(x.shape[n_stack : n_stack + len(free)])
    n_free, n_i, n_o = math.prod(free_shape), math.prod(in_shape), math.prod(out_shape)
    x2 = x.reshape(*stack_shape, n_free, n_i)

    dtype = view.dtype
    left, mid, right, post = node.low_rank()
    rank = left.shape[-1]
    s = tuple(range(n_stack))
    dims = (((n_stack + 1,), (n_stack,)), (s, s))
    kw = dict(
        precision=eqn.params["precision"],
        preferred_element_type=eqn.params["preferred_element_type"],
    )

    def matmul(h, w, rows: int, cols: int, unstacked_ndim: int):
        """``(*stack, n, rows) @ ([*stack,] rows, cols)``; ``w`` may be shared by the stack."""
        if n_stack and w.ndim == unstacked_ndim:
            w = w.reshape(rows, cols).astype(dtype)
            return lax.dot_general(h, w, (((n_stack + 1,), (0,)), ((), ())), **kw)
        w = w.reshape(*stack_shape, rows, cols).astype(dtype)
        return lax.dot_general(h, w, dims, **kw)

    def base_terms(node, x2):
        base = node.dequantised_base()  # frozen: its gradient was stopped on entry
        w2 = base.reshape(*stack_shape, n_i, n_o).astype(dtype)
        return lax.dot_general(x2, w2, dims, **kw), node.output_scale(base)

    if hasattr(node.base, "dequantize"):
        # Dequantise again in the backward pass instead of saving the kernel: saved, the
        # dequantised kernels would form a full-precision copy of the base (QDoRA).
        base_terms = jax.checkpoint(base_terms)
    y, scale = base_terms(node, x2)
    if node.dropout > 0.0 and ctx.key is not None:
        keep = _dropout_keep(ctx.next_key(), x2.shape, node.dropout)
        x2 = jnp.where(keep, x2 / (1.0 - node.dropout), 0).astype(x2.dtype)
    h = matmul(x2, left, n_i, rank, n_in + 1)
    if mid is not None:
        h = h * mid.reshape(*stack_shape, 1, rank).astype(dtype)
    z = matmul(h, right, rank, n_o, 1 + len(out_shape))
    if post is not None:
        z = z * post.reshape(*stack_shape, 1, n_o).astype(dtype)
    y = y + z
    if scale is not None:
        scale = scale.reshape(*stack_shape, 1, n_o)
        y = (y * scale).astype(y.dtype)

    out = y.reshape(*stack_shape, *free_shape, *out_shape)
    if kernel_is_lhs:
        n_free_ax, n_out_ax = len(free_shape), len(out_shape)
        perm = [
            *s,
            *range(n_stack + n_free_ax, n_stack + n_free_ax + n_out_ax),
            *range(n_stack, n_stack + n_free_ax),
        ]
        out = jnp.transpose(out, perm)
    aval = eqn.outvars[0].aval
    if out.shape != aval.shape:  # pragma: no cover - would be a bug in the layout maths
        raise AssertionError(f"factored dot_general gave {out.shape}, expected {aval.shape}")
    return out.astype(aval.dtype)


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

    Every contraction of an adapted kernel over its input axes is computed as
    ``(x W0 + s (x A) B) * (m / ||W0 + s A B||_c)`` (DoRA; LoRA without the factor), never
    forming ``W0 + s A B`` or ``W'``. Works under ``jit``, ``grad``, ``remat``, ``vmap`` and
    inside ``nn.scan`` / ``nnx.scan`` stacks. Adapter nodes may sit anywhere in the
    arguments. The base kernels get no gradient (they are frozen).

    Args:
      fn: any function of arrays, e.g. ``model.apply`` or a function that calls
        ``nnx.merge(graphdef, state)``.
      key: PRNG key for adapter dropout (``wrap(..., dropout=p)``); None disables it
        (evaluation). Pass a fresh key each training step.
      strict: raise instead of warning when an adapted kernel is used by an operation the
        factored forward does not handle (it then forms ``W'`` for that use).

    Returns:
      A function with ``fn``'s signature.

    Example::

      logits = dora_jax.apply(model.apply)({"params": adapted}, tokens)
    """
    warned: set = set()

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        flat, treedef = jax.tree_util.tree_flatten_with_path((args, kwargs), is_leaf=is_adapter)
        leaves = [leaf for _, leaf in flat]
        if not any(is_adapter(leaf) for leaf in leaves):
            return fn(*args, **kwargs)
        dynamic = [i for i, leaf in enumerate(leaves) if is_adapter(leaf) or _is_array(leaf)]

        def flat_fn(*values):
            full = list(leaves)
            for i, v in zip(dynamic, values):
                full[i] = v
            a, k = jax.tree.unflatten(treedef, full)
            return fn(*a, **k)

        # Trace with a stand-in of the (dequantised) kernel's type in place of each node.
        stand_ins = [
            jax.ShapeDtypeStruct(leaves[i].base.shape, leaves[i].base.dtype)
            if is_adapter(leaves[i])
            else leaves[i]
            for i in dynamic
        ]
        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*stand_ins)
        inputs = []
        for i in dynamic:
            leaf = leaves[i]
            if is_adapter(leaf):
                path = path_str(flat[i][0][2:])  # the path inside its argument
                # Stop the base's gradient once, here: stopped again inside a scan body, the
                # sliced kernel would become a new value that the backward pass saves for
                # every layer, instead of reusing the stacked input.
                # VeRA's shared random matrices are frozen too.
                frozen = {n: getattr(leaf, n) for n in ("base", *getattr(leaf, "shared", ()))}
                leaf = dataclasses.replace(leaf, **jax.tree.map(lax.stop_gradient, frozen))
                inputs.append(_View(leaf, stand_ins[len(inputs)].dtype, path))
            else:
                inputs.append(leaf)
        ctx = _Context(key, strict, warned)
        outs = _eval(closed.jaxpr, closed.consts, inputs, ctx)
        outs = [_plain(o, ctx, "returned from the function") for o in outs]
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    return wrapped


def infer_axes(fn: Callable, params: PyTree, *args, **kwargs) -> dict[str, Axes]:
    """Learns each kernel's stack and input axes by tracing ``fn(params, *args, **kwargs)``.

    Follows every float leaf of ``params`` with at least 2 axes to the ``dot_general`` that
    consumes it (through casts, ``jit``, ``remat`` and ``scan``, where a scanned-over axis
    counts as a stack axis). Nothing is computed: the function is only traced.

    Returns:
      ``{path: Axes(stack, inputs)}`` for every kernel that is only ever contracted in one
      consistent way; pass it to :func:`dora_jax.wrap` as ``axes=``.

    Raises:
      ValueError: if a kernel is contracted in two inconsistent ways.

    Example::

      axes = dora_jax.infer_axes(lambda p, x: model.apply({"params": p}, x), params, x)
      adapted = dora_jax.wrap(params, rank=8, axes=axes)
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_str(p) for p, _ in flat]
    n_params = len(flat)

    def flat_fn(param_leaves, rest):
        p = jax.tree.unflatten(jax.tree.structure(params), param_leaves)
        a, k = rest
        return fn(p, *a, **k)

    closed = jax.make_jaxpr(flat_fn)([leaf for _, leaf in flat], (args, kwargs))
    found: dict[int, set] = {}
    tags = {v: (i, 0) for i, v in enumerate(closed.jaxpr.invars[:n_params])}
    _probe(closed.jaxpr, tags, found)
    result = {}
    for i, seen in found.items():
        if len(seen) > 1:
            raise ValueError(
                f"Kernel '{paths[i]}' is contracted in inconsistent ways {sorted(seen)}; give "
                f"its axes explicitly with axes={{'{paths[i]}': dora_jax.Axes(...)}}."
            )
        result[paths[i]] = next(iter(seen))
    return result


def _probe(jaxpr, tags: dict, found: dict) -> None:
    """Records (stack, inputs) for tagged vars reaching a dot_general."""
    for eqn in jaxpr.eqns:
        hits = [
            (k, tags[v])
            for k, v in enumerate(eqn.invars)
            if not isinstance(v, jcore.Literal) and v in tags
        ]
        if not hits:
            continue
        name, p = eqn.primitive.name, eqn.params
        if name in _PASS_THROUGH or name == "convert_element_type":
            tags[eqn.outvars[0]] = hits[0][1]
        elif name == "dot_general":
            (lc, rc), (lb, rb) = p["dimension_numbers"]
            for k, (leaf, extra) in hits:
                kc, kb = (lc, lb) if k == 0 else (rc, rb)
                n_b = len(kb)
                if tuple(kb) == tuple(range(n_b)) and sorted(kc) == list(range(n_b, n_b + len(kc))):
                    found.setdefault(leaf, set()).add(Axes(extra + n_b, len(kc)))
        elif name in _CALLS:
            inner = p["jaxpr"].jaxpr
            _probe(inner, _sub_tags(tags, eqn.invars, inner.invars), found)
        elif name in _REMAT:
            _probe(p["jaxpr"], _sub_tags(tags, eqn.invars, p["jaxpr"].invars), found)
        elif name == "scan":
            inner = p["jaxpr"].jaxpr
            n_fixed = p["num_consts"] + p["num_carry"]
            sub = {}
            for k, (outer, innerv) in enumerate(zip(eqn.invars, inner.invars)):
                if not isinstance(outer, jcore.Literal) and outer in tags:
                    leaf, extra = tags[outer]
                    sub[innerv] = (leaf, extra + 1) if k >= n_fixed else (leaf, extra)
            _probe(inner, sub, found)
        elif name == "cond":
            for br in p["branches"]:
                _probe(br.jaxpr, _sub_tags(tags, eqn.invars[1:], br.jaxpr.invars), found)
        elif name == "while":
            cn = p["cond_nconsts"]
            bj = p["body_jaxpr"].jaxpr
            _probe(bj, _sub_tags(tags, eqn.invars[cn:], bj.invars), found)


def _sub_tags(tags: dict, outer_vars, inner_vars) -> dict:
    return {
        i: tags[o]
        for o, i in zip(outer_vars, inner_vars)
        if not isinstance(o, jcore.Literal) and o in tags
    }
