"""Pure functions over parameter trees: wrap, merge, partition, combine, trainable_mask."""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import numbers
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dora_jax.adapters import KINDS, NODE_TYPES, is_adapter
from dora_jax.axes import Axes, example_hint

PyTree = Any

METHODS = tuple(KINDS)
# What a rule of wrap(rules=...) may set for the kernels it matches.
RULE_KEYS = ("method", "rank", "alpha", "rslora", "dropout", "exact_norm_grad")


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


def _compile(pattern, where: str) -> re.Pattern:
    """``pattern`` compiled; a pattern that is not a valid regex is an error naming the
    argument it came from (``where``)."""
    if not isinstance(pattern, (str, re.Pattern)) or isinstance(
        getattr(pattern, "pattern", pattern), bytes
    ):
        raise TypeError(
            f"{where} must be a regex string (searched in the '/'-joined path), got "
            f"{pattern!r} ({type(pattern).__name__})."
        )
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(
            f"{where} {pattern!r} is not a valid regex: {e}. It is searched (re.search) in "
            f"the '/'-joined path; escape literal characters with re.escape."
        ) from None


def _target_predicate(targets) -> Callable[[str, Any], bool]:
    if targets is None:
        return _default_target
    if callable(targets) and not isinstance(targets, str):
        return targets
    if isinstance(targets, str):
        targets = [targets]
    if isinstance(targets, (list, tuple)):
        patterns = [_compile(t, "targets=") for t in targets]
        # A regex picks among matrices: "q_proj" means the kernel, not its bias.
        return lambda path, leaf: (
            getattr(leaf, "ndim", 0) >= 2 and any(p.search(path) for p in patterns)
        )
    raise TypeError(
        f"targets must be None, a regex string, a list of regexes or a predicate "
        f"(path, leaf) -> bool; got {type(targets).__name__}."
    )


# Operations that use a leaf elementwise. A targeted leaf used only through these and
# broadcasts (as infer_axes's `unread` lists them), or only broadcast under a bias or norm
# name, is a bias or a scale, not a kernel.
_ARITHMETIC = frozenset({"add", "add_any", "sub", "mul", "div", "neg", "max", "min"})

# Parent names of leaves that are not kernels though they may have two or more axes.
_NOT_KERNELS = re.compile(r"(^|/)[^/]*(bias|norm|scale)[^/]*/", re.IGNORECASE)


def _no_target_error(targets, leaves_with_path) -> ValueError:
    """What ``wrap`` says when ``targets`` picks nothing: the names the tree's matrices do
    have (Haiku's and Gemma's ``w``, Equinox's ``weight``, ...), and a regex for the
    commonest."""
    which = (
        "the default (leaves named 'kernel', as Flax's and Keras's layers name them)"
        if targets is None
        else f"targets={targets!r}"
    )
    names = collections.Counter(
        path_str(path).rsplit("/", 1)[-1]
        for path, leaf in leaves_with_path
        if _is_float_array(leaf) and leaf.ndim >= 2
    )
    if not names:
        return ValueError(
            f"No kernel matches {which}: params has no floating leaf with two or more axes. "
            f"Pass the model's parameter tree (e.g. variables['params'])."
        )
    common = names.most_common(6)
    listed = ", ".join(f"'{n}' ({k})" for n, k in common)
    top = common[0][0]
    example = (
        f"targets=r'(^|/){re.escape(top)}$'"
        if not top.isdigit()
        else "targets=lambda path, leaf: leaf.ndim >= 2"
    )
    # A generic leaf name (penzai's 'data_array', Equinox's 'weight') also names biases and
    # normalisation scales of two or more axes (attention biases, scales of stacked layers).
    others = [
        p
        for p in (path_str(path) for path, leaf in leaves_with_path if _is_float_array(leaf))
        if p.rsplit("/", 1)[-1] == top and _NOT_KERNELS.search(p)
    ]
    rest = [(n, k) for n, k in names.most_common() if n != top]
    if rest and not top.isdigit():
        shown = [n for n, _ in rest[:3] if not n.isdigit()]
        left = ", ".join(f"'{n}' ({k})" for n, k in rest[:5]) + (", ..." if len(rest) > 5 else "")
        example += f", which leaves out the matrices named {left}" + (
            f": name them too to adapt them, e.g. targets=r'(^|/)("
            f"{'|'.join(re.escape(n) for n in [top, *shown])})$'"
            if shown
            else ""
        )
    if others and not top.isdigit():
        example += (
            f", though that also picks {len(others)} leaf(s) under bias or norm names (e.g. "
            f"'{others[0]}'), which are not kernels: skip them with targets=lambda path, "
            f"leaf: path.endswith('/{top}') and not re.search('bias|norm|scale', path)"
        )
    return ValueError(
        f"No kernel matches {which}. The floating leaves with two or more axes here are "
        f"named {listed}. Pass targets= a regex searched in the '/'-joined path (e.g. "
        f"{example}; Haiku names its weights 'w', Equinox 'weight', Gemma 'w' and, in its "
        f"MLP, 'gating_einsum' and 'linear'), a list of "
        f"them, or a predicate (path, leaf) -> bool. A kernel not stored inputs-first, (in, "
        f"out), also needs axes=: dora_jax.infer_axes(fn, params, *args) reads them from the "
        f"model."
    )


def _as_axes(value) -> Axes:
    return value if isinstance(value, Axes) else Axes(*value)


