"""Paired bootstrap and claims against hand-computed cases."""

import numpy as np
import pytest

from dora_jax.experiments import stats


def test_paired_bootstrap_hand_computed():
    """Differences (0, 0, 3): a resample's mean is k with k ~ Binomial(3, 1/3), so
    P(0) = 8/27, P(1) = 12/27, P(2) = 6/27, P(3) = 1/27. The 2.5% quantile is 0; the 97.5%
    quantile is 3 since P(mean <= 2) = 26/27 < 0.975. The estimate is the mean, 1."""
    est, low, high = stats.paired_bootstrap([np.array([0.0, 0.0, 3.0])], n_boot=20000)
    assert est == 1.0 and low == 0.0 and high == 3.0
    # The bootstrap distribution itself: the share of resamples with mean 0 is 8/27.
    est, low, high = stats.paired_bootstrap([np.array([0.0, 0.0, 3.0])], level=0.5,
                                            n_boot=20000)  # fmt: skip
    assert (low, high) == (0.0, 2.0)  # quartiles: P(0) = .30 > .25; P(<=1) = .74 < .75


def test_paired_bootstrap_seeds_and_tasks():
    # Constant differences: every resample gives the same mean, the interval is a point.
    est, low, high = stats.paired_bootstrap([np.full((3, 5), 0.2), np.full((3, 9), 0.4)])
    assert est == pytest.approx(0.3) and low == pytest.approx(0.3) and high == pytest.approx(0.3)
    # Two seeds that disagree: seed resampling alone gives means 0, 1 or 2 (each example
    # constant within a seed), so the 95% interval spans [0, 2].
    d = np.array([[0.0] * 4, [2.0] * 4])
    est, low, high = stats.paired_bootstrap([d], n_boot=20000)
    assert est == 1.0 and low == 0.0 and high == 2.0
    with pytest.raises(ValueError, match="same number of seeds"):
        stats.paired_bootstrap([np.zeros((2, 3)), np.zeros((1, 3))])


def test_paired_bootstrap_covers_a_known_mean():
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(100):
        est, low, high = stats.paired_bootstrap([rng.normal(0.5, 1.0, 200)], n_boot=500,
                                                seed=int(rng.integers(1 << 30)))  # fmt: skip
        hits += low <= 0.5 <= high
        # The percentile interval is close to the normal one, +-1.96 sd / sqrt(n).
        assert high - low == pytest.approx(2 * 1.96 / np.sqrt(200), rel=0.25)
    assert 88 <= hits <= 100


def test_claim_and_verdicts():
    a = [np.array([1.0, 1.0, 0.0, 1.0]), np.array([[0.5, 0.7]])]
    b = [np.array([0.0, 1.0, 0.0, 0.0]), np.array([[0.1, 0.3]])]
    c = stats.claim("A beats B", "accuracy", a, b, n_boot=1000)
    assert c["estimate"] == pytest.approx((0.5 + 0.4) / 2)
    # Task 1's resampled mean is 0 with probability (1/2)^4 = 1/16 > 2.5%, task 2's is
    # always 0.4: the lower end is (0 + 0.4) / 2, above zero, so the claim holds.
    assert c["ci_low"] == pytest.approx(0.2) and c["ci_high"] == pytest.approx(0.7)
    assert c["n_examples"] == 6 and c["n_seeds"] == 1 and c["verdict"] == "held"
    assert set(c) >= {"claim", "estimate", "ci_low", "ci_high", "verdict"}
    assert stats.verdict(0.1, 0.3) == "held"
    assert stats.verdict(-0.3, 0.0) == "not held"
    assert stats.verdict(-0.1, 0.2) == "inconclusive"
    with pytest.raises(ValueError, match="equal shapes"):
        stats.claim("x", "accuracy", [np.zeros(3)], [np.zeros(4)])
