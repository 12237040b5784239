"""DP-SGD accounting: how many steps a tuning call takes, its sampling rate, the noise multiplier that
meets a target epsilon, and the epsilon a history of (noise multiplier, sample rate, steps) has spent.

The accountant's *history* is plain data, kept apart from the optimiser as in Opacus: a federated
client carries it from round to round in its ledger (:mod:`post_fl.privacy.ledger`), so epsilon
composes over every step its data was ever used in, not over one call.

delta: :func:`resolve_delta` defaults to ``min(1e-5, 1/(10 N))`` and refuses ``delta >= 1/N``
(N = the examples of the dataset being protected; :mod:`post_fl.privacy.delta`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings

from ..core.config import TuneConfig
from .delta import resolve


@contextlib.contextmanager
def quiet_accountant():
    """Opacus' RDP accountant without its "Optimal order is the largest/smallest alpha" warning.

    The accountant takes the best of a fixed grid of Renyi orders; when the best is at the grid's edge
    (much noise, or a very large epsilon) it warns that more orders could give a *tighter* bound. The
    epsilon it returns is still a valid upper bound, so the guarantee (and the noise calibrated against
    it) stands; no setting of post-fl changes the grid, so the warning tells a user nothing to act on.
    Every post-fl call into the accountant (calibration and epsilon, DP-SGD and DP-FedAvg) goes through here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Optimal order is the (largest|smallest) alpha",
                                category=UserWarning)
        yield


def resolve_delta(cfg: TuneConfig, n_examples: int) -> float:
    """The example-level delta for ``n_examples`` private examples.

    ``cfg.delta`` when set (it must be < 1/N: :class:`ConfigError` naming ``tune.delta``
    otherwise), else ``min(1e-5, 1/(10 N))``, so a client with 1-3 examples never reports
    delta = 1/N.
    """
    return resolve(cfg.delta, n_examples, "tune.delta", "private examples")


def planned_steps(cfg: TuneConfig, n_examples: int) -> int:
    """Number of optimiser steps that ``cfg.epochs`` epochs take (expected batches per epoch = N / batch)."""
    return max(1, math.ceil(cfg.epochs * n_examples / cfg.batch_size))


def sample_rate(cfg: TuneConfig, n_examples: int) -> float:
    """Poisson sampling rate q = 1 / (batches per epoch), about batch_size / N, as Opacus sets it."""
    return 1.0 / math.ceil(n_examples / min(cfg.batch_size, n_examples))


def calibrate_noise_multiplier(cfg: TuneConfig, n_examples: int, total_steps: int) -> float:
    """Smallest noise multiplier such that ``total_steps`` DP-SGD steps at rate q spend <= target epsilon."""
    return _noise_multiplier(cfg.target_epsilon, resolve_delta(cfg, n_examples), sample_rate(cfg, n_examples),
                             total_steps, cfg.accountant)


@functools.lru_cache(maxsize=256)
def _noise_multiplier(target_epsilon: float, delta: float, q: float, steps: int, accountant: str) -> float:
    """Opacus' binary search for sigma (seconds per call), memoised: many clients share the same inputs."""
    from opacus.accountants.utils import get_noise_multiplier

    with quiet_accountant():
        return get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=q, steps=steps,
                                    accountant=accountant)


def epsilon_from_history(history: list, delta: float, accountant: str = "rdp") -> float:
    """Epsilon spent by a DP-SGD history of (noise multiplier, sample rate, steps) at ``delta``.

    Composition does not depend on the order of the mechanisms, so entries with the same
    (noise multiplier, sample rate) are merged by adding their steps (exact for the RDP and PRV
    accountants) and the result is memoised: a federation's clients of equal size share
    histories, and a client's ledger asks for its epsilon several times a round.
    """
    if not history:
        return 0.0
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in history:
        key = (float(sigma), float(q))
        merged[key] = merged.get(key, 0) + int(steps)
    return _epsilon_of(tuple(sorted((s, q, n) for (s, q), n in merged.items())), float(delta), accountant)


@functools.lru_cache(maxsize=4096)
def _epsilon_of(history: tuple, delta: float, accountant: str) -> float:
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = list(history)
    with quiet_accountant():
        return float(acc.get_epsilon(delta=delta))
