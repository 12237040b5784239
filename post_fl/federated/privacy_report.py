"""What a federated run reports about privacy: each client's sample-level epsilon (from the ledgers
where the server can read them), user-level epsilon against the world and against the server, the
privacy section of ``results.json`` and its printed lines, each saying against whom it holds."""

from __future__ import annotations

import math
from pathlib import Path

from ..core.config import RunConfig, TuneConfig
from ..privacy.randomness import NOT_PRIVATE_LABEL
from .config import FederatedConfig

USER_AGAINST_WORLD = ("everyone who sees the released prompts or results but not whom the server sampled: "
                      "amplified by the server's Poisson sampling of clients at rate fraction_train")
USER_AGAINST_SERVER = {
    "distributed": ("the server, which drew the client sample and sees who replied: no amplification (every round "
                    "with anyone's update in the sum counted as if the user took part, rate 1), charged with only "
                    "the noise the server cannot remove, the surviving clients' shares (sigma sqrt(k/m) in a round "
                    "with k < min_clients of them); assumes at least min_clients honest shares per round"),
    "server": ("none: the server adds the noise itself and sees the un-noised sum (or every update) first, so "
               "user-level DP gives nothing against it (epsilon_against_server = inf)"),
}


def user_epsilon_against_world(fed: FederatedConfig, sigma: float, rounds: int) -> float:
    """User-level epsilon of ``rounds`` DP-FedAvg rounds at noise multiplier ``sigma`` against everyone who sees
    the released prompts but not the server's client sample: the sampled Gaussian at rate ``fraction_train``
    (RDP accountant); inf when user-level DP is off."""
    if not fed.user_dp:
        return math.inf
    from ..privacy.user_dp import user_level_epsilon

    return user_level_epsilon(sigma, fed.fraction_train, rounds, fed.resolved_user_delta)


def user_epsilon_against_server(fed: FederatedConfig, sigma: float, contributors: list[int]) -> float:
    """User-level epsilon against the server, which drew the client sample and sees who replied, of the rounds
    whose sums held ``contributors[r]`` clients' updates: no amplification (every round with anyone's update
    in the sum counts as if the user took part, rate 1), charged with only the noise the server cannot remove,
    i.e. the surviving distributed shares (sigma for rounds with >= min_clients of them, sigma sqrt(k/m) for
    k < m). inf in server-noise mode (the server adds the noise itself) and when user-level DP is off."""
    if not fed.user_dp or fed.user_noise_mode != "distributed":
        return math.inf
    from ..privacy.user_dp import effective_noise_multiplier, user_level_epsilon_of_history

    per_sigma: dict[float, int] = {}
    for k in contributors:
        if k >= 1:  # a round with nobody's update in it costs nobody anything
            s = effective_noise_multiplier(sigma, k, fed.min_clients)
            per_sigma[s] = per_sigma.get(s, 0) + 1
    return user_level_epsilon_of_history([(s, 1.0, n) for s, n in sorted(per_sigma.items())],
                                         fed.resolved_user_delta)


def client_privacy(clients: dict[int, dict], ledger_dir: Path, tune: TuneConfig) -> dict[int, dict]:
    """Per client that trained (``clients``: its rounds): epsilon/delta from its ledger in ``ledger_dir`` where
    this machine can read it (simulation); otherwise only the rounds it replied in (a deployed site's epsilon
    stays in its own ledger)."""
    from ..privacy.ledger import read_ledgers

    ledgers = read_ledgers(ledger_dir, tune.accountant) if tune.private else {}
    out: dict[int, dict] = {}
    for c in sorted(set(clients) | set(ledgers)):
        rec = dict(clients.get(c, {}))
        if c in ledgers:
            rec.update(ledgers[c])
        elif not tune.private:
            rec.update({"epsilon": math.inf, "delta": 0.0})
        out[c] = rec
    return out


