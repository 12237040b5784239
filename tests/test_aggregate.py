"""Update validation, FedAvg and DP-FedAvg pieces (no models, no Flower)."""

import logging
import math

import numpy as np
import pytest

from post_fl.federated.aggregate import (ClientUpdate, RoundFailedError, aggregate_updates, capped_weights,
                                         coordinate_median, filter_updates, require_min_clients, trimmed_mean,
                                         validate_update, weighted_mean)
from post_fl.privacy.randomness import dp_numpy_rng
from post_fl.privacy.user_dp import calibrate_user_noise, clip_update, noised_mean, poisson_sample, user_level_epsilon

SHAPE = (4, 8)


def upd(cid, value=0.1, n=10, shape=SHAPE):
    return ClientUpdate(cid, np.full(shape, value, dtype=np.float32), n)


def test_validate_accepts_good_and_names_each_problem():
    assert validate_update(upd(0), SHAPE, max_norm=10.0) is None
    assert "wrong shape" in validate_update(upd(1, shape=(3, 8)), SHAPE)
    bad = upd(2)
    bad.delta[0, 0] = np.nan
    bad.delta[1, 1] = np.inf
    assert "2 non-finite" in validate_update(bad, SHAPE)
    assert "above the bound" in validate_update(upd(3, value=5.0), SHAPE, max_norm=1.0)
    assert validate_update(upd(3, value=5.0), SHAPE, max_norm=0.0) is None  # 0 = no bound
    assert "num-examples" in validate_update(upd(4, n=0), SHAPE)
    assert validate_update(upd(5, n=None), SHAPE) is None  # DP clients do not report their size


def test_filter_logs_rejections_and_keeps_the_rest(caplog):
    ups = [upd(0), upd(1, shape=(2, 2)), upd(2, value=100.0), upd(3)]
    with caplog.at_level(logging.WARNING, logger="post_fl.federated.aggregate"):
        valid, rejected = filter_updates(ups, SHAPE, max_norm=10.0, server_round=7)
    assert [u.client_id for u in valid] == [0, 3]
    assert set(rejected) == {1, 2}
    assert "round 7: rejected update of client 1: wrong shape" in caplog.text
    assert "client 2: L2 norm" in caplog.text


def test_fedavg_weights_by_examples_and_ignores_order():
    a, b = upd(0, 1.0, n=1), upd(1, 4.0, n=3)
    np.testing.assert_allclose(aggregate_updates([a, b], "fedavg"), 3.25)
    np.testing.assert_allclose(aggregate_updates([a, b], "uniform"), 2.5)
    rng = np.random.default_rng(0)
    ups = [ClientUpdate(i, rng.normal(size=SHAPE).astype(np.float32), i + 1) for i in range(7)]
    assert np.array_equal(aggregate_updates(ups), aggregate_updates(ups[::-1]))
    with pytest.raises(ValueError, match="unknown"):
        aggregate_updates(ups, "krum")
    with pytest.raises(ValueError, match="num-examples"):
        aggregate_updates([upd(0, n=None), upd(1)], "fedavg")
    with pytest.raises(ValueError):
        weighted_mean([], [])


def test_fedavg_weight_of_a_liar_is_capped():
    """One client claiming 1e12 examples weighs at most 3x the lower median count, not 1e12."""
    honest = [upd(i, 0.0, n=10) for i in range(4)]
    liar = upd(9, 1.0, n=10**12)
    assert capped_weights([10, 10, 10, 10, 10**12], 3.0) == [10, 10, 10, 10, 30]
    assert capped_weights([10, 10**12], 3.0) == [10, 30]  # lower median: the liar cannot set it
    mean = aggregate_updates(honest + [liar], "fedavg", weight_cap_factor=3.0)
    np.testing.assert_allclose(mean, 30 / 70, rtol=1e-6)  # uncapped it would be ~1.0
    np.testing.assert_allclose(aggregate_updates(honest + [liar], "fedavg", weight_cap_factor=1e15), 1.0, atol=1e-9)


def test_median_and_trimmed_mean_resist_one_outlier():
    ups = [upd(i, v) for i, v in enumerate([0.1, 0.2, 0.3, 0.4, 1e6])]
    np.testing.assert_allclose(aggregate_updates(ups, "median"), 0.3, rtol=1e-6)
    np.testing.assert_allclose(aggregate_updates(ups, "trimmed_mean", trim_fraction=0.2), 0.3, rtol=1e-6)
    assert float(aggregate_updates(ups, "uniform").mean()) > 1e5  # the plain mean is taken over
    # per coordinate: the median of each entry, not of whole updates
    d = [np.array([[0.0, 5.0]], np.float32), np.array([[1.0, 6.0]], np.float32), np.array([[9.0, -1.0]], np.float32)]
    np.testing.assert_allclose(coordinate_median(d), [[1.0, 5.0]])
    np.testing.assert_allclose(trimmed_mean(d, 0.0), [[10 / 3, 10 / 3]], rtol=1e-6)
    with pytest.raises(ValueError, match="trim fraction"):
        trimmed_mean(d, 0.5)


def test_min_clients_failure_names_round_and_counts():
    require_min_clients(3, 2, 5, 2)
    with pytest.raises(RoundFailedError, match=r"round 4 failed: 1 valid update\(s\) from 5 sampled.*2 rejected.*"
                                               r"2 failed.*at least 3"):
        require_min_clients(4, 1, 5, 3, num_rejected=2, num_failed=2)


def test_clip_and_noised_mean():
    d = np.full(SHAPE, 1.0, np.float32)
    c, norm = clip_update(d, 2.0)
    assert math.isclose(norm, math.sqrt(d.size)) and math.isclose(float(np.linalg.norm(c)), 2.0, rel_tol=1e-6)
    small, _ = clip_update(d * 1e-3, 2.0)
    np.testing.assert_array_equal(small, d * 1e-3)
    s = np.ones(SHAPE)
    np.testing.assert_allclose(noised_mean(s, 1.0, 0.0, 4.0, dp_numpy_rng()), 0.25)  # no noise: sum / q N
    n1, n2 = noised_mean(s, 1.0, 1.0, 4.0, dp_numpy_rng()), noised_mean(s, 1.0, 1.0, 4.0, dp_numpy_rng())
    assert not np.array_equal(n1, n2) and not np.allclose(n1, 0.25)  # fresh noise every release


def test_user_level_accounting():
    e1 = user_level_epsilon(1.0, 0.1, 10, 1e-3)
    e2 = user_level_epsilon(1.0, 0.1, 20, 1e-3)
    assert 0 < e1 < e2
    assert user_level_epsilon(1.0, 0.1, 0, 1e-3) == 0.0
    sigma = calibrate_user_noise(4.0, 1e-3, 0.1, 10)
    assert user_level_epsilon(sigma, 0.1, 10, 1e-3) <= 4.0 + 1e-3
    picked = poisson_sample(list(range(1000)), 0.1, dp_numpy_rng(7, 1))
    assert picked == poisson_sample(list(range(1000))[::-1], 0.1, dp_numpy_rng(7, 1))  # insecure mode repeats
    assert 60 < len(picked) < 140
