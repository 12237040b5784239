"""The delta of every (epsilon, delta) guarantee in post-fl: its default and the bound it must respect.

For a dataset of N records (examples at one site, or users in a federation) delta defaults to
``min(1e-5, 1 / (10 N))``. An explicit delta of 1/N or more is refused: such a delta admits a
mechanism that publishes one record in the clear with probability delta and still "satisfies"
(epsilon, delta)-DP, so the guarantee would be void.
"""

from __future__ import annotations

from ..core.config import ConfigError

DEFAULT_MAX_DELTA = 1e-5


def default_delta(n: int) -> float:
    """The default delta for a dataset of ``n`` records: ``min(1e-5, 1 / (10 n))``."""
    return min(DEFAULT_MAX_DELTA, 1.0 / (10.0 * max(int(n), 1)))


def check_delta(delta: float, n: int, key: str, what: str) -> float:
    """``delta`` if ``0 < delta < 1/n``, else :class:`ConfigError` naming ``key``, ``n`` (counted in ``what``)
    and the bound."""
    n = max(int(n), 1)
    if not delta > 0:
        raise ConfigError(f"{key}: expected > 0, got {delta}")
    if delta >= 1.0 / n:
        raise ConfigError(f"{key} = {delta:g} is >= 1/N = {1.0 / n:g} (N = {n} {what}): such a delta lets a "
                          f"mechanism publish a record in the clear; use delta < 1/N, e.g. 0 for the default "
                          f"min(1e-5, 1/(10 N)) = {default_delta(n):g}")
    return float(delta)


def resolve(delta: float | None, n: int, key: str, what: str) -> float:
    """``delta`` when set (> 0, checked by :func:`check_delta`), else :func:`default_delta` of ``n``."""
    if delta is None or delta == 0:
        return default_delta(n)
    return check_delta(delta, n, key, what)