def user_level_section(fed: FederatedConfig, sigma: float, rounds: int, short_rounds: int, eps_world: float,
                       eps_server: float) -> dict:
    """The user-level part of the privacy section: both epsilons, against whom each holds, the mechanism."""
    mode = fed.user_noise_mode
    return {"epsilon_against_world": eps_world,
            "epsilon_against_server": eps_server,
            "against_world": USER_AGAINST_WORLD,
            "against_server": USER_AGAINST_SERVER[mode],
            "target_epsilon": (fed.user_dp_target_epsilon if fed.user_dp_noise_multiplier <= 0 else None),
            "target_judged_against": fed.user_epsilon_against,
            "delta": fed.resolved_user_delta,
            "noise_multiplier": sigma, "clip": fed.user_dp_clip,
            "sample_rate": fed.fraction_train, "rounds": rounds,
            "noise": mode, "trusts_server": mode == "server",
            "rounds_with_fewer_than_min_clients_shares": short_rounds,
            "unit": "user-level (DP-FedAvg, Opacus RDP accountant)" + (
                "; the server sees the exact sum (or each update) before noising: trusts the server"
                if mode == "server" else "; noise added by the clients before SecAgg+ masking")}


def privacy_section(run_cfg: RunConfig, fed: FederatedConfig, per_client: dict[int, dict],
                    refusals: dict[int, dict], user: dict | None, aggregation: str, max_norm: float) -> dict:
    """The privacy section of results.json: per-client sample-level epsilon (every client that trained,
    rejected ones included; from the ledgers where readable), refusals, user-level epsilon and who is
    trusted for it (``user``, from :func:`user_level_section`), and the NOT-PRIVATE label of insecure or
    non-DP runs."""
    tune = run_cfg.tune
    eps = {str(c): float(r["epsilon"]) for c, r in per_client.items() if "epsilon" in r}
    source = ("not private (tune.dp off): clients report sizes and losses" if not tune.private else
              "each client's own privacy ledger, read by the simulation harness" if eps else
              "each site's own privacy ledger (a deployed site's epsilon never reaches the server)")
    sample = {"dp": tune.private, "target_epsilon": tune.target_epsilon, "epsilon_per_client": eps,
              "max_epsilon": max(eps.values(), default=0.0 if tune.private else math.inf),
              "delta_per_client": {str(c): r.get("delta") for c, r in per_client.items() if "delta" in r},
              "rounds_per_client": {str(c): r.get("rounds") for c, r in per_client.items()},
              "rejected_rounds_per_client": {str(c): r["rejected_rounds"] for c, r in per_client.items()
                                             if r.get("rejected_rounds")},
              "refused": {str(c): v for c, v in sorted(refusals.items())},
              "source": source,
              "unit": "example-level, composed over every round the client's data was ever used in "
                      "(its ledger), at the client's delta"}
    out = {"sample_level": sample, "user_level": user, "secure_aggregation": fed.secagg,
           "aggregation": aggregation, "max_update_norm": max_norm}
    if run_cfg.insecure_reproducible:
        out["not_private"] = NOT_PRIVATE_LABEL
    elif not tune.private:
        out["not_private"] = "NOT PRIVATE at sample level: tune.dp is off (clients report sizes and losses)"
    return out


def privacy_lines(privacy: dict) -> list[str]:
    """The privacy of a federated run's results, one printed line per guarantee, each saying against whom."""
    sample = privacy["sample_level"]
    lines = []
    if sample["dp"]:
        eps = sample["epsilon_per_client"]
        lines.append("privacy (example level, each site's own ledger; holds against the server and everyone "
                     "else): " + (f"max epsilon {sample['max_epsilon']:.4g} over {len(eps)} clients" if eps else
                                  "each site's epsilon stays with the site"))
    user = privacy.get("user_level")
    if user:
        lines.append(f"privacy (user level, delta {user['delta']:.3g}): epsilon {user['epsilon_against_world']:.4g} "
                     f"against the world (amplified by the server's client sampling), "
                     f"{user['epsilon_against_server']:.4g} against the server"
                     + (" (none: the server adds the noise)" if user["noise"] == "server" else "")
                     + f"; the target is judged against the {user['target_judged_against']}")
    if "not_private" in privacy:
        lines.append(f"privacy: {privacy['not_private']}")
    return lines
