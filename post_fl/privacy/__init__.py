"""Privacy: accounting, the delta policy, where DP randomness comes from, a site's ledger, user-level DP,
the RAPT baseline's local mechanisms and the canary audit. What each guarantee means: docs/privacy.md.

* ``accounting`` -- DP-SGD steps and sampling rate, noise calibration, epsilon of a history;
* ``delta`` -- the default delta ``min(1e-5, 1/(10 N))`` and the bound ``delta < 1/N``;
* ``randomness`` -- fresh OS entropy for every mechanism, the labelled insecure (seeded) mode;
* ``ledger`` -- a site's persistent, file-locked privacy ledger and budget;
* ``user_dp`` -- DP-FedAvg: clipping, noise, distributed noise shares, user-level epsilon;
* ``rapt`` -- RAPT's d_chi token privatiser and randomised response (a baseline);
* ``audit`` -- a canary membership-inference lower bound on epsilon.

Uses :mod:`post_fl.core` only. Names are imported on first use (:mod:`post_fl.core.exports`).
"""

from ..core.exports import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "accounting": ("resolve_delta", "planned_steps", "sample_rate", "calibrate_noise_multiplier",
                   "epsilon_from_history"),
    "delta": ("default_delta", "check_delta"),
    "randomness": ("NOT_PRIVATE_LABEL", "fresh_seed", "dp_torch_generator", "dp_numpy_rng"),
    "ledger": ("PrivacyLedger", "BudgetExhausted", "read_ledgers", "dataset_sha256", "default_site_ledger_dir"),
    "user_dp": ("clip_update", "noised_mean", "noise_share", "poisson_sample", "user_level_epsilon",
                "calibrate_user_noise", "resolve_user_delta"),
    "rapt": ("privatize_token_ids", "per_token_epsilon", "randomized_response", "ReconstructionHead",
             "reconstruction_loss"),
    "audit": ("AuditResult", "audit_by_canaries", "epsilon_lower_bound_from_scores", "max_epsilon_lower_bound",
              "observations_needed"),
})