def _given_axes(path: str, leaf, axes) -> Axes | None:
    """The axes ``wrap(axes=...)`` gives ``path``, or None."""
    if axes is None:
        return None
    if callable(axes) and not isinstance(axes, Mapping):
        found = axes(path, leaf)
        return None if found is None else _as_axes(found)
    if path in axes:
        return _as_axes(axes[path])
    for pattern, value in axes.items():
        try:
            found = re.search(pattern, path)
        except (re.error, TypeError):
            if hasattr(axes, "unread"):
                continue  # infer_axes's keys are paths, looked up above
            _compile(pattern, "axes= key")  # raises, naming the key
        if found:
            return _as_axes(value)
    return None


def _check_axes_keys(axes, leaves_with_path) -> None:
    """Warns of a key of a user's ``axes`` dict that names no leaf of ``params`` (a typo
    would leave its kernel to the default layout silently). A warning, not an error: one
    axes dict may serve several trees (``{'^layers/': Axes(1, 1)}`` for a scanned and an
    unscanned model) or several target sets; :func:`infer_axes`'s keys are the model's
    own paths. A key that is not a valid regex is an error."""
    if not isinstance(axes, Mapping) or hasattr(axes, "unread"):
        return
    paths = [path_str(path) for path, _ in leaves_with_path]
    exact = set(paths)
    unused = [
        key
        for key in axes
        if key not in exact and not any(_compile(key, "axes= key").search(p) for p in paths)
    ]
    if unused:
        kernels = [
            path_str(path)
            for path, leaf in leaves_with_path
            if _is_float_array(leaf) and leaf.ndim >= 2
        ] or paths
        warnings.warn(
            f"axes keys {unused} match no leaf of params, so they give no kernel its axes; "
            f"a key is a path or a regex searched (re.search) in the '/'-joined path, e.g. "
            f"{kernels[:4]}{'...' if len(kernels) > 4 else ''}. Fix or remove those keys.",
            UserWarning,
            stacklevel=4,
        )


def _layer_axes(model: nnx.Module) -> dict[str, Axes]:
    """``{state path: Axes}`` for the kernels of an NNX model's layers that say their own
    layout: ``LinearGeneral`` (``(*batch, *in, *out)``), ``Einsum`` (its equation), ``Conv``
    (``(*window, in, out)``), ``ConvTranspose`` (the same, or ``(*window, out, in)`` with
    ``transpose_kernel=True``), ``Linear`` and ``Embed``. Leading axes beyond the layer's own
    kernel shape (a layer stack made with ``nnx.vmap``/``nnx.scan``, an ensemble) are stack
    axes; a kernel whose shape does not end in the layer's own is left out."""
    found = {}
    for where, layer in nnx.iter_modules(model):
        if isinstance(layer, nnx.Linear):
            own, name = (layer.in_features, layer.out_features), "kernel"
            axes = Axes((), (0,))
        elif isinstance(layer, nnx.LinearGeneral):
            batch = tuple(layer.batch_axis.values())
            own, name = (*batch, *layer.in_features, *layer.out_features), "kernel"
            nb, ni = len(batch), len(layer.in_features)
            axes = Axes(tuple(range(nb)), tuple(range(nb, nb + ni)))
        elif isinstance(layer, nnx.Einsum) and layer.einsum_str is not None:
            own, name = tuple(layer.kernel_shape), "kernel"
            try:
                axes = Axes.from_einsum(layer.einsum_str)
            except ValueError:  # '...' in the kernel's subscripts: not a layout
                continue
        elif isinstance(layer, nnx.Conv):
            own, name = tuple(layer.kernel_shape), "kernel"
            axes = Axes((), tuple(range(len(own) - 1)))
        elif isinstance(layer, nnx.ConvTranspose):
            # (*window, in, out); with transpose_kernel=True (*window, out, in), the window
            # flipped and in / out swapped before the convolution.
            own, name = tuple(layer.kernel_shape), "kernel"
            n = len(own)
            window = tuple(range(n - 2))
            axes = Axes((), (*window, n - 1) if layer.transpose_kernel else (*window, n - 2))
        elif isinstance(layer, nnx.Embed):
            own, name = (layer.num_embeddings, layer.features), "embedding"
            axes = Axes((), (0,))
        else:
            continue
        kernel = getattr(layer, name, None)
        shape = tuple(getattr(kernel, "shape", ()))
        extra = len(shape) - len(own)
        if extra < 0 or shape[extra:] != tuple(own):
            continue
        stack, inputs = (tuple(p + extra for p in ps) for ps in (axes.stack, axes.inputs))
        axes = Axes(tuple(range(extra)) + stack, inputs)
        if len(shape) == 2 and axes.split(2) == Axes(0, 1).split(2):
            continue  # what wrap takes a 2-D kernel for anyway
        found["/".join(map(str, (*where, name)))] = axes
    return found


