"""Server-side aggregation of soft-prompt updates: validation, then (weighted) FedAvg.

A client update is the *delta* ``P_client - P_global`` of its locally tuned prompt. Before
averaging, each update is validated (right shape, every entry finite, L2 norm at most a
configured bound); a bad update is rejected with a logged reason and the round goes on
with the rest. If fewer than ``min_clients`` valid updates remain, the round fails with
:class:`RoundFailedError`, naming the round and the counts.

Sums run in float64 over updates sorted by client id, so the aggregate does not depend on
the order in which replies arrive (which makes resumed runs bit-identical).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

AGGREGATIONS = ("fedavg", "uniform")


class RoundFailedError(RuntimeError):
    """Too few valid client updates arrived to aggregate a round."""


@dataclass
class ClientUpdate:
    """One client's prompt update (delta) and what it reported about it."""

    client_id: int
    delta: np.ndarray
    num_examples: int
    metrics: dict = field(default_factory=dict)


def update_norm(delta: np.ndarray) -> float:
    """L2 (Frobenius) norm of an update."""
    return float(np.linalg.norm(np.asarray(delta, dtype=np.float64).ravel()))


def validate_update(update: ClientUpdate, expected_shape: tuple[int, ...], max_norm: float = 0.0) -> str | None:
    """Why ``update`` must be rejected, or None when it is usable.

    Checks: the delta has ``expected_shape``; every entry is finite; its L2 norm is at most
    ``max_norm`` (0 or inf = no bound); ``num_examples`` is positive.
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
        if norm > max_norm:
            return f"L2 norm {norm:.4g} above the bound {max_norm:.4g}"
    if update.num_examples <= 0:
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
                        num_rejected: int = 0, num_failed: int = 0) -> None:
    """Raise :class:`RoundFailedError` when fewer than ``min_clients`` valid updates arrived."""
    if num_valid < min_clients:
        raise RoundFailedError(
            f"round {server_round} failed: {num_valid} valid update(s) from {num_sampled} sampled client(s) "
            f"({num_rejected} rejected, {num_failed} failed or missing), but at least {min_clients} are "
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


def aggregate_updates(updates: Sequence[ClientUpdate], scheme: str = "fedavg") -> np.ndarray:
    """FedAvg of prompt updates: weighted by num-examples (``fedavg``) or equal weights (``uniform``)."""
    if scheme not in AGGREGATIONS:
        raise ValueError(f"aggregation {scheme!r} unknown; expected one of {AGGREGATIONS}")
    ordered = sorted(updates, key=lambda u: u.client_id)
    weights = [u.num_examples if scheme == "fedavg" else 1.0 for u in ordered]
    return weighted_mean([u.delta for u in ordered], weights)


def sum_updates(updates: Sequence[ClientUpdate]) -> np.ndarray:
    """Unweighted sum of updates in float64 (DP-FedAvg adds noise to this sum)."""
    ordered = sorted(updates, key=lambda u: u.client_id)
    acc = np.zeros(ordered[0].delta.shape, dtype=np.float64)
    for u in ordered:
        acc += np.asarray(u.delta, dtype=np.float64)
    return acc
