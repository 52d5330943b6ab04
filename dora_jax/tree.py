"""Pure functions over parameter trees: wrap, merge, partition, combine, trainable_mask."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dora_jax.adapters import DoRA, DVoRA, LoRA, VeRA, is_adapter, safe_norm

PyTree = Any

METHODS = ("lora", "dora", "vera", "dvora")
# VeRA/DVoRA: one pair of shared random matrices; their rank is not bounded by a kernel.
_SHARED = ("vera", "dvora")


class Axes(NamedTuple):
    """How a kernel's axes split: ``stack`` leading stack axes, then ``inputs`` input axes.

    The remaining trailing axes are output axes. ``Axes(stack=0, inputs=1)`` is a Dense
    kernel ``(in, out)``; a query projection ``(embed, heads, head_dim)`` is
    ``Axes(0, 1)``; an output projection ``(heads, head_dim, embed)`` is ``Axes(0, 2)``;
    an ``nn.scan`` stack of Dense kernels ``(layers, in, out)`` is ``Axes(1, 1)``.
    """

    stack: int = 0
    inputs: int = 1


def path_str(path: tuple) -> str:
    """``'layers_0/mlp/up/kernel'`` from a jax key path (NNX ``.value`` keys dropped)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":
                parts.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts)


def _is_float_array(x: Any) -> bool:
    return hasattr(x, "dtype") and hasattr(x, "shape") and jnp.issubdtype(x.dtype, jnp.floating)


def _default_target(path: str, leaf: Any) -> bool:
    # Dense, DenseGeneral, Einsum (Linen) and Linear, LinearGeneral, Einsum (NNX) all name
    # their weight "kernel"; embeddings and norms do not.
    return path.rsplit("/", 1)[-1] == "kernel" and _is_float_array(leaf) and leaf.ndim >= 2


def _target_predicate(targets) -> Callable[[str, Any], bool]:
    if targets is None:
        return _default_target
    if callable(targets) and not isinstance(targets, str):
        return targets
    if isinstance(targets, str):
        targets = [targets]
    if isinstance(targets, (list, tuple)):
        patterns = [re.compile(t) for t in targets]
        # A regex picks among matrices: "q_proj" means the kernel, not its bias.
        return lambda path, leaf: (
            getattr(leaf, "ndim", 0) >= 2 and any(p.search(path) for p in patterns)
        )
    raise TypeError(
        f"targets must be None, a regex string, a list of regexes or a predicate "
        f"(path, leaf) -> bool; got {type(targets).__name__}."
    )


def _resolve_axes(path: str, leaf, axes) -> Axes:
    if axes is not None:
        if callable(axes) and not isinstance(axes, Mapping):
            found = axes(path, leaf)
            if found is not None:
                return Axes(*found)
        else:
            if path in axes:
                return Axes(*axes[path])
            for pattern, value in axes.items():
                if re.search(pattern, path):
                    return Axes(*value)
    if leaf.ndim == 2:
        return Axes(0, 1)
    raise ValueError(
        f"Cannot tell the input axes of kernel '{path}' with shape {tuple(leaf.shape)}: a "
        f"{leaf.ndim}-D kernel may be a DenseGeneral/Einsum projection or a scanned stack of "
        f"Dense kernels. Say which with axes={{'{re.escape(path)}': dora_jax.Axes(stack=..., "
        f"inputs=...)}} (e.g. Axes(0, 1) for (embed, heads, head_dim), Axes(0, 2) for "
        f"(heads, head_dim, embed), Axes(1, 1) for an nn.scan stack (layers, in, out)), or "
        f"learn them from the model with axes=dora_jax.infer_axes(fn, params, *args)."
    )


