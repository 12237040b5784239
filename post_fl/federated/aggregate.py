"""Server-side aggregation of soft-prompt updates: validation, then a (robust) mean.

A client update is the *delta* ``P_client - P_global`` of its locally tuned prompt. Before
averaging, each update is validated (right shape, every entry finite, L2 norm at most a
configured bound); a bad update is rejected with a logged reason and the round goes on
with the rest. If fewer than ``min_clients`` valid updates remain, the round fails with
:class:`RoundFailedError`, naming the round and the counts.

Aggregators (:data:`AGGREGATIONS`):

* ``uniform``: the plain mean (the only one used under DP: DP clients do not reveal their size);
* ``fedavg``: weighted by the reported example counts, each weight capped at
  :data:`WEIGHT_CAP_FACTOR`-times the lower median of the reported counts, so one client that
  claims 1e12 examples weighs at most as much as a few typical clients (non-DP runs only);
* ``median``: the coordinate-wise median (Yin et al. 2018), robust to < 50 % bad updates;
* ``trimmed_mean``: per coordinate, drop the ``trim_fraction`` largest and smallest values and
  average the rest.

Sums run in float64 over updates sorted by client id, so the aggregate does not depend on
the order in which replies arrive.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

AGGREGATIONS = ("fedavg", "uniform", "median", "trimmed_mean")
# a fedavg weight is capped at this many times the lower median of the reported example counts
WEIGHT_CAP_FACTOR = 3.0


class RoundFailedError(RuntimeError):
    """Too few valid client updates arrived to aggregate a round."""


@dataclass
class ClientUpdate:
    """One client's prompt update (delta) and what it reported about it."""

    client_id: int
    delta: np.ndarray
    num_examples: int | None  # None: not reported (DP clients do not reveal their size)
    metrics: dict = field(default_factory=dict)


def update_norm(delta: np.ndarray) -> float:
    """L2 (Frobenius) norm of an update."""
    return float(np.linalg.norm(np.asarray(delta, dtype=np.float64).ravel()))


def validate_update(update: ClientUpdate, expected_shape: tuple[int, ...], max_norm: float = 0.0) -> str | None:
    """Why ``update`` must be rejected, or None when it is usable.

    Checks: the delta has ``expected_shape``; every entry is finite; its L2 norm is at most
    ``max_norm`` (0 or inf = no bound; a relative slack of 1e-5 covers float32 rounding of an
    update clipped to exactly the bound); ``num_examples``, when reported, is positive.
    """
    delta = update.delta
    if not isinstance(delta, np.ndarray):
        return f"update is a {type(delta).__name__}, not an array"
    if tuple(delta.shape) != tuple(expected_shape):
        return f"wrong shape {tuple(delta.shape)}, expected {tuple(expected_shape)}"
    if not np.issubdtype(delta.dtype, np.floating):
        return f"wrong dtype {delta.dtype}, expected a floating type"
    bad = int((~np.isfinite(delta)).sum())
    if bad:
        return f"{bad} non-finite value(s) (NaN/Inf)"
    if max_norm and math.isfinite(max_norm):
        norm = update_norm(delta)
        if norm > max_norm * (1 + 1e-5):
            return f"L2 norm {norm:.4g} above the bound {max_norm:.4g}"
    if update.num_examples is not None and update.num_examples <= 0:
        return f"num-examples is {update.num_examples}, expected > 0"
    return None


def filter_updates(updates: Sequence[ClientUpdate], expected_shape: tuple[int, ...], max_norm: float = 0.0,
                   server_round: int | None = None) -> tuple[list[ClientUpdate], dict[int, str]]:
    """Split updates into (valid, {client id: rejection reason}); each rejection is logged."""
    valid, rejected = [], {}
    for u in updates:
        reason = validate_update(u, expected_shape, max_norm)
        if reason is None:
            valid.append(u)
        else:
            rejected[u.client_id] = reason
            log.warning("round %s: rejected update of client %s: %s", server_round, u.client_id, reason)
    return valid, rejected


