"""Tests for post_fl.privacy.audit: Clopper-Pearson ε lower bounds from membership inference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from post_fl.privacy.audit import AuditResult, audit_by_canaries, clopper_pearson_upper, epsilon_lower_bound_from_scores

DELTA = 1e-5


def test_clopper_pearson_upper_zero_successes_closed_form():
    n, level = 200, 0.025
    assert clopper_pearson_upper(0, n, level)[()] == pytest.approx(1 - level ** (1 / n))
    assert clopper_pearson_upper(n, n, level)[()] == 1.0


def test_separable_scores_give_positive_bound():
    res = epsilon_lower_bound_from_scores(np.ones(500), np.zeros(500), DELTA, 0.05)
    assert isinstance(res, AuditResult)
    assert res.epsilon_lower_bound > 0.5
    assert res.tpr == 1.0 and res.fpr == 0.0
    assert res.n_members == 500 and res.n_nonmembers == 500
    assert res.confidence == pytest.approx(0.95)
    assert 0.0 < res.threshold <= 1.0
    # the uncorrected (Jagielski/Nasr-style) maximum is at least as large
    res_none = epsilon_lower_bound_from_scores(np.ones(500), np.zeros(500), DELTA, 0.05, correction="none")
    assert res_none.epsilon_lower_bound >= res.epsilon_lower_bound


def test_identical_distributions_give_about_zero():
    for seed in range(5):
        rng = np.random.default_rng(seed)
        res = epsilon_lower_bound_from_scores(rng.normal(size=1000), rng.normal(size=1000), DELTA)
        assert 0.0 <= res.epsilon_lower_bound <= 0.1


def test_bound_nonnegative_and_grows_with_sample_size():
    rng = np.random.default_rng(0)
    for _ in range(20):
        m, n = rng.integers(1, 50, size=2)
        res = epsilon_lower_bound_from_scores(rng.normal(rng.normal(), 1, m), rng.normal(size=n), DELTA)
        assert res.epsilon_lower_bound >= 0.0
    # members scoring *lower* is no evidence for this attack
    assert epsilon_lower_bound_from_scores(np.zeros(100), np.ones(100), DELTA).epsilon_lower_bound == 0.0
    bounds = [
        epsilon_lower_bound_from_scores(rng.normal(3, 1, n), rng.normal(0, 1, n), DELTA).epsilon_lower_bound
        for n in (20, 100, 500, 2000)
    ]
    assert all(b2 >= b1 - 0.05 for b1, b2 in zip(bounds, bounds[1:])), bounds
    assert bounds[-1] > bounds[0]


def test_fixed_threshold():
    mem, non = np.r_[np.ones(90), np.zeros(10)], np.r_[np.zeros(95), np.ones(5)]
    res = epsilon_lower_bound_from_scores(mem, non, DELTA, threshold=0.5)
    assert res.threshold == 0.5 and res.tpr == pytest.approx(0.9) and res.fpr == pytest.approx(0.05)
    assert res.epsilon_lower_bound > 0.0
    assert res.to_dict()["threshold"] == 0.5


def _gaussian_mechanism_epsilon(sigma: float, delta: float) -> float:
    """Exact ε(δ) of the Gaussian mechanism with L2 sensitivity 1 (Balle & Wang 2018)."""

    def f(eps):
        return norm.cdf(0.5 / sigma - eps * sigma) - math.exp(eps) * norm.cdf(-0.5 / sigma - eps * sigma) - delta

    return brentq(f, 0.0, 100.0)


def _vector_canaries(k=20, dim=200, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(k, dim))
    return list(c / np.linalg.norm(c, axis=1, keepdims=True))


def _memorising_train_fn(sigma, seed=123):
    rng = np.random.default_rng(seed)
    dim = 200

    def train_fn(included):
        total = np.sum(included, axis=0) if included else np.zeros(dim)
        return total + sigma * rng.normal(size=dim)  # sum of canaries + Gaussian noise

    return train_fn


def _score(prompt, canary):
    return float(prompt @ canary)


def test_end_to_end_memorising_model_gives_positive_bound():
    res = audit_by_canaries(_memorising_train_fn(sigma=0.05), _score, _vector_canaries(), n_trials=30, delta=DELTA, seed=1)
    assert res.n_members + res.n_nonmembers == 30 * 20
    assert res.epsilon_lower_bound > 1.0


def test_end_to_end_data_independent_model_gives_about_zero():
    rng = np.random.default_rng(9)
    res = audit_by_canaries(
        lambda included: rng.normal(size=200), _score, _vector_canaries(), n_trials=30, delta=DELTA, seed=1
    )
    assert res.epsilon_lower_bound <= 0.1


def test_end_to_end_bound_does_not_exceed_true_epsilon_of_dp_mechanism():
    sigma = 1.0  # Gaussian mechanism on the sum, sensitivity 1 per canary
    true_eps = _gaussian_mechanism_epsilon(sigma, DELTA)
    res = audit_by_canaries(_memorising_train_fn(sigma), _score, _vector_canaries(), n_trials=100, delta=DELTA, seed=2)
    assert 0.0 < res.epsilon_lower_bound <= true_eps


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="empty"):
        epsilon_lower_bound_from_scores([], [0.0], DELTA)
    with pytest.raises(ValueError, match="empty"):
        epsilon_lower_bound_from_scores([1.0], [], DELTA)
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="delta"):
            epsilon_lower_bound_from_scores([1.0], [0.0], bad)
    with pytest.raises(ValueError, match="alpha"):
        epsilon_lower_bound_from_scores([1.0], [0.0], DELTA, alpha=0.0)
    with pytest.raises(ValueError, match="NaN"):
        epsilon_lower_bound_from_scores([float("nan")], [0.0], DELTA)
    with pytest.raises(ValueError, match="correction"):
        epsilon_lower_bound_from_scores([1.0], [0.0], DELTA, correction="holm")
    with pytest.raises(ValueError, match="canaries"):
        audit_by_canaries(lambda inc: 0, lambda p, c: 0.0, [], n_trials=3, delta=DELTA)
    with pytest.raises(ValueError, match="n_trials"):
        audit_by_canaries(lambda inc: 0, lambda p, c: 0.0, [1, 2], n_trials=0, delta=DELTA)
    with pytest.raises(ValueError, match="delta"):
        audit_by_canaries(lambda inc: 0, lambda p, c: 0.0, [1, 2], n_trials=3, delta=0.0)


# ---------------------------------------------------------------- power: the most an audit can show
def test_max_epsilon_lower_bound_closed_form_and_is_reached_by_a_perfect_attack():
    from post_fl.privacy.audit import max_epsilon_lower_bound

    n, alpha = 500, 0.05
    p = 1 - (alpha / 2) ** (1 / n)  # Clopper-Pearson upper bound for 0 of n, one threshold
    assert max_epsilon_lower_bound(n, n, DELTA, alpha) == pytest.approx(math.log((1 - DELTA - p) / p))
    # a perfect attack on these counts reaches the maximum, at its own number of thresholds (2 here)
    res = epsilon_lower_bound_from_scores(np.ones(n), np.zeros(n), DELTA, alpha)
    assert res.n_thresholds == 2
    assert res.epsilon_lower_bound == pytest.approx(res.max_epsilon_lower_bound)
    assert res.max_epsilon_lower_bound == pytest.approx(max_epsilon_lower_bound(n, n, DELTA, alpha, 2))
    # the figures: 32 + 32 observations cannot certify more than ~1.3 (Bonferroni, 64 thresholds)
    assert max_epsilon_lower_bound(32, 32, DELTA, alpha, 64) == pytest.approx(1.28, abs=0.01)
    assert max_epsilon_lower_bound(8, 8, DELTA, alpha, 16) == 0.0
    with pytest.raises(ValueError, match="member"):
        max_epsilon_lower_bound(0, 5, DELTA)


def test_every_result_reports_its_maximum_and_never_exceeds_it():
    rng = np.random.default_rng(3)
    for _ in range(10):
        m, k = rng.integers(5, 300, size=2)
        res = epsilon_lower_bound_from_scores(rng.normal(2, 1, m), rng.normal(0, 1, k), DELTA)
        assert 0.0 <= res.epsilon_lower_bound <= res.max_epsilon_lower_bound + 1e-12
        assert res.to_dict()["max_epsilon_lower_bound"] == res.max_epsilon_lower_bound


def test_observations_needed_to_detect_epsilon_8():
    from post_fl.privacy.audit import max_epsilon_lower_bound, observations_needed

    n = observations_needed(8.0, DELTA)
    assert max_epsilon_lower_bound(n, n, DELTA) >= 8.0 > max_epsilon_lower_bound(n - 1, n - 1, DELTA)
    assert 10_000 < n < 12_000
    assert observations_needed(8.0, DELTA, n_thresholds=100) > n  # a correction costs observations


def test_calibration_trials_fix_the_threshold_and_raise_the_power():
    canaries = _vector_canaries(k=40)
    plain = audit_by_canaries(_memorising_train_fn(sigma=0.05), _score, canaries, n_trials=40, delta=DELTA, seed=1)
    split = audit_by_canaries(_memorising_train_fn(sigma=0.05), _score, canaries, n_trials=44, delta=DELTA, seed=1,
                              calibration_trials=4)
    assert split.n_thresholds == 1 and split.n_members + split.n_nonmembers == 40 * 40
    assert split.max_epsilon_lower_bound > plain.max_epsilon_lower_bound
    assert split.epsilon_lower_bound > plain.epsilon_lower_bound > 1.0
    rng = np.random.default_rng(9)
    null = audit_by_canaries(lambda included: rng.normal(size=200), _score, canaries, n_trials=30, delta=DELTA,
                             seed=1, calibration_trials=5)
    assert null.epsilon_lower_bound <= 0.2
    with pytest.raises(ValueError, match="calibration_trials"):
        audit_by_canaries(lambda inc: 0, lambda p, c: 0.0, [1, 2], n_trials=3, delta=DELTA, calibration_trials=3)