def _check_axes(path: str, leaf, ax: Axes) -> int:
    """Validates ``ax`` for ``leaf``; returns the largest sensible rank, min(in, out)."""
    if ax.stack < 0 or ax.inputs < 1 or ax.stack + ax.inputs >= leaf.ndim:
        raise ValueError(
            f"Axes{tuple(ax)} do not fit kernel '{path}' with shape {tuple(leaf.shape)}: "
            f"need stack >= 0, inputs >= 1 and at least one output axis."
        )
    n_in = math.prod(leaf.shape[ax.stack : ax.stack + ax.inputs])
    n_out = math.prod(leaf.shape[ax.stack + ax.inputs :])
    return min(n_in, n_out)


def _check_numbers(rank, alpha, dropout) -> None:
    """Refuses a rank, alpha or dropout rate that makes no sensible adapter."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}.")
    real = lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)  # noqa: E731
    if alpha is not None and not (real(alpha) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(
            f"alpha must be a finite positive number (the update's scale is alpha / rank), "
            f"got {alpha!r}."
        )
    if not (real(dropout) and 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}.")


def wrap(
    params: PyTree,
    rank: int = 8,
    *,
    method: str = "dora",
    alpha: float | None = None,
    targets: str | list[str] | Callable[[str, Any], bool] | None = None,
    axes: Mapping[str, Axes] | Callable[[str, Any], Axes | None] | None = None,
    key: jax.Array | None = None,
    dropout: float = 0.0,
    rslora: bool = False,
    exact_norm_grad: bool = False,
    dtype: Any = jnp.float32,
) -> PyTree:
    """Returns ``params`` with every targeted kernel replaced by an adapter node.

    Pure: ``params`` is not modified and non-targeted leaves are returned as they are.

    Args:
      params: a parameter tree: Linen ``variables["params"]``, an NNX ``nnx.State`` from
        ``nnx.split``, or any dict of arrays.
      rank: the rank ``r`` of the update.
      method: ``"dora"`` (default), ``"lora"``, ``"vera"`` or ``"dvora"`` (DoRA over VeRA).
        VeRA/DVoRA draw one pair of frozen random matrices ``A_s (in_max, rank)``,
        ``B_s (rank, out_max)`` from ``key``, shared by every node (stored in each node, so
        they travel with the adapter and are never re-drawn); their rank may exceed a
        kernel's size (VeRA typically uses 256).
      alpha: scale numerator for LoRA/DoRA; ``s = alpha / rank`` (``alpha / sqrt(rank)``
        with ``rslora``). Default ``2 * rank`` (``s = 2``), the DoRA paper's setting.
        VeRA/DVoRA have no alpha.
      targets: which kernels to adapt: a regex searched in the ``/``-joined path, a list of
        them (only leaves with at least 2 axes are considered), or a predicate
        ``(path, leaf) -> bool``. Default: every float leaf named
        ``kernel`` with at least 2 axes (Dense, DenseGeneral, Einsum, Linear...).
      axes: how each kernel's axes split into stack/input/output when the shape cannot
        tell (kernels with more than 2 axes): ``{path_or_regex: Axes(stack, inputs)}``, a
        callable ``(path, leaf) -> Axes | None``, or the result of :func:`infer_axes`.
      key: PRNG key for the initialisation of ``A`` (default ``jax.random.key(0)``).
      dropout: dropout rate on the input of the low-rank branch (active when
        :func:`dora_jax.apply` gets a ``key``).
      rslora: use ``s = alpha / sqrt(rank)``.
      exact_norm_grad: DoRA only: differentiate through ``||W0 + dW||_c`` instead of
        treating it as a constant (the paper's Sec. 4.3 ablation; costs more).
      dtype: dtype of the trainable leaves (float32 keeps updates exact on bf16 bases).

    Returns:
      A tree of the same structure whose targeted kernels are ``LoRA``/``DoRA``/``VeRA``/
      ``DVoRA`` nodes.

    Example::

      adapted = dora_jax.wrap(variables["params"], rank=8)
      y = dora_jax.apply(model.apply)({"params": adapted}, x)
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}.")
    _check_numbers(rank, alpha, dropout)
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
    if any(is_adapter(x) for x in jax.tree.leaves(params, is_leaf=is_adapter)):
        raise ValueError(
            "params already holds adapters: wrapping twice would adapt the adapters. Call "
            "dora_jax.merge(params) first to fold them in, or wrap the original params."
        )
    alpha = 2.0 * rank if alpha is None else float(alpha)
    scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    key = jax.random.key(0) if key is None else key
    predicate = _target_predicate(targets)

    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    chosen = []
    for i, (path, leaf) in enumerate(leaves_with_path):
        p = path_str(path)
        if predicate(p, leaf):
            if not _is_float_array(leaf):
                raise TypeError(
                    f"Kernel '{p}' has dtype {getattr(leaf, 'dtype', type(leaf))}; only "
                    f"floating kernels can be adapted (for a quantised base use the "
                    f"quantised wrappers). Exclude it with targets=."
                )
            ax = _resolve_axes(p, leaf, axes)
            chosen.append((i, p, ax, _check_axes(p, leaf, ax)))
    if not chosen:
        paths = [path_str(p) for p, _ in leaves_with_path][:8]
        raise ValueError(
            f"No kernel matches targets={targets!r}. Some paths in params: {paths}. Pass a "
            f"regex that matches some of them (searched in the '/'-joined path), e.g. "
            f"targets=r'(query|value)/kernel$'."
        )

    too_small = [(p, limit) for _, p, _, limit in chosen if rank > limit]
    if method in _SHARED:
        too_small = []
    if too_small:
        listed = ", ".join(f"'{p}' (max {limit})" for p, limit in too_small[:6])
        raise ValueError(
            f"rank={rank} is larger than some kernels allow: {listed}. A rank above "
            f"min(in, out) adds parameters without adding expressiveness. Pass rank <= "
            f"{min(limit for _, limit in too_small)}, or leave those kernels out with targets=."
        )
    new_leaves = [leaf for _, leaf in leaves_with_path]
    if method in _SHARED:
        shared = _shared_matrices(new_leaves, chosen, rank, key, dtype)
        for i, _, ax, _ in chosen:
            new_leaves[i] = _make_vera_node(
                new_leaves[i], ax, method, shared, dropout, exact_norm_grad, dtype
            )
        return jax.tree.unflatten(treedef, new_leaves)
    keys = jax.random.split(key, len(chosen))
    for k, (i, _, ax, _) in zip(keys, chosen):
        new_leaves[i] = _make_node(
            new_leaves[i], ax, rank, method, scale, k, dropout, exact_norm_grad, dtype
        )
    return jax.tree.unflatten(treedef, new_leaves)


