"""Magnitude / direction analysis of fine-tuned kernels (DoRA paper, Sec. 2.2, Fig. 2).

Each kernel is read as columns ``W[:, n]``, one per output feature, whose entries run over
the kernel's input axes (Flax ``(in, out)``: the columns of the matrix). Against the
pre-trained kernel ``W0``:

    ΔM = mean_n | ||W[:, n]|| - ||W0[:, n]|| |          (magnitude change)
    ΔD = mean_n (1 - cos(W[:, n], W0[:, n]))            (direction change)

The paper plots ΔD (x) against ΔM (y), one point per layer and checkpoint, and reads the
sign of the correlation: positive for LoRA, negative for full fine-tuning and DoRA.

Example::

    changes = dora_jax.analysis.weight_change(params, adapted, targets="q_proj")
    fit = dora_jax.analysis.fit_line(list(changes.values()))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dora_jax.adapters import is_adapter
from dora_jax.axes import Axes
from dora_jax.tree import _resolve_axes, _target_predicate, merge, path_str

PyTree = Any


def axis_positions(axes, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(stack axes, input axes)`` of a kernel with ``ndim`` axes, as positions.

    ``axes`` is a ``dora_jax.Axes`` (or an adapter node): integer ``stack``/``inputs`` count
    leading axes (``Axes(1, 1)`` on ``(layers, in, out)`` gives ``((0,), (1,))``); tuples of
    ints are taken as explicit positions.
    """
    try:
        stack, inputs, _ = Axes(axes.stack, axes.inputs).split(ndim)
    except ValueError as e:
        raise ValueError(f"axes {axes!r} do not fit a kernel with {ndim} axes: {e}") from None
    return stack, inputs


def _columns(kernel, stack, inputs) -> jax.Array:
    """``(*stack_shape, n_in, n_out)`` float32 view: one column per output feature."""
    rest = [a for a in range(kernel.ndim) if a not in stack and a not in inputs]
    x = jnp.transpose(jnp.asarray(kernel, jnp.float32), (*stack, *inputs, *rest))
    stack_shape = x.shape[: len(stack)]
    n_in = int(np.prod(x.shape[len(stack) : len(stack) + len(inputs)]))
    return x.reshape(*stack_shape, n_in, -1)


def magnitude_direction_change(base, tuned, stack, inputs) -> tuple[jax.Array, jax.Array]:
    """``(ΔM, ΔD)`` of one kernel, float32 arrays of the stack shape (jit-able).

    ``stack`` and ``inputs`` are axis positions (see :func:`axis_positions`).
    """
    w0 = _columns(base, stack, inputs)
    w = _columns(tuned, stack, inputs)
    n0 = jnp.sqrt(jnp.sum(w0 * w0, axis=-2))
    n = jnp.sqrt(jnp.sum(w * w, axis=-2))
    delta_m = jnp.mean(jnp.abs(n - n0), axis=-1)
    # 1 - cos(w, w0) = ||w/|w| - w0/|w0|||^2 / 2: no cancellation when the direction barely
    # moves (fine-tuning's ΔD is often below 1e-3, where 1 - dot/(|w||w0|) loses digits).
    tiny = jnp.finfo(jnp.float32).tiny
    unit_gap = w / jnp.maximum(n, tiny)[..., None, :] - w0 / jnp.maximum(n0, tiny)[..., None, :]
    delta_d = jnp.mean(0.5 * jnp.sum(unit_gap * unit_gap, axis=-2), axis=-1)
    return delta_m, delta_d


