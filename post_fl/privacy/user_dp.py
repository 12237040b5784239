"""User-level differential privacy for federated prompt tuning (DP-FedAvg, McMahan et al. 2018).

Each round, clients are sampled independently with probability q (Poisson sampling); each
sampled client's prompt update is clipped to L2 norm ``C``; the server adds Gaussian noise
of standard deviation ``sigma * C`` to the *sum* of the clipped updates and divides by the
*expected* number of clients ``q * N`` (the fixed-denominator estimator, whose sensitivity
to adding or removing one user is exactly ``C / (q N)``). One round is one sampled Gaussian
mechanism, so the rounds compose in an RDP accountant (Opacus ``RDPAccountant``) with
history ``(sigma, q, rounds)``, giving the user-level (epsilon, delta).

This composes with, and is separate from, the sample-level DP-SGD each client runs.

Against whom (:func:`user_level_epsilon` / :func:`user_level_epsilon_of_history`)
--------------------------------------------------------------------------------
The Poisson sample is drawn by the server, and the server sees who replied (SecAgg+ reveals the
participants too), so privacy amplification by sampling holds only against those who see the
released prompts and not the sample: **epsilon against the world** is the sampled Gaussian at rate
q. **Epsilon against the server** counts every round in which anyone's update was in the sum as if
the user took part (rate 1), charged with the noise the server cannot remove: the surviving
clients' shares in distributed mode (:func:`effective_noise_multiplier`); in server mode the server
adds the noise itself and sees the sum (or each update) before it, so nothing holds against it
(epsilon = inf). Both come from Opacus' RDP accountant.

Randomness: the Gaussian noise, the noise shares and the Poisson client sample take a
``numpy.random.Generator`` from :func:`post_fl.privacy.randomness.dp_numpy_rng` (fresh OS entropy on the
party that adds the noise); passing a plain seed is refused. delta: :func:`resolve_user_delta`
(default ``min(1e-5, 1/(10 N))`` for N clients; ``delta >= 1/N`` refused).

Distributed DP under secure aggregation (:func:`noise_share`)
------------------------------------------------------------
With SecAgg the server only learns the *sum* of the masked client vectors, so it cannot add
the noise itself without first seeing the exact sum. Instead each sampled client adds its
own Gaussian share ``N(0, sigma^2 C^2 / m I)`` to its clipped update before masking, where
``m`` (``num_shares_min``) is the smallest number of clients whose shares the released sum is
guaranteed to contain. Independent Gaussians add, so a sum over ``k`` surviving clients holds
noise of variance ``k sigma^2 C^2 / m``:

* ``k >= m`` survivors: variance ``>= sigma^2 C^2``, i.e. at least the central mechanism's
  noise. The accountant is charged with ``sigma`` (more noise only helps: the Gaussian
  mechanism with a larger standard deviation is post-processing of the one with ``sigma C``
  plus independent noise), so the reported epsilon holds; utility is a little worse than
  central DP by the factor ``k / m``.
* ``k < m`` survivors (more dropouts than planned): the sum holds only ``k/m`` of the
  variance (effective multiplier ``sigma * sqrt(k / m)``). The server
  (:meth:`post_fl.federated.FederatedServer.complete_round`) then tops the noise up to
  ``sigma^2 C^2`` from its own OS entropy before releasing, so the release keeps the charged
  ``sigma`` against everyone *but the server*, which could subtract its own top-up; the epsilon
  against the server charges that round at ``sigma * sqrt(k / m)``. Setting ``m`` to the SecAgg
  reconstruction threshold makes this case rare (SecAgg cannot unmask with fewer survivors anyway).
* A dropped client's share is lost with its update (SecAgg+ removes its masks); the shares of
  the survivors alone carry the noise, which is why ``m`` counts survivors, not sampled clients.
* A client's own share does not protect that client against itself, and ``m - 1`` colluding
  clients who reveal their shares to the server lower the noise the server cannot subtract to
  ``(k - m + 1) / m`` of the target: the guarantee against the server assumes honest shares
  from at least ``m`` clients (the same trust SecAgg's threshold already makes).
"""

from __future__ import annotations

import math

import numpy as np

from ..core.config import ConfigError
from .accounting import quiet_accountant
from .delta import resolve



def _check_rng(rng, where: str) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{where}: rng must be a numpy.random.Generator from post_fl.privacy.randomness.dp_numpy_rng "
                        f"(fresh OS entropy), got {type(rng).__name__}; a plain seed would let whoever knows it "
                        f"subtract the noise")
    return rng


def resolve_user_delta(delta: float, num_clients: int) -> float:
    """The user-level delta for ``num_clients`` users.

    ``delta`` when > 0 (it must be < 1/N: :class:`ConfigError` naming ``federated.user_dp_delta``,
    N and the bound otherwise), else the default ``min(1e-5, 1/(10 N))``.
    """
    n = int(num_clients)
    if n < 1:
        raise ConfigError(f"federated.num_clients: expected >= 1, got {num_clients}")
    return resolve(delta, n, "federated.user_dp_delta", "clients")


def clip_update(delta: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float]:
    """Scale ``delta`` to L2 norm at most ``clip_norm``; returns (clipped float32 update, original norm)."""
    d = np.asarray(delta, dtype=np.float64)
    norm = float(np.linalg.norm(d.ravel()))
    if clip_norm <= 0:
        raise ValueError(f"clip norm must be > 0, got {clip_norm}")
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return (d * scale).astype(np.float32), norm


