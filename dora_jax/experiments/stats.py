"""Paired bootstrap confidence intervals and claims with verdicts.

Two methods scored on the same held-out examples with the same seeds give a paired
difference per (seed, example). The estimate is the mean difference (averaged within each
task, then over tasks); the 95% interval resamples examples with replacement inside each
task and, when there are several seeds, seeds with replacement as well (Efron &
Tibshirani's percentile bootstrap).

Example::

    est, lo, hi = paired_bootstrap([dora_task1 - lora_task1, dora_task2 - lora_task2])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

VERDICTS = ("held", "not held", "inconclusive")


def paired_bootstrap(
    differences: Sequence[np.ndarray],
    *,
    n_boot: int = 4000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean paired difference and its percentile-bootstrap interval.

    Args:
      differences: one array per task (stratum), shape ``(n_seeds, n_examples)`` or
        ``(n_examples,)`` (one seed): method A's score minus method B's on the same
        example with the same seed. Every task must have the same number of seeds.
      n_boot: bootstrap resamples.
      level: coverage of the interval.
      seed: seed of the resampling.

    Returns:
      ``(estimate, low, high)``: the mean over tasks of each task's mean difference, and
      the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of its bootstrap
      distribution (examples resampled within each task, seeds resampled when more than
      one, the same seed draw for every task since seeds pair across tasks).
    """
    groups = [np.atleast_2d(np.asarray(d, np.float64)) for d in differences]
    if not groups or any(g.size == 0 for g in groups):
        raise ValueError("paired_bootstrap needs at least one non-empty array of differences")
    n_seeds = groups[0].shape[0]
    if any(g.shape[0] != n_seeds for g in groups):
        raise ValueError(
            f"every task needs the same number of seeds; got {[g.shape[0] for g in groups]}"
        )
    rng = np.random.default_rng(seed)
    estimate = float(np.mean([g.mean() for g in groups]))
    seed_draw = (
        rng.integers(0, n_seeds, (n_boot, n_seeds)) if n_seeds > 1 else np.zeros((n_boot, 1), int)
    )
    boots = np.zeros(n_boot)
    for g in groups:
        n = g.shape[1]
        example_draw = rng.integers(0, n, (n_boot, n))
        # Mean over resampled seeds of the mean over resampled examples.
        per_seed = g[:, example_draw].mean(axis=2).T  # (n_boot, n_seeds)
        boots += np.take_along_axis(per_seed, seed_draw, axis=1).mean(axis=1)
    boots /= len(groups)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(boots, [alpha, 1.0 - alpha])
    return estimate, float(low), float(high)


def verdict(low: float, high: float) -> str:
    """Of a claim "A beats B" with interval ``[low, high]`` on A - B: ``"held"`` when the
    interval lies above 0, ``"not held"`` when it lies at or below 0 (no gain), else
    ``"inconclusive"``."""
    if low > 0:
        return "held"
    if high <= 0:
        return "not held"
    return "inconclusive"


def claim(
    text: str,
    metric: str,
    a: Sequence[np.ndarray],
    b: Sequence[np.ndarray],
    **bootstrap_kwargs,
) -> dict:
    """A claim "A beats B" on ``metric``, from per-task score arrays of A and B (each
    ``(n_seeds, n_examples)``, paired): ``{"claim", "metric", "estimate", "ci_low",
    "ci_high", "verdict", "n_examples", "n_seeds"}``."""
    diffs = []
    for x, y in zip(a, b, strict=True):
        x, y = np.atleast_2d(np.asarray(x, np.float64)), np.atleast_2d(np.asarray(y, np.float64))
        if x.shape != y.shape:
            raise ValueError(f"paired scores need equal shapes; got {x.shape} and {y.shape}")
        diffs.append(x - y)
    estimate, low, high = paired_bootstrap(diffs, **bootstrap_kwargs)
    return {
        "claim": text,
        "metric": metric,
        "estimate": estimate,
        "ci_low": low,
        "ci_high": high,
        "verdict": verdict(low, high),
        "n_examples": int(sum(d.shape[1] for d in diffs)),
        "n_seeds": int(diffs[0].shape[0]),
    }