def _resolve_axes(
    path: str, leaf, axes, layers: Mapping[str, Axes] | None = None
) -> tuple[Axes, bool]:
    """The kernel's axes and whether they were assumed (2-D default) rather than given
    (by ``axes``, else by the NNX layer that holds the kernel: ``layers``, None when
    ``params`` is not an NNX model)."""
    given = _given_axes(path, leaf, axes)
    if given is not None:
        return given, False
    if layers is not None and path in layers:
        return layers[path], False
    unread = getattr(axes, "unread", {}).get(path)
    if leaf.ndim == 2 and not unread:
        # Flax's (in, out). A Flax Embed table (vocab, features) is looked up by vocab: its
        # input axis is also axis 0, and a tied `attend` is a deliberate transposed use.
        return Axes(0, 1), path.rsplit("/", 1)[-1] != "embedding"
    elementwise = set(unread or ()) <= _ARITHMETIC | {"broadcast_in_dim"} and bool(
        set(unread or ()) & _ARITHMETIC or _NOT_KERNELS.search(path + "/")
    )
    if unread and elementwise:
        raise ValueError(
            f"Leaf '{path}' with shape {tuple(leaf.shape)} is targeted, but the model uses it "
            f"only elementwise (through {', '.join(f'`{u}`' for u in unread)}), as a bias or a "
            f"normalisation scale is used, never in a contraction: it is not a kernel to "
            f"adapt. Leave it out with targets= (e.g. a predicate that skips bias and norm "
            f"paths, or a regex naming the projections' parent modules)."
        )
    if unread:
        raise ValueError(
            f"Cannot tell the input axes of kernel '{path}' with shape {tuple(leaf.shape)}: "
            f"dora_jax.infer_axes could not read them, because the model uses this kernel "
            f"only through {', '.join(f'`{u}`' for u in unread)} before (or instead of) a "
            f"contraction (a reshape or slice of the kernel, as Keras's depthwise "
            f"convolution does; a lookup of part of a row). Give its axes by hand, adding "
            f"'{re.escape(path)}' to the axes dict ({example_hint(tuple(leaf.shape))}): apply "
            f"then forms W' for those uses (FallbackWarning). Or leave it out with targets=."
        )
    raise ValueError(
        f"Cannot tell the input axes of kernel '{path}' with shape {tuple(leaf.shape)}: a "
        f"{leaf.ndim}-D kernel may be a DenseGeneral/Einsum projection, a conv kernel or a "
        f"scanned stack of Dense kernels. Say which with axes={{'{re.escape(path)}': ...}}: "
        f"{example_hint(tuple(leaf.shape))} (e.g. Axes(0, 1) for (embed, heads, head_dim), "
        f"Axes(0, 2) for (heads, head_dim, embed), Axes(1, 1) for an nn.scan stack (layers, "
        f"in, out), Axes((), (1,)) = Axes.from_einsum('BTD,NDH->BTNH') for Gemma's q_einsum "
        f"(N, D, H), Axes((), (0, 1, 2)) for a conv kernel (kh, kw, in, out)), or learn them "
        f"from the model with axes=dora_jax.infer_axes(fn, params, *args)."
        + (
            " An NNX model whose kernels sit in Flax's own layers (nnx.Linear, "
            "LinearGeneral, Einsum, Conv): pass the module itself, wrap(model, rank=...), and "
            "those layers say their axes (a model's own layer classes do not: infer_axes)."
            if layers is None
            else " Its NNX layer does not say its layout (a LinearGeneral, Einsum with its "
            "equation, Conv or Linear would), so give this kernel's axes."
        )
    )


def _check_axes(path: str, leaf, ax: Axes) -> int:
    """Validates ``ax`` for ``leaf``; returns the largest sensible rank, min(in, out)."""
    try:
        _, inputs, outputs = ax.split(leaf.ndim)
    except ValueError as e:
        raise ValueError(
            f"The axes given for kernel '{path}' with shape {tuple(leaf.shape)} do not fit: "
            f"{e} Write them as {example_hint(tuple(leaf.shape))}."
        ) from None
    n_in = math.prod(leaf.shape[p] for p in inputs)
    n_out = math.prod(leaf.shape[p] for p in outputs)
    return min(n_in, n_out)


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
    rules: Sequence[tuple[str, Mapping[str, Any]]] | None = None,
) -> PyTree:
    """Returns ``params`` with every targeted kernel replaced by an adapter node.

    Pure: ``params`` is not modified and non-targeted leaves are returned as they are.

    Args:
      params: a parameter tree: Linen ``variables["params"]``, an NNX ``nnx.State`` from
        ``nnx.split``, or any dict of arrays; or an NNX model (``nnx.Module``), whose
        adapted copy is returned (the model itself is left as it is) and whose layers say
        their kernels' axes: ``LinearGeneral`` (multi-head attention's projections) its
        batch, input and output features, ``Einsum`` its equation, ``Conv`` its window;
        leading axes beyond a layer's own kernel shape (layers stacked with ``nnx.vmap``
        or ``nnx.scan``) are stack axes.
      rank: the rank ``r`` of the update.
      method: ``"dora"`` (default), ``"lora"``, ``"vera"``, ``"dvora"`` (DoRA over VeRA) or
        ``"magnitude"`` (only DoRA's magnitude trains, ``W' = m W0 / ||W0||_c``: the DoRA
        code's ``Wdecompose_target_modules``; ``rank`` and ``alpha`` do not apply).
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
      axes: how each kernel's axes split into stack/input/output axes when the shape
        cannot tell: ``{path_or_regex: Axes(stack, inputs)}`` (positions, or legacy counts;
        see :class:`dora_jax.Axes` and ``Axes.from_einsum``), a callable
        ``(path, leaf) -> Axes | None``, or the result of :func:`infer_axes`; it takes
        precedence over what an NNX model's layers say. Without either, a 2-D kernel is
        taken as Flax's ``(in, out)`` (a Flax Embed ``embedding`` table ``(vocab,
        features)`` likewise: input the vocabulary), and any other kernel is an error that
        says how to give its axes. A key of the dict that matches no leaf of ``params``
        (a typo) is warned of. The adapter leaves always have the layout
        ``A (*stack, *in, r)``, ``B (*stack, r, *out)``, ``magnitude (*stack, *out)``.
      key: PRNG key for the initialisation of ``A``: a ``jax.random.key`` (or a raw
        ``uint32[2]`` key); default ``jax.random.key(0)``.
      dropout: dropout rate on the input of the low-rank branch (active when
        :func:`dora_jax.apply` gets a ``key``).
      rslora: use ``s = alpha / sqrt(rank)`` (a bool, as is ``exact_norm_grad``).
      exact_norm_grad: DoRA only: differentiate through ``||W0 + dW||_c`` instead of
        treating it as a constant (the paper's Sec. 4.3 ablation; costs more).
      dtype: a floating dtype, of the trainable leaves (float32 keeps updates exact on bf16
        bases). With ``jnp.bfloat16`` the DoRA/DVoRA magnitude ``||W0||_c`` is stored in
        bfloat16, so an untrained node equals the base only to bfloat16 rounding (up to
        ~0.4% per column; about 2e-3 relative on the merged ``W'``), as with PEFT's bf16
        adapters; float32 adapters (the default) are exact. ``jnp.float16`` is warned of
        (optax's Adam gives NaN on float16 leaves), 8-bit floats are refused.
      rules: per-kernel settings, as PEFT's ``rank_pattern``/``alpha_pattern`` and more: an
        ordered list of ``(regex, settings)``; for each targeted kernel the first rule whose
        regex is found in its path overrides the arguments above with ``settings``, a dict
        with keys among ``method``, ``rank``, ``alpha``, ``rslora``, ``dropout``,
        ``exact_norm_grad`` (a kernel no rule matches takes the arguments as they are).
        An ``alpha`` given by neither the rule nor the call is ``2 * rank`` of the kernel.
        Rules choose settings, not targets (``targets`` does that); a rule that matches no
        targeted kernel is an error, as is one shadowed by earlier rules (each kernel it
        matches is taken by an earlier one) and a key outside that list. VeRA/DVoRA kernels
        share one pair of random matrices, so all of them must have the same rank. A
        setting that no kernel's method uses (``alpha`` or ``rslora`` for VeRA, DVoRA or
        magnitude-only nodes, ``dropout`` for magnitude-only nodes, ``exact_norm_grad`` for
        LoRA or VeRA) is an error rather than ignored, in the call and in a rule.

    Returns:
      A tree of the same structure whose targeted kernels are ``LoRA``/``DoRA``/``VeRA``/
      ``DVoRA`` nodes.

    Example::

      adapted = dora_jax.wrap(variables["params"], rank=8)
      y = dora_jax.apply(model.apply)({"params": adapted}, x)
      # DoRA r16 on the MLP, LoRA r4 on q/v, magnitude only on the rest:
      adapted = dora_jax.wrap(params, method="magnitude", rules=[
          (r"mlp/", dict(method="dora", rank=16)),
          (r"(q|v)_proj", dict(method="lora", rank=4, alpha=8))])
    """
    settings = dict(
        method=method, alpha=alpha, targets=targets, key=key, dropout=dropout, rslora=rslora,
        exact_norm_grad=exact_norm_grad, dtype=dtype, rules=rules,
    )  # fmt: skip
    check_no_node_dicts(params, "wrap")
    if isinstance(params, nnx.Module):
        graphdef, state = nnx.split(params)
        adapted = _wrap(state, rank, axes, _layer_axes(params), **settings)
        return nnx.merge(graphdef, adapted)
    return _wrap(params, rank, axes, None, **settings)