def _in_out(shape, ax: Axes) -> tuple[int, int]:
    return math.prod(shape[ax.stack : ax.stack + ax.inputs]), math.prod(
        shape[ax.stack + ax.inputs :]
    )


def _shared_matrices(leaves, chosen, rank, key, dtype):
    """VeRA's frozen ``A_s (in_max, r)`` and ``B_s (r, out_max)``, Kaiming-uniform.

    Bounds as torch's ``kaiming_uniform_(a=sqrt(5))`` on PEFT's ``(r, in)`` and
    ``(out, r)`` layouts: ``1/sqrt(in_max)`` and ``1/sqrt(r)``.
    """
    sizes = [_in_out(leaves[i].shape, ax) for i, _, ax, _ in chosen]
    in_max, out_max = max(s[0] for s in sizes), max(s[1] for s in sizes)
    key_a, key_b = jax.random.split(key)
    bound_a, bound_b = 1.0 / math.sqrt(in_max), 1.0 / math.sqrt(rank)
    shared_a = jax.random.uniform(key_a, (in_max, rank), dtype, -bound_a, bound_a)
    shared_b = jax.random.uniform(key_b, (rank, out_max), dtype, -bound_b, bound_b)
    return shared_a, shared_b


def _magnitude(base, ax: Axes, dtype):
    """``||W0||_c``: the L2 norm over the input axes, in float32."""
    in_axes = tuple(range(ax.stack, ax.stack + ax.inputs))
    return safe_norm(base, in_axes).astype(dtype)  # no overflow for entries beyond ~1e18


