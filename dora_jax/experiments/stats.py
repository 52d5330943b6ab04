"""Paired confidence intervals for "A beats B" claims, with verdicts.

Two methods scored on the same held-out examples with the same seeds give a paired
difference ``d[s, i]`` per seed ``s`` and example ``i`` of each task. The estimate is the
mean difference (averaged within each task, then over tasks); it has two sources of noise:

- which examples were drawn: each example's difference averaged over the seeds varies, and
  the example-sampling variance of the estimate is ``SE_ex^2 = sum_t var_t / (N_t T^2)``
  over the ``T`` tasks (strata, ``N_t`` examples each; Cochran, *Sampling Techniques*, 1977,
  ch. 5). A stratified bootstrap over examples estimates the same quantity by Monte Carlo;
- which seeds were run: the per-seed estimates ``d_s`` (mean over tasks of the mean over
  examples) vary from seed to seed, and their variance ``s^2 / n`` over ``n`` seeds is the
  seed part.

The interval is ``estimate ± t * sqrt(SE_ex^2 + s^2 / n)`` where ``t`` is Cochran and Cox's
critical value for a sum of variance components, the variance-weighted mean of each
component's t quantile (``t_interval``; Cochran & Cox 1950, Cochran 1964): with few seeds
and small example noise it is the ordinary t-interval over seeds (``n - 1`` df: with three
seeds ``t = 4.30``, not 1.96), with seeds that agree it is the interval over examples. In a
crossed seed x example random-effects model both terms also contain the seed x example
interaction, so the sum counts it twice: the interval errs wide. Simulated with no true
difference (tests/experiments/test_stats.py), "held" comes out at or below the nominal 2.5%
with 3 and 5 seeds at every ratio of seed to example noise tried. Why seeds must count at all:
Bouthillier et al. 2021, "Accounting for variance in machine learning benchmarks" (MLSys).

Resampling the seeds with replacement, as a bootstrap over seeds and examples would, is not
used: with three seeds a resample draws one seed three times with probability 1/27 > 2.5%, so
once example noise is small the lower end never falls below the smallest seed's mean, and
three seeds that all favour A give "held" whatever their spread (a sign test at p = 1/8).

With one seed the seed variance cannot be estimated: the interval covers example sampling
only, and a verdict other than "inconclusive" says "for this seed". Each interval is per
claim; a table of six claims at 95% each is not a 95% statement about all six.

Example::

    c = claim("DoRA beats LoRA", "accuracy", [dora_task1, dora_task2], [lora_task1, lora_task2])
    c["estimate"], c["ci_low"], c["ci_high"], c["verdict"]
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats as scipy_stats

VERDICTS = ("held", "not held", "inconclusive", "no difference")
# With one seed a decided verdict is conditional on that seed: "held for this seed".
ONE_SEED = " for this seed"


class PairedInterval(NamedTuple):
    """A paired difference's estimate and interval, and the parts it was built from."""

    estimate: float
    low: float
    high: float
    per_seed: tuple[float, ...]  # d_s: mean over tasks of the mean difference over examples
    se_examples: float  # standard error from the sampling of examples (seed-averaged)
    se_seeds: float | None  # s / sqrt(n) over the per-seed estimates; None with one seed
    t: float  # the critical value (Cochran-Cox); nan when the variance is 0 or unknown


