"""User-level differential privacy for federated prompt tuning (DP-FedAvg, McMahan et al. 2018).

Each round, clients are sampled independently with probability q (Poisson sampling); each
sampled client's prompt update is clipped to L2 norm ``C``; the server adds Gaussian noise
of standard deviation ``sigma * C`` to the *sum* of the clipped updates and divides by the
*expected* number of clients ``q * N`` (the fixed-denominator estimator, whose sensitivity
to adding or removing one user is exactly ``C / (q N)``). One round is one sampled Gaussian
mechanism, so the rounds compose in an RDP accountant (Opacus ``RDPAccountant``) with
history ``(sigma, q, rounds)``, giving the user-level (epsilon, delta).

This composes with, and is separate from, the sample-level DP-SGD each client runs.
"""

from __future__ import annotations

import math

import numpy as np


def clip_update(delta: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float]:
    """Scale ``delta`` to L2 norm at most ``clip_norm``; returns (clipped float32 update, original norm)."""
    d = np.asarray(delta, dtype=np.float64)
    norm = float(np.linalg.norm(d.ravel()))
    if clip_norm <= 0:
        raise ValueError(f"clip norm must be > 0, got {clip_norm}")
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return (d * scale).astype(np.float32), norm


def noised_mean(update_sum: np.ndarray, clip_norm: float, noise_multiplier: float, expected_clients: float,
                seed: int) -> np.ndarray:
    """DP-FedAvg release: (sum of clipped updates + N(0, (sigma C)^2 I)) / expected number of clients."""
    if expected_clients <= 0:
        raise ValueError(f"expected number of clients must be > 0, got {expected_clients}")
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, noise_multiplier * clip_norm, size=np.shape(update_sum))
    return ((np.asarray(update_sum, dtype=np.float64) + noise) / expected_clients).astype(np.float32)


def user_level_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """User-level epsilon at ``delta`` after ``rounds`` DP-FedAvg rounds (RDP accountant)."""
    from opacus.accountants import RDPAccountant

    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    acc = RDPAccountant()
    acc.history = [(float(noise_multiplier), float(sample_rate), int(rounds))]
    return float(acc.get_epsilon(delta=delta))


def calibrate_user_noise(target_epsilon: float, delta: float, sample_rate: float, rounds: int) -> float:
    """Smallest noise multiplier such that ``rounds`` DP-FedAvg rounds at rate q spend <= target epsilon."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=rounds, accountant="rdp"))


def poisson_sample(client_ids: list[int], sample_rate: float, seed: int) -> list[int]:
    """Each client independently with probability ``sample_rate`` (seeded; ids sorted first)."""
    rng = np.random.default_rng(seed)
    ids = sorted(client_ids)
    keep = rng.random(len(ids)) < sample_rate
    return [c for c, k in zip(ids, keep) if k]
