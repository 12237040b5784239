"""Membership-inference privacy audit: an empirical LOWER bound on ε.

An (ε, δ)-DP training algorithm bounds every membership-inference attack:
for any decision rule, ``TPR ≤ e^ε · FPR + δ`` and ``TNR ≤ e^ε · FNR + δ``,
i.e. (Kairouz et al. 2015; Jagielski et al. 2020, "Auditing Differentially
Private Machine Learning"; Nasr et al. 2021, "Adversary Instantiation")::

    ε ≥ max( log((1 − δ − FPR) / FNR),  log((1 − δ − FNR) / FPR) )

An audit runs the attack on many independent training runs and replaces FPR
and FNR by Clopper-Pearson upper confidence bounds, so that (with probability
≥ 1 − α over the audit's randomness) the reported value is a valid lower bound
on the ε the mechanism actually satisfies.  If it exceeds the claimed ε, the
DP implementation is broken; if it is far below, the analysis may be loose (or
the attack weak — an audit can only ever show a lower bound).

The module is built on callables so it works with any trainer:
:func:`audit_by_canaries` draws canary inclusion at random, calls
``train_fn`` / ``score_fn``, and hands the scores to the statistical core
:func:`epsilon_lower_bound_from_scores`.  Depends on numpy and scipy only.

Power. With ``n`` member and ``n`` non-member observations the bound cannot exceed the value
for a perfect attack (TPR = 1, FPR = 0), where both Clopper-Pearson upper bounds are
``1 − level^(1/n)`` ≈ ``ln(1/level) / n``: the maximum is about ``ln(n / ln(1/level))``
(:func:`max_epsilon_lower_bound`). Certifying ε = 8 at 95 % confidence with one fixed threshold
takes 11,000 observations of each kind (:func:`observations_needed`); 32 + 32 observations
cap the bound at 2.1 with one fixed threshold and at 1.3 with Bonferroni over 64 thresholds. Every :class:`AuditResult` carries
that cap (``max_epsilon_lower_bound``) so a small bound is never read as evidence of privacy when
the audit could not have shown more. :func:`audit_by_canaries` can spend its first
``calibration_trials`` on choosing the threshold, so that the rest are tested at one fixed
threshold (no multiple-comparison correction, hence more power).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import beta as _beta

__all__ = [
    "AuditResult",
    "clopper_pearson_upper",
    "epsilon_lower_bound_from_scores",
    "audit_by_canaries",
    "max_epsilon_lower_bound",
    "observations_needed",
]


@dataclass(frozen=True)
class AuditResult:
    """Outcome of a threshold membership-inference audit.

    Attributes:
        epsilon_lower_bound: empirical ε lower bound (≥ 0) at confidence ``confidence``.
        tpr: empirical true-positive rate of the best threshold attack.
        fpr: empirical false-positive rate of the best threshold attack.
        threshold: score threshold of the best attack (predict "member" iff score ≥ threshold);
            ``inf`` if no threshold gives a positive bound.
        n_members: number of member (included-canary) observations.
        n_nonmembers: number of non-member observations.
        confidence: 1 − α, the confidence of the Clopper-Pearson bounds.
        delta: the δ used in the conversion.
        max_epsilon_lower_bound: the largest bound these observation counts could have given
            (a perfect attack, the same confidence and threshold correction); the audit's power.
        n_thresholds: thresholds the confidence level was shared between (1 = one fixed threshold).
    """

    epsilon_lower_bound: float
    tpr: float
    fpr: float
    threshold: float
    n_members: int
    n_nonmembers: int
    confidence: float
    delta: float = 0.0
    max_epsilon_lower_bound: float = math.nan
    n_thresholds: int = 1

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-friendly; ``inf`` thresholds become ``None``)."""
        d = asdict(self)
        if not math.isfinite(d["threshold"]):
            d["threshold"] = None
        return d