def _wrap(params, rank, axes, layers, *, method, alpha, targets, key, dropout, rslora,
          exact_norm_grad, dtype, rules, any_rank=False):  # fmt: skip
    """:func:`wrap`'s body; ``any_rank`` lets a rank exceed ``min(in, out)`` (adapters
    trained elsewhere, e.g. PEFT's, which allows it)."""
    _check_settings(
        dict(method=method, rank=rank, alpha=alpha, dropout=dropout, rslora=rslora,
             exact_norm_grad=exact_norm_grad)
    )  # fmt: skip
    _check_dtype(dtype)
    _check_key(key)
    if any(is_adapter(x) for x in jax.tree.leaves(params, is_leaf=is_adapter)):
        raise ValueError(
            "params already holds adapters: wrapping twice would adapt the adapters. Call "
            "dora_jax.merge(params) first to fold them in, or wrap the original params."
        )
    defaults = dict(
        method=method, rank=rank, alpha=alpha, rslora=rslora, dropout=dropout,
        exact_norm_grad=exact_norm_grad,
    )  # fmt: skip
    key = jax.random.key(0) if key is None else key
    predicate = _target_predicate(targets)

    from dora_jax.quant import QuantizedArray  # here: dora_jax.quant imports this module

    # A QuantizedArray is one leaf here: a target names the kernel, never its codes or scales.
    def quantised(x):
        return isinstance(x, QuantizedArray)

    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=quantised)
    _check_axes_keys(axes, leaves_with_path)
    quantise_after = (
        "Wrap the float params first, then quantise the adapted tree: "
        "dora_jax.quantize_base(dora_jax.wrap(params, ...), 'nf4'). To keep ready "
        "QuantizedArrays (e.g. a GGUF file's blocks), wrap their q.dequantize() and pass them "
        "as quantize_base(adapted, {'path/to/kernel': q, ...})."
    )
    chosen = []
    for i, (path, leaf) in enumerate(leaves_with_path):
        p = path_str(path)
        if predicate(p, leaf):
            if quantised(leaf):
                raise TypeError(
                    f"Kernel '{p}' is already quantised (a {leaf.format} QuantizedArray): "
                    f"wrap adapts float kernels and needs their float values for DoRA's "
                    f"magnitude. {quantise_after} Or exclude it with targets=."
                )
            if not _is_float_array(leaf):
                raise TypeError(
                    f"Kernel '{p}' has dtype {getattr(leaf, 'dtype', type(leaf))}; only "
                    f"floating kernels can be adapted (for a quantised base, wrap the float "
                    f"kernel, then dora_jax.quantize_base). Exclude it with targets=."
                )
            if leaf.ndim < 2:
                raise ValueError(
                    f"targets= picked '{p}' with shape {tuple(leaf.shape)}, which is not a "
                    f"kernel: a kernel needs at least 2 axes (inputs and outputs), and a bias "
                    f"or scale is not adapted. Pass a narrower targets= (a regex, which only "
                    f"considers leaves with 2 or more axes, or a predicate that checks "
                    f"leaf.ndim >= 2)."
                )
            ax, assumed = _resolve_axes(p, leaf, axes, layers)
            chosen.append((i, p, ax, assumed, _check_axes(p, leaf, ax)))
    if not chosen:
        held = [path_str(path) for path, leaf in leaves_with_path if quantised(leaf)]
        if held:
            raise ValueError(
                f"No kernel matches "
                f"{'the default' if targets is None else f'targets={targets!r}'}, and params "
                f"holds {len(held)} quantised kernel(s) (QuantizedArray, e.g. '{held[0]}'), "
                f"which wrap cannot adapt: neither they nor their codes and scales are "
                f"targets. {quantise_after}"
            )
        raise _no_target_error(targets, leaves_with_path)
    settings = _resolve_rules(rules, [p for _, p, *_ in chosen], defaults)
    _check_applies(defaults, {cfg["method"] for cfg in settings}, "wrap was given")

    too_small = [
        (p, limit, cfg["rank"])
        for (_, p, _, _, limit), cfg in zip(chosen, settings)
        if KINDS[cfg["method"]].rank_bounded and cfg["rank"] > limit and not any_rank
    ]
    if too_small:
        ranks = sorted({r for _, _, r in too_small})
        each = len(ranks) > 1  # rules gave different ranks: name each kernel's
        listed = ", ".join(
            f"'{p}' ({f'rank {r}, ' if each else ''}max {limit})" for p, limit, r in too_small[:6]
        )
        raise ValueError(
            f"rank={ranks[0] if not each else ranks} is larger than some kernels allow: "
            f"{listed}. A rank above "
            f"min(in, out) adds parameters without adding expressiveness. Pass rank <= "
            f"{min(limit for _, limit, _ in too_small)}, or leave those kernels out with "
            f"targets=."
        )
    new_leaves = [leaf for _, leaf in leaves_with_path]
    # Kinds with shared leaves (VeRA's and DVoRA's matrices) draw one pair from `key`, over
    # every kernel of those kinds (one pair per tree); the others draw one key per kernel.
    shared = {}
    kinds = sorted({KINDS[cfg["method"]] for cfg in settings if KINDS[cfg["method"]].shared},
                   key=lambda kind: kind.__name__)  # fmt: skip
    if kinds:
        mine = [(c, cfg) for c, cfg in zip(chosen, settings) if KINDS[cfg["method"]].shared]
        ranks = sorted({cfg["rank"] for _, cfg in mine})
        if len(ranks) > 1:
            names = " and ".join(kind.__name__ for kind in kinds)
            raise ValueError(
                f"{names} kernels share one pair of random matrices, so they need one "
                f"rank; the rules give {ranks}. Give every such kernel the same rank."
            )
        sizes = [_in_out(new_leaves[i].shape, ax) for (i, _, ax, _, _), _ in mine]
        pair = kinds[0].init_shared(sizes, ranks[0], key, dtype)
        shared = dict.fromkeys(kinds, pair)
    # Without rules the keys are those of a single-method wrap (same initialisation).
    keys = jax.random.split(jax.random.fold_in(key, 1) if shared else key, len(chosen))
    for k, (i, p, ax, assumed, _), cfg in zip(keys, chosen, settings):
        kind = KINDS[cfg["method"]]
        r = cfg["rank"]
        a = 2.0 * r if cfg["alpha"] is None else float(cfg["alpha"])
        scale = a / math.sqrt(r) if cfg["rslora"] else a / r
        new_leaves[i] = kind.init(
            new_leaves[i], ax, rank=r, key=k, shared=shared.get(kind), path=p,
            assumed_layout=assumed, scale=scale, dtype=dtype, dropout=cfg["dropout"],
            exact_norm_grad=cfg["exact_norm_grad"],
        )  # fmt: skip
    return _stash_kernel_sharding(jax.tree.unflatten(treedef, new_leaves))