def t_interval(
    estimate: float,
    variances: Sequence[float],
    dfs: Sequence[float],
    *,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """``estimate ± t * sqrt(sum(variances))`` with Cochran and Cox's critical value.

    ``t = sum(v_i * t_{df_i}) / sum(v_i)``, the variance-weighted mean of each component's
    own t quantile (Cochran & Cox, *Experimental Designs*, 1950; Cochran 1964, Biometrics
    20:191). It keeps the one-sided error at or below ``(1 - level) / 2`` where a
    Welch-Satterthwaite ``df`` does not: with a 2-df component estimated small by chance,
    that ``df`` grows and the interval shrinks (3.9% instead of 2.5% with three seeds).

    Args:
      estimate: the point estimate.
      variances: independent variance components of the estimate (each >= 0).
      dfs: the degrees of freedom each component was estimated with.
      level: coverage of the interval.

    Returns:
      ``(low, high, t)``; a zero total variance gives the point ``(estimate, estimate,
      nan)``, an infinite one ``(-inf, inf, nan)``.

    Example::

        low, high, t = t_interval(0.3, [0.01], [2])  # 0.3 ± 4.30 * 0.1
    """
    variances = np.asarray(variances, np.float64)
    dfs = np.asarray(dfs, np.float64)
    total = float(variances.sum())
    if total == 0.0:
        return float(estimate), float(estimate), float("nan")
    if not np.isfinite(total):
        return float("-inf"), float("inf"), float("nan")
    quantiles = scipy_stats.t.ppf((1.0 + level) / 2.0, dfs)
    t = float(np.sum(variances * quantiles) / total)
    half = t * np.sqrt(total)
    return float(estimate - half), float(estimate + half), t


def paired_interval(differences: Sequence[np.ndarray], *, level: float = 0.95) -> PairedInterval:
    """Mean paired difference with an interval for both example and seed variance.

    Args:
      differences: one array per task (stratum), shape ``(n_seeds, n_examples)`` or
        ``(n_examples,)`` (one seed): method A's score minus method B's on the same
        example with the same seed. Every task must have the same number of seeds.
      level: coverage of the interval.

    Returns:
      A ``PairedInterval``: the mean over tasks of each task's mean difference, and
      ``estimate ± t * sqrt(SE_ex^2 + s^2 / n)`` (module docstring). A task with one
      example gives an unbounded interval (its example variance is unknown).

    Example::

        r = paired_interval([np.array([[0.1, 0.3], [0.2, 0.0]])])  # 2 seeds, 2 examples
        r.estimate, r.low, r.high, r.per_seed
    """
    groups = [np.atleast_2d(np.asarray(d, np.float64)) for d in differences]
    if not groups or any(g.size == 0 for g in groups):
        raise ValueError("paired_interval needs at least one non-empty array of differences")
    n_seeds = groups[0].shape[0]
    if any(g.shape[0] != n_seeds for g in groups):
        raise ValueError(
            f"every task needs the same number of seeds; got {[g.shape[0] for g in groups]}"
        )
    n_tasks = len(groups)
    per_seed = np.mean([g.mean(axis=1) for g in groups], axis=0)  # (n_seeds,)
    estimate = float(per_seed.mean())
    variances, dfs = [], []
    for g in groups:  # example sampling, stratified by task, of the seed-averaged difference
        x = g.mean(axis=0)
        n = x.size
        variances.append(np.var(x, ddof=1) / n / n_tasks**2 if n > 1 else np.inf)
        dfs.append(max(n - 1, 1))
    se_examples = float(np.sqrt(np.sum(variances)))
    se_seeds = None
    if n_seeds > 1:
        seed_var = float(np.var(per_seed, ddof=1)) / n_seeds
        se_seeds = float(np.sqrt(seed_var))
        variances.append(seed_var)
        dfs.append(n_seeds - 1)
    low, high, t = t_interval(estimate, variances, dfs, level=level)
    return PairedInterval(
        estimate, low, high, tuple(float(d) for d in per_seed), se_examples, se_seeds, t
    )


def paired_bootstrap(
    differences: Sequence[np.ndarray],
    *,
    n_boot: int | None = None,
    level: float = 0.95,
    seed: int | None = None,
) -> tuple[float, float, float]:
    """Deprecated: ``(estimate, low, high)`` of ``paired_interval``, kept for callers.

    The bootstrap it used to be resampled seeds with replacement, which with few seeds reads any
    run whose seeds all favour A as significant (module docstring); ``n_boot`` and
    ``seed`` are accepted and unused.
    """
    warnings.warn(
        "stats.paired_bootstrap is deprecated: use stats.paired_interval (the interval is "
        "no longer a bootstrap over seeds)",
        DeprecationWarning,
        stacklevel=2,
    )
    del n_boot, seed
    r = paired_interval(differences, level=level)
    return r.estimate, r.low, r.high


def verdict(low: float, high: float, *, n_seeds: int | None = None) -> str:
    """The verdict on a claim "A beats B" whose interval on A - B is ``[low, high]``.

    ``"held"`` when the interval lies above 0, ``"not held"`` when it lies at or below 0
    (A does not beat B), ``"no difference"`` when it is the point 0 (no difference
    observed: identical scores), else ``"inconclusive"``. With ``n_seeds == 1`` a verdict
    other than ``"inconclusive"`` ends in ``" for this seed"``: the seed variance was not
    estimated.

    Example::

        verdict(0.1, 0.3)  # "held";  verdict(0.1, 0.3, n_seeds=1)  # "held for this seed"
    """
    if low == 0.0 and high == 0.0:
        out = "no difference"
    elif low > 0:
        out = "held"
    elif high <= 0:
        out = "not held"
    else:
        return "inconclusive"
    return out + ONE_SEED if n_seeds == 1 else out


def seed_variance(n_seeds: int) -> str:
    """What a claim's interval says about seeds: ``"estimated from 3 seeds"`` or
    ``"not estimated (1 seed)"``."""
    return f"estimated from {n_seeds} seeds" if n_seeds > 1 else "not estimated (1 seed)"


def claim(
    text: str,
    metric: str,
    a: Sequence[np.ndarray],
    b: Sequence[np.ndarray],
    *,
    level: float = 0.95,
) -> dict:
    """A claim "A beats B" on ``metric``, from paired per-task scores of A and B.

    Args:
      text: the claim as a sentence.
      metric: the metric's name.
      a, b: one array per task each, ``(n_seeds, n_examples)`` or ``(n_examples,)``,
        paired: the same examples and seeds in the same order.
      level: coverage of the interval.

    Returns:
      ``{"claim", "metric", "estimate", "ci_low", "ci_high", "verdict", "n_examples",
      "n_seeds", "seed_variance", "per_seed", "se_examples", "se_seeds", "t", "level"}``
      (``paired_interval`` and ``verdict``).

    Example::

        c = claim("A beats B", "accuracy", [a_task1, a_task2], [b_task1, b_task2])
    """
    diffs = []
    for x, y in zip(a, b, strict=True):
        x, y = np.atleast_2d(np.asarray(x, np.float64)), np.atleast_2d(np.asarray(y, np.float64))
        if x.shape != y.shape:
            raise ValueError(f"paired scores need equal shapes; got {x.shape} and {y.shape}")
        diffs.append(x - y)
    r = paired_interval(diffs, level=level)
    n_seeds = int(diffs[0].shape[0])
    return {
        "claim": text,
        "metric": metric,
        "estimate": r.estimate,
        "ci_low": r.low,
        "ci_high": r.high,
        "verdict": verdict(r.low, r.high, n_seeds=n_seeds),
        "n_examples": int(sum(d.shape[1] for d in diffs)),
        "n_seeds": n_seeds,
        "seed_variance": seed_variance(n_seeds),
        "per_seed": list(r.per_seed),
        "se_examples": r.se_examples,
        "se_seeds": r.se_seeds,
        "t": r.t if np.isfinite(r.t) else None,  # None: no variance to take a t from
        "level": level,
    }