def _check_delta_alpha(delta: float, alpha: float) -> None:
    if not (isinstance(delta, (int, float)) and 0.0 < float(delta) < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if not (isinstance(alpha, (int, float)) and 0.0 < float(alpha) < 1.0):
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")


def clopper_pearson_upper(k: np.ndarray | int, n: int, level: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound on a binomial proportion.

    Returns ``p_hi`` with ``P[p ≤ p_hi] ≥ 1 − level`` for ``k`` successes out of
    ``n`` trials: ``p_hi = BetaInv(1 − level; k + 1, n − k)``, and 1 when ``k = n``.
    """
    k = np.asarray(k, dtype=np.float64)
    if n <= 0:
        raise ValueError("n must be positive")
    out = np.ones_like(k)
    m = k < n
    out[m] = _beta.ppf(1.0 - level, k[m] + 1.0, n - k[m])
    return out


def _epsilon_from_rates(fpr_hi: np.ndarray, fnr_hi: np.ndarray, delta: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(1.0 - delta - fpr_hi > 0, np.log(np.maximum(1.0 - delta - fpr_hi, 1e-300) / fnr_hi), -np.inf)
        b = np.where(1.0 - delta - fnr_hi > 0, np.log(np.maximum(1.0 - delta - fnr_hi, 1e-300) / fpr_hi), -np.inf)
    return np.maximum(a, b)


def max_epsilon_lower_bound(n_members: int, n_nonmembers: int, delta: float, alpha: float = 0.05,
                            n_thresholds: int = 1) -> float:
    """The largest ε lower bound a threshold audit with these observation counts can report.

    That of a perfect attack (no false positives, no false negatives), with the Clopper-Pearson
    level ``alpha / 2 / n_thresholds`` of :func:`epsilon_lower_bound_from_scores`. An audit whose
    maximum is below the claimed ε cannot detect a violation of that claim, whatever it measures.
    """
    _check_delta_alpha(delta, alpha)
    if n_members < 1 or n_nonmembers < 1 or n_thresholds < 1:
        raise ValueError(f"need >= 1 member, non-member and threshold, got {n_members}, {n_nonmembers}, "
                         f"{n_thresholds}")
    level = alpha / 2.0 / int(n_thresholds)
    fnr_hi = clopper_pearson_upper(np.asarray([0]), int(n_members), level)
    fpr_hi = clopper_pearson_upper(np.asarray([0]), int(n_nonmembers), level)
    return max(0.0, float(_epsilon_from_rates(fpr_hi, fnr_hi, float(delta))[0]))


def observations_needed(target_epsilon: float, delta: float, alpha: float = 0.05, n_thresholds: int = 1) -> int:
    """Smallest n such that n members and n non-members let a perfect attack certify ``target_epsilon``."""
    _check_delta_alpha(delta, alpha)
    if not target_epsilon > 0 or not math.isfinite(target_epsilon):
        raise ValueError(f"target_epsilon must be finite and > 0, got {target_epsilon}")
    lo, hi = 1, 2
    while max_epsilon_lower_bound(hi, hi, delta, alpha, n_thresholds) < target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1 << 40:
            raise ValueError(f"epsilon {target_epsilon} cannot be certified at delta {delta}")
    while lo < hi:
        mid = (lo + hi) // 2
        if max_epsilon_lower_bound(mid, mid, delta, alpha, n_thresholds) >= target_epsilon:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _as_scores(x: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name} is empty: need at least one score")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite scores")
    return a


def epsilon_lower_bound_from_scores(
    member_scores: Sequence[float] | np.ndarray,
    nonmember_scores: Sequence[float] | np.ndarray,
    delta: float,
    alpha: float = 0.05,
    *,
    threshold: float | None = None,
    correction: str = "bonferroni",
) -> AuditResult:
    """Empirical ε lower bound from membership scores (higher score = "member").

    For every threshold ``t`` (all observed scores; the attack says "member" iff
    ``score ≥ t``) compute FPR and FNR, replace each by its one-sided
    Clopper-Pearson upper bound at level α/2 (so both hold jointly with
    probability ≥ 1 − α by a union bound) and take::

        ε_lb(t) = max( log((1 − δ − FPR_hi) / FNR_hi),  log((1 − δ − FNR_hi) / FPR_hi) )

    The result is ``max(0, max_t ε_lb(t))`` (Jagielski et al. 2020; Nasr et al. 2021).

    Threshold selection: picking the best of many thresholds on the same scores
    that feed the confidence intervals (the practice in those papers,
    ``correction="none"``) makes the 1 − α confidence only nominal — with
    identical member/non-member distributions it can report spurious ε ≈ 0.5
    from a tail threshold.  The default ``correction="bonferroni"`` divides the
    level by the number of thresholds tried, which keeps the bound valid at
    1 − α (slightly conservative); alternatively fix ``threshold`` from a
    separate calibration run (then no correction is needed).  The CP
    intervals assume independent observations (e.g. one canary per training
    run, or independent canaries).

    Args:
        member_scores: attack scores of members (canaries included in training).
        nonmember_scores: attack scores of non-members.
        delta: the δ of the (ε, δ)-DP claim being audited, in (0, 1).
        alpha: 1 − confidence, in (0, 1).
        threshold: evaluate only this threshold instead of maximising.
        correction: ``"bonferroni"`` (default; valid over the max) or ``"none"``
            (the uncorrected max of Jagielski et al. / Nasr et al.).
    Returns:
        :class:`AuditResult`.
    Raises:
        ValueError: on empty/non-finite scores, δ or α outside (0, 1), an unknown correction.
    """
    _check_delta_alpha(delta, alpha)
    if correction not in ("none", "bonferroni"):
        raise ValueError(f"correction must be 'none' or 'bonferroni', got {correction!r}")
    mem = np.sort(_as_scores(member_scores, "member_scores"))
    non = np.sort(_as_scores(nonmember_scores, "nonmember_scores"))
    n_m, n_n = mem.size, non.size

    if threshold is not None:
        thresholds = np.asarray([float(threshold)])
    else:
        thresholds = np.unique(np.concatenate([mem, non]))
    level = alpha / 2.0
    if correction == "bonferroni":
        level /= thresholds.size
    # counts of scores >= t
    tp = n_m - np.searchsorted(mem, thresholds, side="left")
    fp = n_n - np.searchsorted(non, thresholds, side="left")
    fn = n_m - tp
    fpr_hi = clopper_pearson_upper(fp, n_n, level)
    fnr_hi = clopper_pearson_upper(fn, n_m, level)
    eps = _epsilon_from_rates(fpr_hi, fnr_hi, float(delta))
    n_thr = int(thresholds.size) if correction == "bonferroni" else 1
    i = int(np.argmax(eps))
    best = float(eps[i])
    if best > 0.0:
        thr, tpr, fpr = float(thresholds[i]), tp[i] / n_m, fp[i] / n_n
        eps_lb = best
    else:  # no informative threshold: report the trivial attack
        thr, tpr, fpr, eps_lb = math.inf, 0.0, 0.0, 0.0
    return AuditResult(
        epsilon_lower_bound=float(eps_lb),
        tpr=float(tpr),
        fpr=float(fpr),
        threshold=thr,
        n_members=int(n_m),
        n_nonmembers=int(n_n),
        confidence=1.0 - float(alpha),
        delta=float(delta),
        max_epsilon_lower_bound=max_epsilon_lower_bound(n_m, n_n, delta, alpha, n_thr),
        n_thresholds=n_thr,
    )


def audit_by_canaries(
    train_fn: Callable[[list[Any]], Any],
    score_fn: Callable[[Any, Any], float],
    canaries: Sequence[Any],
    n_trials: int,
    delta: float,
    alpha: float = 0.05,
    seed: int = 0,
    *,
    correction: str = "bonferroni",
    include_prob: float = 0.5,
    calibration_trials: int = 0,
) -> AuditResult:
    """Canary membership-inference audit of a training procedure (e.g. DP soft-prompt tuning).

    In each of ``n_trials`` independent trials every canary is included
    independently with probability ``include_prob`` (1/2; seeded by ``seed``),
    ``prompt = train_fn(included_canaries)`` trains a fresh model/prompt (it must
    accept an empty list and use fresh randomness per call), and every canary
    gets a membership score ``score_fn(prompt, canary)`` (higher = more likely
    member, e.g. negative loss).  Scores of included canaries are member
    observations, the others non-member observations; the ε lower bound is then
    :func:`epsilon_lower_bound_from_scores` (threshold attack, Clopper-Pearson
    at confidence 1 − α).

    Using several canaries per run treats their scores as independent, as is
    common in practice; for a textbook-rigorous audit use one canary per run
    (or the one-run analysis of Steinke, Nasr, Jagielski 2023).

    With ``calibration_trials > 0`` the first that many trials only choose the
    threshold (the best uncorrected one on their scores); the other
    ``n_trials − calibration_trials`` are tested at that one threshold, so no
    correction is needed and the bound's maximum (``max_epsilon_lower_bound``)
    is higher for the same number of trials.

    Returns:
        :class:`AuditResult`; ``n_members + n_nonmembers`` = (``n_trials`` −
        ``calibration_trials``) · ``len(canaries)``.
    Raises:
        ValueError: on no canaries, ``n_trials < 1``, δ/α outside (0, 1), or if
            the random draws produced no members or no non-members.
    """
    _check_delta_alpha(delta, alpha)
    canaries = list(canaries)
    if not canaries:
        raise ValueError("canaries is empty: need at least one canary")
    if int(n_trials) != n_trials or n_trials < 1:
        raise ValueError(f"n_trials must be a positive integer, got {n_trials!r}")
    if not 0.0 < include_prob < 1.0:
        raise ValueError(f"include_prob must be in (0, 1), got {include_prob!r}")
    if int(calibration_trials) != calibration_trials or not 0 <= calibration_trials < n_trials:
        raise ValueError(f"calibration_trials must be an integer in [0, n_trials), got {calibration_trials!r}")
    rng = np.random.default_rng(seed)
    obs: list[tuple[list[float], list[float]]] = [([], []), ([], [])]  # (calibration, test) x (members, non)
    for trial in range(int(n_trials)):
        mask = rng.random(len(canaries)) < include_prob
        included = [c for c, m in zip(canaries, mask) if m]
        prompt = train_fn(included)
        members, nonmembers = obs[0] if trial < calibration_trials else obs[1]
        for c, m in zip(canaries, mask):
            s = float(score_fn(prompt, c))
            (members if m else nonmembers).append(s)
    for name, (members, nonmembers) in zip(("calibration", "test"), obs):
        if (name == "test" or calibration_trials) and (not members or not nonmembers):
            raise ValueError(
                f"audit drew {len(members)} member and {len(nonmembers)} non-member {name} observations; "
                "increase n_trials or the number of canaries"
            )
    members, nonmembers = obs[1]
    if calibration_trials:
        chosen = epsilon_lower_bound_from_scores(obs[0][0], obs[0][1], delta, alpha, correction="none")
        threshold = chosen.threshold if math.isfinite(chosen.threshold) else float(np.median(obs[0][0]))
        return epsilon_lower_bound_from_scores(members, nonmembers, delta, alpha, threshold=threshold,
                                               correction="none")
    return epsilon_lower_bound_from_scores(members, nonmembers, delta, alpha, correction=correction)