def _resolve_rules(rules, paths: list[str], defaults: dict) -> list[dict]:
    """The settings of each targeted kernel: the first matching rule over ``defaults``."""
    if isinstance(rules, Mapping):
        raise TypeError(
            "rules must be an ordered list of (regex, dict of settings) pairs, e.g. "
            "[(r'mlp/', dict(rank=16))]; got a dict (list(rules.items()) keeps its order)."
        )
    compiled = []
    for n, rule in enumerate(rules or ()):
        if not (
            isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[1], Mapping)
        ):
            raise TypeError(
                f"rules[{n}] must be a (regex, settings) pair, settings a dict, e.g. "
                f"(r'mlp/', dict(method='dora', rank=16)); got {rule!r}."
            )
        pattern, overrides = rule
        regex = _compile(pattern, f"rules[{n}]")
        unknown = sorted(set(overrides) - set(RULE_KEYS))
        if unknown:
            raise ValueError(
                f"rules[{n}] ({pattern!r}) sets {unknown}, which a rule cannot set; allowed "
                f"keys: {RULE_KEYS}."
            )
        method = overrides.get("method", defaults["method"])
        if method in KINDS:  # an unknown one is named by _check_settings below
            _check_applies(overrides, {method}, f"rules[{n}] ({pattern!r}) sets")
        compiled.append((regex, dict(overrides)))
    winner = {}  # path -> the index of the rule it takes
    settings = []
    for path in paths:
        cfg = dict(defaults)
        for n, (regex, overrides) in enumerate(compiled):
            if regex.search(path):
                cfg.update(overrides)
                winner[path] = n
                break
        _check_settings(cfg, path)
        settings.append(cfg)
    used = set(winner.values())
    unused = [n for n in range(len(compiled)) if n not in used]
    shadowed = {n: [p for p in paths if compiled[n][0].search(p)] for n in unused}
    problems = []
    nothing = [compiled[n][0].pattern for n in unused if not shadowed[n]]
    if nothing:
        problems.append(
            f"rules {nothing} match no targeted kernel (targeted: {paths[:6]}...); a rule "
            f"regex is searched in the '/'-joined path of kernels chosen by targets=."
        )
    for n in unused:
        if shadowed[n]:
            taken = "; ".join(
                f"'{p}' by rules[{winner[p]}] ({compiled[winner[p]][0].pattern!r})"
                for p in shadowed[n][:6]
            )
            problems.append(
                f"rules[{n}] ({compiled[n][0].pattern!r}) is shadowed: the first matching "
                f"rule wins, and each kernel it matches is taken by an earlier rule: {taken}. "
                f"Put the narrower rule first, or narrow the earlier one."
            )
    if problems:
        raise ValueError(" ".join(problems))
    return settings


