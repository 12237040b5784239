"""Configuration of a federated run: :class:`FederatedConfig`, its flat (Flower run config) form,
the aggregation rule it resolves to, seed derivation and DP-FedAvg's noise multiplier.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.config import ConfigError, RunConfig, config_from_dict, unflatten
from ..core.data import PARTITION_SCHEMES
from .aggregate import AGGREGATIONS



# ---------------------------------------------------------------- configuration
@dataclass
class FederatedConfig:
    """Settings of the federation: rounds, client sampling, data split, aggregation, privacy, checkpoints.

    ``fraction_train`` of ``num_clients`` clients are sampled each round (at least
    ``min_clients``); a round with fewer than ``min_clients`` valid updates fails (not under
    user-level DP, whose rounds always release). ``aggregation``: ``auto`` (= ``uniform`` when
    DP-SGD is on -- DP clients do not reveal their example counts -- else ``fedavg``),
    ``uniform``, ``fedavg`` (weights capped at ``weight_cap_factor`` x the lower median of the
    reported counts; non-DP runs only), ``median`` (coordinate-wise) or ``trimmed_mean``
    (``trim_fraction`` cut at each end per coordinate). Clients clip their update to
    ``max_update_norm`` and the server rejects larger ones; 0 = derived as
    ``max_update_norm_factor`` x the L2 norm of the initial prompt, inf = no bound.
    ``user_dp`` switches on DP-FedAvg: Poisson client sampling at rate ``fraction_train``,
    clipping to ``user_dp_clip``, Gaussian noise with multiplier ``user_dp_noise_multiplier``
    (0 = calibrated to ``user_dp_target_epsilon`` over ``rounds``) at ``user_dp_delta``
    (0 = min(1e-5, 1/(10 num_clients))). ``user_dp_noise`` says who adds that noise:
    ``distributed`` (each client adds a share of variance sigma^2 C^2 / min_clients before
    SecAgg+ masking; the default under ``secagg``) or ``server`` (after aggregation: the server
    sees the un-noised sum or the individual updates, so the guarantee trusts the server; the
    only option without ``secagg``). ``secagg`` aggregates with Flower's SecAgg+: the server then
    sees only the sum of the clients that completed the protocol.

    Two user-level epsilons are reported: against the world (amplified by the server's Poisson
    sampling at ``fraction_train``) and against the server (which knows whom it sampled and sees who
    replied, so no amplification; only the noise it cannot remove: the surviving distributed shares;
    none in ``server`` noise mode). ``user_dp_epsilon_against`` says which one
    ``user_dp_target_epsilon`` is met for when sigma is calibrated: ``server`` (calibrated at
    sampling rate 1) or ``world``; "" = ``server`` under distributed noise, ``world`` under server
    noise (where nothing holds against the server).
    """

    # the defaults of `post-fl federate`, `python -m simulation.run` and `flwr run .`: 20 users of the embedded
    # movie reviews (about 384 each), half of them per round, 4 rounds (sized for about 20 min on 2 idle cores
    # with a cached student, with FEDERATED_RUN_DEFAULTS; docs/federated.md#time-and-recipe)
    rounds: int = 4
    num_clients: int = 20
    fraction_train: float = 0.5
    min_clients: int = 2
    partitioning: str = "iid"
    dirichlet_alpha: float = 0.5
    classes_per_client: int = 1
    min_partition_size: int = 2  # every client gets at least this many private examples (else refused up front)
    aggregation: str = "auto"
    trim_fraction: float = 0.1
    weight_cap_factor: float = 3.0
    max_update_norm: float = 0.0  # 0 = max_update_norm_factor x |initial prompt|; inf = no bound
    max_update_norm_factor: float = 5.0
    user_dp: bool = False
    user_dp_clip: float = 1.0
    user_dp_noise_multiplier: float = 0.0
    user_dp_target_epsilon: float = 8.0
    user_dp_delta: float = 0.0
    user_dp_noise: str = ""  # "" = distributed under secagg, else server
    user_dp_epsilon_against: str = ""  # "" = server under distributed noise, else world
    secagg: bool = False
    secagg_num_shares: int = 3
    secagg_reconstruction_threshold: int = 2
    secagg_quantization_range: int = 4194304
    eval_every: int = 1
    checkpoint_dir: str = ""  # "" = <output_dir>/checkpoint
    resume: bool = True
    client_cache_dir: str = ""  # where clients keep the student; "" = system temp dir
    timeout: float = 0.0  # seconds to wait for client replies; 0 = no limit

    def validate(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"federated.rounds: expected >= 1, got {self.rounds}")
        if self.num_clients < 1:
            raise ConfigError(f"federated.num_clients: expected >= 1, got {self.num_clients}")
        if not 0 < self.fraction_train <= 1:
            raise ConfigError(f"federated.fraction_train: expected in (0, 1], got {self.fraction_train}")
        if not 1 <= self.min_clients <= self.num_clients:
            raise ConfigError(f"federated.min_clients: expected in 1..num_clients ({self.num_clients}), "
                              f"got {self.min_clients}")
        if self.partitioning not in PARTITION_SCHEMES:
            raise ConfigError(f"federated.partitioning: expected one of {PARTITION_SCHEMES}, got {self.partitioning!r}")
        if self.dirichlet_alpha <= 0:
            raise ConfigError(f"federated.dirichlet_alpha: expected > 0, got {self.dirichlet_alpha}")
        if self.classes_per_client < 1:
            raise ConfigError(f"federated.classes_per_client: expected >= 1, got {self.classes_per_client}")
        if self.min_partition_size < 1:
            raise ConfigError(f"federated.min_partition_size: expected >= 1, got {self.min_partition_size}")
        if self.aggregation not in ("auto", *AGGREGATIONS):
            raise ConfigError(f"federated.aggregation: expected one of {('auto', *AGGREGATIONS)}, "
                              f"got {self.aggregation!r}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"federated.trim_fraction: expected in [0, 0.5), got {self.trim_fraction}")
        if not self.weight_cap_factor >= 1:
            raise ConfigError(f"federated.weight_cap_factor: expected >= 1, got {self.weight_cap_factor}")
        if not self.max_update_norm >= 0:
            raise ConfigError(f"federated.max_update_norm: expected >= 0 (0 = derived, inf = no bound), "
                              f"got {self.max_update_norm}")
        if not (self.max_update_norm_factor > 0 and math.isfinite(self.max_update_norm_factor)):
            raise ConfigError(f"federated.max_update_norm_factor: expected a finite number > 0, "
                              f"got {self.max_update_norm_factor}")
        if self.user_dp_clip <= 0:
            raise ConfigError(f"federated.user_dp_clip: expected > 0, got {self.user_dp_clip}")
        if self.user_dp_noise_multiplier < 0:
            raise ConfigError(f"federated.user_dp_noise_multiplier: expected >= 0, got {self.user_dp_noise_multiplier}")
        if self.user_dp_target_epsilon <= 0:
            raise ConfigError(f"federated.user_dp_target_epsilon: expected > 0, got {self.user_dp_target_epsilon}")
        if not 0 <= self.user_dp_delta < 1:
            raise ConfigError(f"federated.user_dp_delta: expected in [0, 1), got {self.user_dp_delta}")
        if self.user_dp_noise not in ("", "distributed", "server"):
            raise ConfigError(f"federated.user_dp_noise: expected distributed, server or empty (= distributed "
                              f"under secagg, else server), got {self.user_dp_noise!r}")
        if self.user_dp_epsilon_against not in ("", "server", "world"):
            raise ConfigError(f"federated.user_dp_epsilon_against: expected server, world or empty (= server "
                              f"under distributed noise, else world), got {self.user_dp_epsilon_against!r}")
        if self.user_dp and self.user_dp_epsilon_against == "server" and self.user_noise_mode == "server":
            raise ConfigError("federated.user_dp_epsilon_against = server: with user_dp_noise = server the server "
                              "adds the noise itself, so no user-level epsilon holds against it; use distributed "
                              "noise (federated.secagg = true) or user_dp_epsilon_against = world")
        if self.user_dp_noise == "distributed" and not self.secagg:
            raise ConfigError("federated.user_dp_noise = distributed needs federated.secagg = true (without "
                              "secure aggregation the server sees every update; use server)")
        if self.user_dp and self.aggregation not in ("auto", "uniform"):
            raise ConfigError(f"federated.aggregation = {self.aggregation}: user-level DP (DP-FedAvg) releases "
                              "the noised uniform sum; use auto or uniform")
        if self.secagg and self.aggregation not in ("auto", "uniform"):
            raise ConfigError(f"federated.aggregation = {self.aggregation}: SecAgg+ reveals only the uniform "
                              "sum; use auto or uniform")
        if self.secagg and math.isinf(self.max_update_norm) and not self.user_dp:
            raise ConfigError("federated.secagg: needs a finite client-side clipping bound; set "
                              "federated.max_update_norm (0 = derived) or federated.user_dp = true")
        if self.eval_every < 1:
            raise ConfigError(f"federated.eval_every: expected >= 1, got {self.eval_every}")
        if self.timeout < 0:
            raise ConfigError(f"federated.timeout: expected >= 0, got {self.timeout}")

    @property
    def clients_per_round(self) -> int:
        """Clients sampled per round without user-level DP: max(min_clients, ceil(fraction * N))."""
        return min(self.num_clients, max(self.min_clients, math.ceil(self.fraction_train * self.num_clients)))

    @property
    def user_noise_mode(self) -> str:
        """Who adds the DP-FedAvg noise: ``distributed`` (clients, before SecAgg+) or ``server``; "" without user DP."""
        if not self.user_dp:
            return ""
        return self.user_dp_noise or ("distributed" if self.secagg else "server")

    @property
    def user_epsilon_against(self) -> str:
        """Whom ``user_dp_target_epsilon`` is met against: ``server`` (default under distributed noise) or
        ``world`` (default under server noise); "" without user DP."""
        if not self.user_dp:
            return ""
        return self.user_dp_epsilon_against or ("server" if self.user_noise_mode == "distributed" else "world")

    @property
    def resolved_user_delta(self) -> float:
        """User-level delta: ``user_dp_delta`` or min(1e-5, 1/(10 N)); refuses delta >= 1/N."""
        from ..privacy.user_dp import resolve_user_delta

        return resolve_user_delta(self.user_dp_delta, self.num_clients)


def resolve_aggregation(fed_cfg: FederatedConfig, run_cfg: RunConfig) -> str:
    """The aggregator a run uses: ``auto`` is ``uniform`` under DP-SGD or user DP, else ``fedavg``.

    ``fedavg`` with DP-SGD on is refused: it needs each client's example count, which a DP
    client does not reveal (the count is not covered by the guarantee).
    """
    if fed_cfg.aggregation == "auto":
        return "uniform" if (run_cfg.tune.private or fed_cfg.user_dp or fed_cfg.secagg) else "fedavg"
    if fed_cfg.aggregation == "fedavg" and run_cfg.tune.private:
        raise ConfigError("federated.aggregation = fedavg: DP clients do not reveal their example counts "
                          "(they are not covered by the guarantee); use auto, uniform, median or trimmed_mean")
    return fed_cfg.aggregation


# Where a federated run's defaults differ from the single-site job's (RunConfig), and why: the federated job
# (post-fl federate, simulation.run, flwr run .) is sized for <= 20 min on 2 idle cores with a cached student
# (docs/federated.md#time-and-recipe). build_configs puts them under whatever the run-config sets.
FEDERATED_RUN_DEFAULTS: dict[str, Any] = {
    "tune.epochs": 1.0,  # local epochs of a sampled user's part per round (single site: 3 epochs, once)
    "tune.batch_size": 64,  # 6 local steps a round on a user's ~384 examples (single site: 256)
    "tune.optimizer": "sgd",  # a fresh Adam state per round releases mostly the sign of the DP noise
    "tune.lr": 4.0,  # SGD's rate (single site: Adam at 0.04)
    "transfer.steps": 50,  # single site: 200; the held-out loss picks the step either way
}


def build_configs(run_config: dict[str, Any]) -> tuple[RunConfig, FederatedConfig]:
    """Typed (RunConfig, FederatedConfig) from Flower's flat run-config (``"tune.lr"``, ``"federated.rounds"``);
    a key it leaves out takes :data:`FEDERATED_RUN_DEFAULTS`, else the typed default."""
    flat = {**FEDERATED_RUN_DEFAULTS, **run_config}
    words = flat.pop("model.label_words", None)
    if isinstance(words, str):  # Flower run-config has no tables: "positive:good,great;negative:bad"
        flat.update({f"model.label_words.{k}": v for k, v in parse_label_words(words).items()})
    elif words is not None:
        flat["model.label_words"] = words
    nested = unflatten(flat)
    fed = nested.pop("federated", {})
    if not isinstance(fed, dict):
        raise ConfigError("federated: expected a section of federated.* settings")
    try:
        fed_cfg = config_from_dict(fed, FederatedConfig)
    except ConfigError as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith("federated.") else f"federated: {msg}") from None
    run_cfg = config_from_dict(nested)
    resolve_aggregation(fed_cfg, run_cfg)  # refuses fedavg under DP-SGD
    return run_cfg, fed_cfg


def parse_label_words(text: str) -> dict[str, list[str]]:
    """``"positive:good,great;negative:bad"`` -> {"positive": ["good", "great"], "negative": ["bad"]}."""
    out: dict[str, list[str]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        label, sep, words = part.partition(":")
        ws = [w.strip() for w in words.split(",") if w.strip()]
        if not sep or not label.strip() or not ws:
            raise ConfigError(f"model.label_words: expected 'label:word[,word];label:word', got {text!r}")
        out[label.strip()] = ws
    return out


def flatten_configs(run_cfg: RunConfig, fed_cfg: FederatedConfig) -> dict[str, Any]:
    """The inverse of :func:`build_configs`: flat ``section.key`` values (label words as nested keys)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, list):
            flat[prefix] = value[0] if len(value) == 1 else ",".join(value)
        else:
            flat[prefix] = str(value) if isinstance(value, float) and not math.isfinite(value) else value

    walk("", run_cfg.to_dict())
    walk("federated", dataclasses.asdict(fed_cfg))
    return flat


def derive_seed(*parts: int) -> int:
    """A 31-bit seed derived from integers (base seed, round, client id, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)



_USER_SIGMAS: dict[tuple, float] = {}


def user_noise_multiplier(fed_cfg: FederatedConfig) -> float:
    """DP-FedAvg's noise multiplier: ``user_dp_noise_multiplier`` or calibrated to the user-level target over
    ``rounds``, against the server (sampling rate 1: the server knows whom it sampled) or against the world
    (rate ``fraction_train``), as ``user_epsilon_against`` says (memoised). Server and clients compute it
    the same way."""
    if fed_cfg.user_dp_noise_multiplier > 0:
        return float(fed_cfg.user_dp_noise_multiplier)
    rate = 1.0 if fed_cfg.user_epsilon_against == "server" else fed_cfg.fraction_train
    key = (fed_cfg.user_dp_target_epsilon, fed_cfg.resolved_user_delta, rate, fed_cfg.rounds)
    if key not in _USER_SIGMAS:
        from ..privacy.user_dp import calibrate_user_noise

        _USER_SIGMAS[key] = float(calibrate_user_noise(*key))
    return _USER_SIGMAS[key]