def require_min_clients(server_round: int, num_valid: int, num_sampled: int, min_clients: int,
                        num_rejected: int = 0, num_failed: int = 0, num_refused: int = 0) -> None:
    """Raise :class:`RoundFailedError` when fewer than ``min_clients`` valid updates arrived."""
    if num_valid < min_clients:
        refused = f", {num_refused} refused (privacy budget or site policy)" if num_refused else ""
        raise RoundFailedError(
            f"round {server_round} failed: {num_valid} valid update(s) from {num_sampled} sampled client(s) "
            f"({num_rejected} rejected, {num_failed} failed or missing{refused}), but at least {min_clients} are "
            "required (federated.min_clients)")


def weighted_mean(deltas: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """sum_i w_i * delta_i / sum_i w_i, accumulated in float64, returned as float32."""
    if not deltas:
        raise ValueError("cannot average zero updates")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights sum to {total}; expected > 0")
    acc = np.zeros(deltas[0].shape, dtype=np.float64)
    for d, w in zip(deltas, weights):
        acc += float(w) * np.asarray(d, dtype=np.float64)
    return (acc / total).astype(np.float32)


def capped_weights(counts: Sequence[int], factor: float = WEIGHT_CAP_FACTOR) -> list[float]:
    """FedAvg weights from self-reported example counts, each capped at ``factor`` x their lower median.

    The lower median (the smaller middle value for an even count) is what a minority of
    clients cannot move: with k honest clients and fewer than k liars it stays an honest count.
    """
    if not counts:
        return []
    ordered = sorted(float(c) for c in counts)
    cap = factor * ordered[(len(ordered) - 1) // 2]
    return [min(float(c), cap) for c in counts]


def coordinate_median(deltas: Sequence[np.ndarray]) -> np.ndarray:
    """The coordinate-wise median of updates (float64 inside, float32 out)."""
    if not deltas:
        raise ValueError("cannot aggregate zero updates")
    return np.median(np.stack([np.asarray(d, np.float64) for d in deltas]), axis=0).astype(np.float32)


def trimmed_mean(deltas: Sequence[np.ndarray], trim_fraction: float) -> np.ndarray:
    """Coordinate-wise trimmed mean: drop floor(trim_fraction * k) highest and lowest values per coordinate."""
    if not deltas:
        raise ValueError("cannot aggregate zero updates")
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim fraction must be in [0, 0.5), got {trim_fraction}")
    k = len(deltas)
    cut = int(math.floor(trim_fraction * k))
    stacked = np.sort(np.stack([np.asarray(d, np.float64) for d in deltas]), axis=0)
    return stacked[cut:k - cut].mean(axis=0).astype(np.float32)


def aggregate_updates(updates: Sequence[ClientUpdate], scheme: str = "fedavg",
                      trim_fraction: float = 0.1, weight_cap_factor: float = WEIGHT_CAP_FACTOR) -> np.ndarray:
    """Aggregate prompt updates with one of :data:`AGGREGATIONS` (see the module docstring)."""
    if scheme not in AGGREGATIONS:
        raise ValueError(f"aggregation {scheme!r} unknown; expected one of {AGGREGATIONS}")
    ordered = sorted(updates, key=lambda u: u.client_id)
    deltas = [u.delta for u in ordered]
    if scheme == "median":
        return coordinate_median(deltas)
    if scheme == "trimmed_mean":
        return trimmed_mean(deltas, trim_fraction)
    if scheme == "fedavg":
        if any(u.num_examples is None for u in ordered):
            raise ValueError("fedavg needs every client's num-examples; DP clients do not report it "
                             "(use uniform, median or trimmed_mean)")
        weights = capped_weights([u.num_examples for u in ordered], weight_cap_factor)
    else:
        weights = [1.0] * len(ordered)
    return weighted_mean(deltas, weights)


def sum_updates(updates: Sequence[ClientUpdate], shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Unweighted sum of updates in float64 (DP-FedAvg adds noise to this sum); zeros of ``shape`` if none."""
    ordered = sorted(updates, key=lambda u: u.client_id)
    if not ordered and shape is None:
        raise ValueError("sum of zero updates needs the shape")
    acc = np.zeros(ordered[0].delta.shape if ordered else shape, dtype=np.float64)
    for u in ordered:
        acc += np.asarray(u.delta, dtype=np.float64)
    return acc