def _scalar(value):
    """A concrete 0-d numeric array (``jnp.float32(4)``, ``np.array(4)``) as the Python
    number it holds; anything else (a tracer, a bool array, a non-number) as it is."""
    if not isinstance(value, (jax.Array, np.ndarray)) or np.ndim(value) != 0:
        return value
    if not jnp.issubdtype(value.dtype, jnp.number):
        return value
    try:
        return value.item()
    except jax.errors.ConcretizationTypeError:
        return value


def _check_settings(cfg: dict, path: str | None = None) -> None:
    """Refuses a method, rank, alpha, dropout rate or boolean option that makes no sensible
    adapter; turns 0-d numeric arrays and numpy bools into Python numbers and bools."""
    where = f" (kernel '{path}')" if path else ""
    if cfg["method"] not in METHODS:
        raise ValueError(f"method={cfg['method']!r} is not one of {METHODS}{where}.")
    rank = _scalar(cfg["rank"])
    if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {cfg['rank']!r}{where}.")
    cfg["rank"] = int(rank)  # numpy integers too (a rank read from a config array)
    real = lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)  # noqa: E731
    if isinstance(cfg.get("alpha"), (jax.Array, np.ndarray)):
        cfg["alpha"] = _scalar(cfg["alpha"])
    alpha = cfg.get("alpha")
    if alpha is not None and not (real(alpha) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(
            f"alpha must be a finite positive number (the update's scale is alpha / rank), "
            f"got {alpha!r}{where}."
        )
    if isinstance(cfg["dropout"], (jax.Array, np.ndarray)):
        cfg["dropout"] = _scalar(cfg["dropout"])  # a float: the node keeps it as static data
    dropout = cfg["dropout"]
    if not (real(dropout) and 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}{where}.")
    for name in ("rslora", "exact_norm_grad"):
        value = cfg[name]
        if not isinstance(value, (bool, np.bool_)):
            # A string is truthy: exact_norm_grad="no" would turn the option on.
            raise TypeError(f"{name} must be True or False, got {value!r}{where}.")
        cfg[name] = bool(value)


def _check_applies(cfg: Mapping[str, Any], methods: set[str], who: str) -> None:
    """Refuses a setting given in ``cfg`` that none of ``methods`` uses (it would be ignored
    without a word): an ``alpha`` or ``rslora`` for VeRA, DVoRA or magnitude-only nodes
    (they have no scale), a dropout for magnitude-only nodes (no low-rank branch), an
    ``exact_norm_grad`` for LoRA or VeRA (no norm)."""
    given = {
        name: value for name, value in cfg.items()
        if name in _OPTIONS and (value is not None if name == "alpha" else bool(value))
    }  # fmt: skip
    unused = sorted(set(given) - set().union(*(KINDS[m].options for m in methods)))
    if unused:
        listed = ", ".join(f"{name}={given[name]!r}" for name in unused)
        why = (
            KINDS[next(iter(methods))].without if len(methods) == 1
            else f"none of the methods {sorted(methods)} of the targeted kernels uses it"
        )  # fmt: skip
        raise ValueError(
            f"{who} {listed}, which would be ignored: {why}. Leave "
            f"{'them' if len(unused) > 1 else 'it'} out."
        )


# The settings beyond method and rank, which some methods do not use.
_OPTIONS = ("alpha", "rslora", "dropout", "exact_norm_grad")


def _check_dtype(dtype) -> None:
    """Refuses a ``dtype`` the trainable leaves cannot have (None: float32)."""
    if dtype is None:
        return
    try:
        floating = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        raise TypeError(
            f"dtype must be a floating dtype for the trainable leaves (jnp.float32, the "
            f"default, or jnp.bfloat16), got {getattr(dtype, '__name__', dtype)!r}."
        )
    dtype = jnp.dtype(dtype)
    if dtype.itemsize < 2:
        raise TypeError(
            f"dtype={dtype.name} for the trainable leaves: 8-bit floats cannot hold the small "
            f"updates of training. Keep the adapters in jnp.float32 (the default) or "
            f"jnp.bfloat16; an 8-bit base kernel is fine (the adapters contract in its "
            f"compute dtype)."
        )
    if dtype == jnp.float16:
        warnings.warn(
            "dtype=float16 for the trainable leaves: optimiser states in float16 underflow "
            "(optax's Adam eps=1e-8 and squared gradients below ~6e-8 are 0 in float16, so "
            "the first update is NaN). Keep the adapters in jnp.float32 (the default; the "
            "forward still runs in the model's float16) or jnp.bfloat16, or keep float32 "
            "master copies of them in the optimiser.",
            UserWarning,
            stacklevel=4,
        )


def _check_key(key) -> None:
    """Refuses a ``key`` that is not one PRNG key (a typed key, or raw ``uint32`` data)."""
    if key is None:
        return
    dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
    typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)
    if typed and shape == ():
        return
    if not typed and dtype == np.uint32 and len(shape) == 1:
        return  # raw key data, jax.random.PRNGKey(0); jax checks the size for its impl
    got = f"{type(key).__name__} {key!r}" if dtype is None else f"shape {shape} dtype {dtype}"
    raise TypeError(
        f"key must be one JAX PRNG key, e.g. key=jax.random.key(0) (or raw uint32 key data "
        f"from jax.random.PRNGKey(0)); got {got}. Not a batch of keys: wrap draws what it "
        f"needs from one."
    )