def _make_vera_node(base, ax: Axes, method, shared, dropout, exact_norm_grad, dtype):
    stack_shape = base.shape[: ax.stack]
    out_shape = base.shape[ax.stack + ax.inputs :]
    rank = shared[0].shape[-1]
    d = jnp.full((*stack_shape, rank), 0.1, dtype)
    b = jnp.zeros((*stack_shape, *out_shape), dtype)  # b = 0: identity at init
    common = dict(stack=ax.stack, inputs=ax.inputs, dropout=dropout)
    if method == "vera":
        return VeRA(base, *shared, d, b, **common)
    magnitude = _magnitude(base, ax, dtype)
    return DVoRA(base, *shared, d, b, magnitude, exact_norm_grad=exact_norm_grad, **common)


def _make_node(base, ax: Axes, rank, method, scale, key, dropout, exact_norm_grad, dtype):
    stack_shape = base.shape[: ax.stack]
    in_shape = base.shape[ax.stack : ax.stack + ax.inputs]
    out_shape = base.shape[ax.stack + ax.inputs :]
    fan_in = math.prod(in_shape)
    bound = 1.0 / math.sqrt(fan_in)  # Kaiming-uniform, as torch's kaiming_uniform_(a=sqrt 5)
    a = jax.random.uniform(key, (*stack_shape, *in_shape, rank), dtype, -bound, bound)
    b = jnp.zeros((*stack_shape, rank, *out_shape), dtype)  # B = 0: identity at init
    common = dict(scale=scale, stack=ax.stack, inputs=ax.inputs, dropout=dropout)
    if method == "lora":
        return LoRA(base, a, b, **common)
    magnitude = _magnitude(base, ax, dtype)
    return DoRA(base, a, b, magnitude, exact_norm_grad=exact_norm_grad, **common)


def merge(adapted: PyTree) -> PyTree:
    """Plain params: each adapter node replaced by its adapted kernel ``W'``.

    Same structure, shapes and dtypes as the original params; ``W'`` is computed in float32
    and cast to the base dtype. The merged model runs exactly as fast as the base model.

    Example::

      merged = dora_jax.merge(adapted)
      y = model.apply({"params": merged}, x)
    """
    _check_whole(adapted, "merge")
    return jax.tree.map(
        lambda x: x.materialise() if is_adapter(x) else x, adapted, is_leaf=is_adapter
    )


def trainable_mask(adapted: PyTree) -> PyTree:
    """A tree of bools with the structure of ``adapted``: True for trainable leaves.

    Example::

      tx = optax.masked(optax.adamw(1e-3), dora_jax.trainable_mask(adapted))
    """

    def node_mask(x):
        if not is_adapter(x):
            return jax.tree.map(lambda _: False, x)
        fields = {
            name: jax.tree.map(lambda _, t=(name in x.trainable): t, getattr(x, name))
            for name in _data_fields(x)
        }
        return type(x)(**fields, **_meta(x))

    return jax.tree.map(node_mask, adapted, is_leaf=is_adapter)


def _data_fields(node) -> list[str]:
    return [f.name for f in dataclasses.fields(node) if f.metadata.get("static") is not True]


def _meta(node) -> dict[str, Any]:
    return {
        f.name: getattr(node, f.name)
        for f in dataclasses.fields(node)
        if f.metadata.get("static") is True
    }