def noised_mean(update_sum: np.ndarray, clip_norm: float, noise_multiplier: float, expected_clients: float,
                rng: np.random.Generator) -> np.ndarray:
    """DP-FedAvg release (central noise): ``(sum of clipped updates + N(0, (sigma C)^2 I)) / (q N)``.

    ``update_sum`` is the sum of updates each already clipped to ``clip_norm`` C
    (:func:`clip_update`); ``expected_clients`` is q N, the fixed denominator, so adding or
    removing one user moves the result by at most C / (q N) and the released noise has standard
    deviation sigma C / (q N) per coordinate. ``rng`` comes from
    :func:`post_fl.privacy.randomness.dp_numpy_rng` on the party that adds the noise.
    """
    _check_rng(rng, "noised_mean")
    if expected_clients <= 0:
        raise ValueError(f"expected number of clients must be > 0, got {expected_clients}")
    if clip_norm <= 0 or noise_multiplier < 0:
        raise ValueError(f"clip norm must be > 0 and noise multiplier >= 0, got {clip_norm}, {noise_multiplier}")
    noise = rng.normal(0.0, noise_multiplier * clip_norm, size=np.shape(update_sum))
    return ((np.asarray(update_sum, dtype=np.float64) + noise) / expected_clients).astype(np.float32)


def noise_share(shape, clip_norm: float, noise_multiplier: float, num_shares_min: int,
                rng: np.random.Generator) -> np.ndarray:
    """One client's share of distributed DP noise: ``N(0, sigma^2 C^2 / m I)`` of the given shape.

    Each sampled client adds this to its clipped update before SecAgg masking; a sum over at
    least ``m = num_shares_min`` surviving clients then holds Gaussian noise of variance
    ``>= sigma^2 C^2`` (see the module docstring for dropouts). ``rng`` comes from
    :func:`post_fl.privacy.randomness.dp_numpy_rng` on the client.
    """
    _check_rng(rng, "noise_share")
    if int(num_shares_min) != num_shares_min or num_shares_min < 1:
        raise ValueError(f"num_shares_min must be a positive integer, got {num_shares_min!r}")
    if clip_norm <= 0 or noise_multiplier < 0:
        raise ValueError(f"clip norm must be > 0 and noise multiplier >= 0, got {clip_norm}, {noise_multiplier}")
    std = noise_multiplier * clip_norm / math.sqrt(int(num_shares_min))
    return rng.normal(0.0, std, size=shape).astype(np.float32)


def effective_noise_multiplier(noise_multiplier: float, survivors: int, num_shares_min: int) -> float:
    """The noise multiplier a distributed-DP sum of ``survivors`` shares actually carries.

    ``sigma * sqrt(min(k, m) / m)``: sigma when at least ``m`` shares survive (the extra noise of
    more shares is not credited), less when fewer do; charge the accountant with this value.
    """
    if survivors < 0 or num_shares_min < 1:
        raise ValueError(f"survivors must be >= 0 and num_shares_min >= 1, got {survivors}, {num_shares_min}")
    return float(noise_multiplier) * math.sqrt(min(int(survivors), int(num_shares_min)) / int(num_shares_min))


def user_level_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """User-level epsilon at ``delta`` after ``rounds`` DP-FedAvg rounds (RDP accountant)."""
    from opacus.accountants import RDPAccountant

    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    acc = RDPAccountant()
    acc.history = [(float(noise_multiplier), float(sample_rate), int(rounds))]
    with quiet_accountant():
        return float(acc.get_epsilon(delta=delta))


def user_level_epsilon_of_history(history: list[tuple[float, float, int]], delta: float) -> float:
    """User-level epsilon at ``delta`` of rounds with differing noise: ``history`` of (noise multiplier,
    sample rate, rounds), composed by Opacus' RDP accountant; inf if a round with anyone in it had no noise."""
    from opacus.accountants import RDPAccountant

    hist = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not hist:
        return 0.0
    if any(s <= 0 for s, _, _ in hist):
        return math.inf
    acc = RDPAccountant()
    acc.history = hist
    with quiet_accountant():
        return float(acc.get_epsilon(delta=delta))


def calibrate_user_noise(target_epsilon: float, delta: float, sample_rate: float, rounds: int) -> float:
    """Smallest noise multiplier such that ``rounds`` DP-FedAvg rounds at rate q spend <= target epsilon."""
    from opacus.accountants.utils import get_noise_multiplier

    with quiet_accountant():
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=rounds, accountant="rdp"))


def poisson_sample(client_ids: list[int], sample_rate: float, rng: np.random.Generator) -> list[int]:
    """Poisson client sampling: each client independently with probability ``sample_rate`` q.

    This is the subsampling the user-level accountant assumes (rate q per round); ``rng``
    comes from :func:`post_fl.privacy.randomness.dp_numpy_rng` on the server (the sample must not be
    predictable from a config seed, or the amplification by sampling is void). Ids are sorted
    first, so the result does not depend on their order.
    """
    _check_rng(rng, "poisson_sample")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
    ids = sorted(client_ids)
    keep = rng.random(len(ids)) < sample_rate
    return [c for c, k in zip(ids, keep) if k]