def _in_out(shape, ax: Axes) -> tuple[int, int]:
    """Flattened input and output sizes of a kernel."""
    _, inputs, outputs = ax.split(len(shape))
    return math.prod(shape[p] for p in inputs), math.prod(shape[p] for p in outputs)


def merge(adapted: PyTree) -> PyTree:
    """Plain params: each adapter node replaced by its adapted kernel ``W'``.

    Same structure, shapes and dtypes as the original params; ``W'`` is computed in float32
    and cast to the base dtype. The merged model runs exactly as fast as the base model.

    Example::

      merged = dora_jax.merge(adapted)
      y = model.apply({"params": merged}, x)
    """
    _check_whole(adapted, "merge", plain_ok=True)
    merged = jax.tree.map(
        lambda x: x.materialise() if is_adapter(x) else x, adapted, is_leaf=is_adapter
    )
    return _restore_kernel_sharding(merged)


# The sharding metadata of an NNX kernel Variable (flax's ``out_sharding``, and the
# ``optimizer_sharding`` that nnx.Optimizer reads) is one spec for one array: on the Variable
# that holds an adapter node it would be applied to every field (wrong for A, B and m, whose
# ranks and axes differ), by nnx.get_partition_spec and by eager sharding alike. wrap keeps
# it under these names instead (the node then reads as replicated, P()), where
# dora_jax.sharding.get_partition_spec derives each field's spec from it; merge puts it back.
STASHED_SHARDING = {"out_sharding": "kernel_out_sharding",
                    "optimizer_sharding": "kernel_optimizer_sharding"}  # fmt: skip


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _renamed_metadata(tree: PyTree, holds_node: bool, names: Mapping[str, str]) -> PyTree:
    """``tree`` with the metadata keys ``names`` renamed on its NNX Variables that hold an
    adapter node (``holds_node``) or do not; ``tree`` itself where it holds no Variable (a
    mapped tree would rebuild every pytree node in it, e.g. a user's QuantizedArray)."""
    if not any(map(_is_variable, jax.tree.leaves(tree, is_leaf=_is_variable))):
        return tree

    def one(x):
        if not _is_variable(x) or is_adapter(x.get_raw_value()) != holds_node:
            return x
        metadata = x.get_metadata()
        moved = {names[k]: metadata.pop(k) for k in list(metadata) if k in names}
        if not moved:
            return x
        return type(x).from_metadata(x.get_raw_value(), {**metadata, **moved})

    return jax.tree.map(one, tree, is_leaf=_is_variable)


def _stash_kernel_sharding(adapted: PyTree) -> PyTree:
    return _renamed_metadata(adapted, True, STASHED_SHARDING)


def _restore_kernel_sharding(merged: PyTree) -> PyTree:
    return _renamed_metadata(merged, False, {v: k for k, v in STASHED_SHARDING.items()})