def partition(adapted: PyTree) -> tuple[PyTree, PyTree]:
    """Splits into ``(frozen, trainable)`` trees of the same structure, ``None`` elsewhere.

    Differentiate and optimise ``trainable`` only: the base then costs no gradient and no
    optimiser state.

    Example::

      frozen, trainable = dora_jax.partition(adapted)
      adapted = dora_jax.combine(frozen, trainable)
    """
    _check_whole(adapted, "partition")
    mask = trainable_mask(adapted)
    trainable = jax.tree.map(lambda x, m: x if m else None, adapted, mask)
    frozen = jax.tree.map(lambda x, m: None if m else x, adapted, mask)
    return frozen, trainable


def combine(frozen: PyTree, trainable: PyTree) -> PyTree:
    """Inverse of :func:`partition`: takes each leaf from whichever tree has it.

    Example::

      loss = lambda trainable: loss_fn(dora_jax.combine(frozen, trainable), batch)
    """
    is_none = lambda x: x is None  # noqa: E731
    s_frozen = jax.tree.structure(frozen, is_leaf=is_none)
    s_trainable = jax.tree.structure(trainable, is_leaf=is_none)
    if s_frozen != s_trainable:
        raise ValueError(
            "combine(frozen, trainable) got trees of different structure; pass the two "
            "halves returned by one dora_jax.partition call (after optax updates the "
            f"trainable tree keeps its structure).\nfrozen:    {s_frozen}\n"
            f"trainable: {s_trainable}"
        )

    def pick(f, t):
        if f is not None and t is not None:
            raise ValueError(
                "combine found a leaf present in both trees; they must come from one "
                "dora_jax.partition call."
            )
        return t if f is None else f

    combined = jax.tree.map(pick, frozen, trainable, is_leaf=is_none)
    _check_fits(combined)
    return combined


def _check_whole(adapted: PyTree, what: str) -> None:
    """Clear errors for a tree without adapters or with one half of a partition missing."""
    nodes = [
        (path_str(p), x)
        for p, x in jax.tree_util.tree_flatten_with_path(adapted, is_leaf=is_adapter)[0]
        if is_adapter(x)
    ]
    if not nodes:
        raise ValueError(
            f"{what} got a tree without adapter nodes (nothing would train). Pass the output "
            f"of dora_jax.wrap(params, ...)."
        )
    for path, node in nodes:
        missing = [f for f in _data_fields(node) if getattr(node, f) is None]
        if missing:
            half = "frozen" if set(missing) <= set(node.trainable) else "trainable"
            raise ValueError(
                f"{what} got the {half} half of dora_jax.partition: adapter '{path}' has no "
                f"{missing}. Pass the whole tree, dora_jax.combine(frozen, trainable)."
            )


def _check_fits(combined: PyTree) -> None:
    """Each node's trainable leaves must fit its frozen base (same rank, stack, in, out)."""
    for p, node in jax.tree_util.tree_flatten_with_path(combined, is_leaf=is_adapter)[0]:
        if not is_adapter(node) or any(getattr(node, f) is None for f in _data_fields(node)):
            continue
        leaves, treedef = jax.tree.flatten(node)
        signature = (treedef, tuple((np.shape(x), str(x.dtype)) for x in leaves))
        try:
            _fits(signature)
        except (TypeError, ValueError) as e:
            shapes = {f: tuple(np.shape(getattr(node, f))) for f in node.trainable}
            raise ValueError(
                f"combine: the trainable leaves of adapter '{path_str(p)}' {shapes} do not fit "
                f"its base of shape {tuple(node.base.shape)} ({type(e).__name__}: {e}). Pass "
                f"the two halves of one dora_jax.partition call (or of the same wrap settings)."
            ) from None


@functools.lru_cache(maxsize=1024)
def _fits(signature) -> None:
    """Traces a node of this structure and these shapes once (layers share one signature)."""
    treedef, shapes = signature
    node = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in shapes])
    jax.eval_shape(lambda n: (n.low_rank(), n.output_scale()), node)