def weight_change(
    base_params: PyTree,
    tuned_params: PyTree,
    *,
    targets: str | list[str] | Callable[[str, Any], bool] | None = None,
    axes: Mapping | Callable | None = None,
) -> dict[str, tuple[float, float]]:
    """Magnitude and direction change of every kernel: ``{path: (ΔM, ΔD)}``.

    Args:
      base_params: the pre-trained params (plain arrays).
      tuned_params: the fine-tuned params, plain (full fine-tuning, or merged) or an adapted
        tree from :func:`dora_jax.wrap` (merged first with :func:`dora_jax.merge`; each
        adapter's own stack/input axes are used). Same structure as ``base_params``.
      targets: which kernels, as in :func:`dora_jax.wrap` (default: every float leaf named
        ``kernel`` with at least 2 axes, and every adapted kernel).
      axes: the stack/input axes of plain kernels with more than 2 axes, as in
        :func:`dora_jax.wrap` (``{path_or_regex: dora_jax.Axes(...)}``, a callable, or
        :func:`dora_jax.infer_axes`'s result). 2-D kernels are ``(in, out)``.

    Returns:
      ``{path: (ΔM, ΔD)}`` as Python floats, in tree order. A kernel with stack axes (an
      ``nn.scan`` stack ``(layers, in, out)``) gives one entry per slice, the index in
      brackets after the path: ``"layers/self_attn/q_proj/kernel[3]"`` (``[i,j]`` for two
      stack axes).

    Example::

      changes = weight_change(params, adapted)            # adapted: from dora_jax.wrap
      dm, dd = changes["layers/self_attn/q_proj/kernel[0]"]
    """
    predicate = _target_predicate(targets)
    tuned_nodes = jax.tree_util.tree_flatten_with_path(tuned_params, is_leaf=is_adapter)[0]
    base_leaves = jax.tree_util.tree_flatten_with_path(base_params)[0]
    if len(tuned_nodes) != len(base_leaves):
        raise ValueError(
            f"base_params has {len(base_leaves)} leaves and tuned_params {len(tuned_nodes)} "
            f"(adapters counted as one): pass the params the adapted tree was wrapped from."
        )
    out: dict[str, tuple[float, float]] = {}
    for (path, node), (base_path, base) in zip(tuned_nodes, base_leaves, strict=True):
        p = path_str(path)
        if p != path_str(base_path):
            raise ValueError(
                f"tuned_params has '{p}' where base_params has '{path_str(base_path)}': the "
                f"two trees must have the same structure."
            )
        if is_adapter(node):
            tuned, ax = merge(node), node
        elif hasattr(node, "ndim") and predicate(p, node):
            if not jnp.issubdtype(node.dtype, jnp.floating):
                continue
            tuned, ax = node, _resolve_axes(p, node, axes)[0]
        else:
            continue
        if tuple(tuned.shape) != tuple(base.shape):
            raise ValueError(
                f"kernel '{p}' has shape {tuple(tuned.shape)} in tuned_params but "
                f"{tuple(base.shape)} in base_params."
            )
        stack, inputs = axis_positions(ax, tuned.ndim)
        delta_m, delta_d = map(np.asarray, magnitude_direction_change(base, tuned, stack, inputs))
        if not stack:
            out[p] = (float(delta_m), float(delta_d))
            continue
        for index in np.ndindex(*delta_m.shape):
            out[f"{p}[{','.join(map(str, index))}]"] = (
                float(delta_m[index]),
                float(delta_d[index]),
            )
    return out


def fit_line(points: Sequence[tuple[float, float]]) -> dict[str, float]:
    """Pearson correlation and least-squares line of ΔM (y) on ΔD (x).

    Args:
      points: ``(ΔM, ΔD)`` pairs, as the values of :func:`weight_change`.

    Returns:
      ``{"correlation", "slope", "intercept", "n"}`` (NaN correlation and slope when ΔD or
      ΔM does not vary).

    Example::

      fit_line(weight_change(params, tuned).values())["correlation"]
    """
    arr = np.asarray(list(points), np.float64).reshape(-1, 2)
    dm, dd = arr[:, 0], arr[:, 1]
    n = len(arr)
    if n < 2 or np.ptp(dd) == 0 or np.ptp(dm) == 0:
        return {"correlation": float("nan"), "slope": float("nan"), "intercept": float("nan"),
                "n": n}  # fmt: skip
    xc, yc = dd - dd.mean(), dm - dm.mean()
    slope = float((xc @ yc) / (xc @ xc))
    corr = float((xc @ yc) / np.sqrt((xc @ xc) * (yc @ yc)))
    return {"correlation": corr, "slope": slope, "intercept": float(dm.mean() - slope * dd.mean()),
            "n": n}  # fmt: skip