def trainable_mask(adapted: PyTree) -> PyTree:
    """A tree of bools with the structure of ``adapted``: True for trainable leaves.

    Not for ``optax.masked`` alone: it passes the updates of masked-out leaves through
    unchanged, so the raw gradient of every frozen bias would be applied. Give every leaf
    a transform, as :func:`dora_jax.only_trainable` does with this mask.

    Example::

      labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable_mask(adapted))
      tx = optax.multi_transform({"train": optax.adamw(1e-3), "freeze": optax.set_to_zero()},
                                 labels)
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


def summary(adapted: PyTree) -> str:
    """A table of what :func:`wrap` adapted and what it left: for each adapter node its path,
    kind, rank, kernel shape and axes, and trainable parameters; then the floating leaves
    with 2 or more axes that are not adapted (projections a target missed show up there),
    and the trainable share of all parameters (as PEFT's ``print_trainable_parameters``).

    Example::

      adapted = dora_jax.wrap(params, rank=8)
      print(dora_jax.summary(adapted))
    """
    if isinstance(adapted, nnx.Module):
        adapted = nnx.state(adapted)
    flat = jax.tree_util.tree_flatten_with_path(adapted, is_leaf=is_adapter)[0]
    rows, left, total, trainable = [], [], 0, 0
    for path, x in flat:
        if is_adapter(x):
            own = sum(math.prod(np.shape(getattr(x, n))) for n in x.trainable)
            total += own + math.prod(x.shape)
            trainable += own
            rank = "-" if x.trainable == ("magnitude",) else x.rank  # magnitude only: none
            roles = ",".join(map(str, x.stack)) or "-", ",".join(map(str, x.inputs))
            rows.append((path_str(path), type(x).__name__, str(rank), str(tuple(x.shape)),
                         f"{roles[0]} | {roles[1]}", f"{own:,}"))  # fmt: skip
        elif hasattr(x, "shape") and hasattr(x, "dtype"):
            total += math.prod(np.shape(x))
            if _is_float_array(x) and np.ndim(x) >= 2:
                left.append((path_str(path), str(tuple(np.shape(x)))))
    lines = [f"adapted kernels: {len(rows)}"]
    if rows:
        head = ("path", "kind", "rank", "kernel", "stack | in", "trainable")
        width = [max(len(r[k]) for r in (head, *rows)) for k in range(len(head))]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, width)) for r in (head, *rows)]
    lines.append(f"not adapted, floating with 2 or more axes: {len(left)}")
    pad = max((len(p) for p, _ in left), default=0)
    lines += [f"  {p.ljust(pad)}  {shape}" for p, shape in left]
    share = 100 * trainable / total if total else 0.0
    lines.append(f"trainable: {trainable:,} of {total:,} parameters ({share:.4g}%)")
    return "\n".join(lines)


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
        _check_trainable_not_restored_as_dicts(frozen, trainable)
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


def _check_trainable_not_restored_as_dicts(frozen: PyTree, trainable: PyTree) -> None:
    """Refuses a trainable half holding a plain dict where ``frozen`` holds a node: saved
    with ``flax.serialization.to_bytes`` and read back with ``msgpack_restore`` (or orbax
    without a target), each node is a dict of its trainable fields."""
    with_path = jax.tree_util.tree_flatten_with_path
    nodes = {
        jax.tree_util.keystr(p): n for p, n in with_path(frozen, is_leaf=is_adapter)[0]
        if is_adapter(n)
    }  # fmt: skip
    for path, held in with_path(trainable, is_leaf=_holds_fields)[0]:
        node = nodes.get(jax.tree_util.keystr(path))
        fields = node is not None and {f.name for f in dataclasses.fields(node)}
        if fields and _holds_fields(held) and set(type(node).trainable) <= set(held) <= fields:
            raise ValueError(
                f"combine got a plain dict at '{path_str(path)}' ({sorted(held)}) where the "
                f"frozen half holds a dora_jax.{type(node).__name__} node: the trainable half "
                f"was restored without a target (flax.serialization.msgpack_restore, orbax "
                f"restore(path) with no target). Restore it into the trainable half of the "
                f"adapted tree as a template instead: frozen, template = "
                f"dora_jax.partition(adapted); trainable = flax.serialization.from_bytes("
                f"template, data) (or checkpointer.restore(path, template))."
            )


def _holds_fields(x) -> bool:
    """Whether ``x`` could be a node restored as a dict: a mapping of string keys to arrays
    (or None), a quantised ``base`` a dict of its own; a submodule holds dicts."""
    return isinstance(x, Mapping) and all(
        isinstance(k, str) and (k == "base" or not isinstance(v, Mapping)) for k, v in x.items()
    )


def _node_key_sets() -> dict[frozenset[str], str]:
    """The keys a node of each registered kind becomes as a dict: its array fields, and
    without those that may be None (msgpack drops them), e.g. a quantised base's offsets."""
    sets = {}
    for cls in NODE_TYPES:
        fields = [f for f in dataclasses.fields(cls) if f.metadata.get("static") is not True]
        names = frozenset(f.name for f in fields)
        sets[names] = cls.__name__
        # Annotated ``... | None`` (a string: this module defers annotations).
        optional = {f.name for f in fields if "None" in str(f.type)}
        sets.setdefault(names - optional, cls.__name__)
    return sets


def check_no_node_dicts(tree: PyTree, what: str) -> None:
    """Refuses a tree holding dicts in place of adapter nodes: one restored without a target.

    orbax's ``restore(path)`` with no target and ``flax.serialization.msgpack_restore`` give
    each node back as a dict of its array fields (``{'a', 'b', 'base', 'magnitude'}`` for
    DoRA), which ``merge`` would pass through unchanged and a model would fail on far from
    the cause. Walks dicts, lists and tuples only, reading keys, never array values, so it
    is cheap enough for every call (``what`` names the caller in the message).

    Example::

      check_no_node_dicts(params, "dora_jax.apply")
    """
    sets = _node_key_sets()

    def walk(x, path):
        if isinstance(x, Mapping):
            kind = sets.get(frozenset(x)) if _holds_fields(x) else None
            if kind is not None:
                raise ValueError(
                    f"{what} got a plain dict at '{'/'.join(path)}' with the fields of a "
                    f"dora_jax.{kind} node ({sorted(x)}): the tree was restored without a "
                    f"target (orbax restore(path) with no target, flax.serialization."
                    f"msgpack_restore), which gives each adapter node back as a dict. Restore "
                    f"into a template instead: the adapted tree itself, or "
                    f"jax.eval_shape(lambda: dora_jax.wrap(params, rank=..., ...)) with the "
                    f"wrap settings it was saved with, e.g. checkpointer.restore(path, "
                    f"template) or flax.serialization.from_bytes(template, data); or save and "
                    f"restore with dora_jax.checkpoint."
                )
            for k, v in x.items():
                walk(v, (*path, str(k)))
        elif isinstance(x, list | tuple):
            for i, v in enumerate(x):
                walk(v, (*path, str(i)))

    walk(tree, ())


def _check_whole(adapted: PyTree, what: str, plain_ok: bool = False) -> None:
    """Clear errors for a tree with one half of a partition missing, with adapter nodes
    restored as dicts, or (unless ``plain_ok``: merging plain params returns them unchanged)
    without adapters."""
    check_no_node_dicts(adapted, what)
    nodes = [
        (path_str(p), x)
        for p, x in jax.tree_util.tree_flatten_with_path(adapted, is_leaf=is_adapter)[0]
        if is_adapter(x)
    ]
    if not nodes and not plain_ok:
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