def plot_weight_change(
    checkpoints: Mapping[Any, Mapping[str, tuple[float, float]]],
    ax=None,
    *,
    title: str | None = None,
):
    """Fig. 2-style scatter: ΔD on x, ΔM on y, one point per kernel (layer) and checkpoint.

    Args:
      checkpoints: ``{label: weight_change(...)}``, e.g. ``{step: changes}``; each
        checkpoint gets its own marker and colour.
      ax: a matplotlib Axes to draw on (default: a new figure).
      title: the axes title; the fitted correlation and slope over all points are appended.

    Returns:
      ``(ax, fit)`` with ``fit`` from :func:`fit_line` over all points.

    Example::

      ax, fit = plot_weight_change({100: changes_100, 200: changes_200})
      ax.figure.savefig("fig2.png")
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4.2, 3.6))
    markers = "os^Dv<>pXh*"
    points = []
    for i, (label, changes) in enumerate(checkpoints.items()):
        pts = np.asarray(list(changes.values()), np.float64).reshape(-1, 2)
        points.append(pts)
        ax.scatter(pts[:, 1], pts[:, 0], s=14, marker=markers[i % len(markers)], label=label)
    fit = fit_line(np.concatenate(points)) if points else fit_line([])
    if fit["slope"] == fit["slope"]:
        allx = np.concatenate(points)[:, 1]
        xs = np.linspace(allx.min(), allx.max(), 2)
        ax.plot(xs, fit["intercept"] + fit["slope"] * xs, "k--", lw=1)
    ax.set_xlabel("ΔD (mean 1 − cos)")
    ax.set_ylabel("ΔM (mean |Δ‖·‖|)")
    head = f"{title}\n" if title else ""
    ax.set_title(f"{head}r = {fit['correlation']:.2f}, slope = {fit['slope']:.3g}", fontsize=8)
    ax.legend(fontsize=6, title_fontsize=6, title="checkpoint")
    return ax, fit


def fit_line_ci(
    groups: Sequence[Sequence[tuple[float, float]]],
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """:func:`fit_line` over all points, with percentile-bootstrap intervals over groups.

    Args:
      groups: the ``(ΔM, ΔD)`` points of each group, e.g. of each layer (one point per
        checkpoint); a resample draws whole groups with replacement, so points of one layer
        stay together.
      n_boot, level, seed: bootstrap resamples, coverage and seed.

    Returns:
      :func:`fit_line`'s dict plus ``correlation_low/high`` and ``slope_low/high``
      (resamples whose ΔD or ΔM does not vary are left out).

    Example::

      fit = fit_line_ci([[changes_at_t[f"...q_proj/kernel[{i}]"] for changes_at_t in ckpts]
                         for i in range(num_layers)])
    """
    arrays = [np.asarray(list(g), np.float64).reshape(-1, 2) for g in groups]
    fit = fit_line(np.concatenate(arrays) if arrays else [])
    rng = np.random.default_rng(seed)
    corr, slope = [], []
    for _ in range(n_boot):
        pick = rng.integers(0, len(arrays), len(arrays))
        f = fit_line(np.concatenate([arrays[i] for i in pick]))
        if f["correlation"] == f["correlation"]:
            corr.append(f["correlation"])
            slope.append(f["slope"])
    alpha = (1.0 - level) / 2.0
    nan = float("nan")
    lo_c, hi_c = np.quantile(corr, [alpha, 1 - alpha]) if corr else (nan, nan)
    lo_s, hi_s = np.quantile(slope, [alpha, 1 - alpha]) if slope else (nan, nan)
    fit.update(correlation_low=float(lo_c), correlation_high=float(hi_c),
               slope_low=float(lo_s), slope_high=float(hi_s))  # fmt: skip
    return fit
