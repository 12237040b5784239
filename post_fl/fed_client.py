"""One federated client: its private partition or site file, its privacy ledger and budget, and its
round of DP-SGD prompt tuning (:func:`train_client`); refusals and their reply status.

DP-SGD noise and Poisson batches come from fresh OS entropy (:mod:`post_fl.randomness`) unless the
run is ``insecure_reproducible``, where the client derives the seed itself (:func:`insecure_seed_for`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ConfigError, RunConfig
from .data import TextDataset, partition
from .models import ScoringModel
from .prompt import SoftPrompt
from .fed_protocol import BUDGET_EXHAUSTED, LEDGER_DIR_NAME
from .fed_config import FederatedConfig, derive_seed, user_noise_multiplier


# ---------------------------------------------------------------- client side
_PARTITIONS: dict[str, list[TextDataset]] = {}  # process-wide: the private split, read once per process


def _load_task(run_cfg: RunConfig):
    """(train, test, public, label words) via ``post_fl.pipeline.load_task`` (files or the embedded task)."""
    from .pipeline import load_task

    task = load_task(run_cfg)
    return task.train, task.test, task.public, dict(task.label_words)


def client_partition(run_cfg: RunConfig, fed_cfg: FederatedConfig, partition_id: int,
                     num_partitions: int | None = None) -> TextDataset:
    """This client's private training partition (the split is computed once per process)."""
    n = num_partitions or fed_cfg.num_clients
    if n != fed_cfg.num_clients:
        raise ConfigError(f"federated.num_clients is {fed_cfg.num_clients} but the federation has {n} "
                          "partitions (num-partitions / num-supernodes); make them equal")
    if not 0 <= partition_id < n:
        raise ValueError(f"partition id {partition_id} outside 0..{n - 1}")
    key = json.dumps([dataclasses.asdict(run_cfg.data), run_cfg.seed, n, fed_cfg.partitioning,
                      fed_cfg.dirichlet_alpha, fed_cfg.classes_per_client, fed_cfg.min_partition_size], sort_keys=True,
                     default=str)
    if key not in _PARTITIONS:
        train = _load_task(run_cfg)[0]
        _PARTITIONS[key] = partition(train, n, fed_cfg.partitioning, fed_cfg.dirichlet_alpha,
                                     fed_cfg.classes_per_client, run_cfg.seed, fed_cfg.min_partition_size)
    return _PARTITIONS[key][partition_id]


_SITE_DATA: dict[tuple, TextDataset] = {}


def site_dataset(path: str, run_cfg: RunConfig, label_names: list[str]) -> TextDataset:
    """A deployed site's own private training file (node config ``data-path``), read once per process.

    Labels must be among the student's verbalizer labels (``label_names``); a bad file raises
    :class:`post_fl.data.DataError` naming the file, row and field.
    """
    from .data import read_text_file

    d = run_cfg.data
    key = (str(path), d.text_column, d.label_column, tuple(label_names), run_cfg.seed, d.max_train_examples)
    if key not in _SITE_DATA:
        data = read_text_file(path, d.text_column, d.label_column, label_names=label_names)
        _SITE_DATA[key] = data.shuffled(run_cfg.seed).head(d.max_train_examples)
    return _SITE_DATA[key]


class ClientRefusal(RuntimeError):
    """A client declines a round for a stated reason (reply status ``refused``); the run goes on."""


def one_line_reason(text: Any, limit: int = 300) -> str:
    """A failure reason as one line: ANSI codes removed, the last meaningful line of a traceback.

    Flower and Ray wrap a client's exception in its whole (coloured) traceback; results files
    keep only the line that says what went wrong (``ValueError: ...``), at most ``limit`` chars.
    """
    import re

    plain = re.sub(r"\x1b\[[0-9;?]*[ -/]*[@-~]", "", str(text))
    skip = ("Traceback", 'File "', "During handling", "The above exception", "ray::", "(pid=")
    lines = [ln.strip() for ln in plain.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(skip) and set(ln) - set("^~-=*+| ")]
    line = lines[-1] if lines else "unknown error (empty reason)"
    return line if len(line) <= limit else line[:limit - 3] + "..."


def insecure_seed_for(run_cfg: RunConfig, server_round: int, client_id: int) -> int | None:
    """The seed of a client's DP mechanisms in ``insecure_reproducible`` mode, derived *by the client*
    from its own run config, the round and its id; None (fresh OS entropy) otherwise."""
    if not run_cfg.insecure_reproducible:
        return None
    return derive_seed(run_cfg.seed, server_round, 2, client_id)


def check_site_allows(run_cfg: RunConfig, node_config: dict) -> None:
    """A deployed site (node config ``data-path``) refuses ``insecure_reproducible`` runs unless its own
    node config says ``allow-insecure-reproducible=true``: their noise is predictable from the run config."""
    if not node_config.get("data-path") or not run_cfg.insecure_reproducible:
        return
    allowed = str(node_config.get("allow-insecure-reproducible", "false")).strip().lower() in ("true", "1", "yes")
    if not allowed:
        raise ClientRefusal("this site refuses insecure_reproducible runs (their DP noise is seeded from the run "
                            "config, so the update is not private); set node config "
                            "allow-insecure-reproducible=true to allow them")


def ledger_dir_for(run_cfg: RunConfig, node_config: dict | None = None) -> Path:
    """Where a client keeps its privacy ledgers: node config ``privacy-ledger``; else, on a deployed
    site, :func:`post_fl.ledger.default_site_ledger_dir`; else (simulation) ``<output_dir>/client-ledgers``,
    one set of virtual sites per experiment, continued by a resumed run."""
    from .ledger import default_site_ledger_dir

    node_config = node_config or {}
    if node_config.get("privacy-ledger"):
        return Path(str(node_config["privacy-ledger"]))
    if node_config.get("data-path"):
        return default_site_ledger_dir()
    return Path(run_cfg.output_dir) / LEDGER_DIR_NAME


def site_budget(run_cfg: RunConfig, node_config: dict | None = None) -> float:
    """The epsilon budget a client enforces: node config ``privacy-budget-epsilon`` (set by the site);
    in simulation only, the run's ``tune.target_epsilon`` when none is set. A deployed site without a
    budget refuses to train."""
    node_config = node_config or {}
    raw = node_config.get("privacy-budget-epsilon")
    if raw is not None and str(raw).strip() != "":
        try:
            budget = float(raw)
        except ValueError:
            raise ClientRefusal(f"node config privacy-budget-epsilon: expected a number, got {raw!r}") from None
        if not budget > 0:
            raise ClientRefusal(f"node config privacy-budget-epsilon: expected > 0, got {raw!r}")
        return budget
    if node_config.get("data-path"):
        raise ClientRefusal("this site has no privacy budget: set node config privacy-budget-epsilon=<epsilon> "
                            "(the most this site's data may ever spend, over all runs)")
    return float(run_cfg.tune.target_epsilon) if run_cfg.tune.private else math.inf


def open_ledger(run_cfg: RunConfig, data: TextDataset, client_id: int, node_config: dict | None = None):
    """This client's :class:`post_fl.ledger.PrivacyLedger` (keyed by its data's sha256, see the helpers above)."""
    from .ledger import PrivacyLedger, dataset_sha256, file_sha256

    node_config = node_config or {}
    path = node_config.get("data-path")
    data_hash = file_sha256(str(path)) if path else dataset_sha256(data)
    return PrivacyLedger.open(ledger_dir_for(run_cfg, node_config), data_hash, site_budget(run_cfg, node_config),
                              run_cfg.tune.accountant, client_id)



@dataclass
class ClientResult:
    """A client's prompt update, what its reply may say (``metrics``) and what it keeps (``private``)."""

    delta: np.ndarray
    metrics: dict[str, float | int]
    private: dict[str, float | int]


def train_client(student: ScoringModel, global_prompt: np.ndarray, data: TextDataset, run_cfg: RunConfig,
                 fed_cfg: FederatedConfig, server_round: int, client_id: int, clip: float = 0.0,
                 ledger=None, run_id: str = "") -> ClientResult:
    """One client's round: DP-SGD prompt tuning from the global prompt on its private data.

    Under DP (``tune.private``): the noise multiplier is calibrated for ``rounds`` rounds of
    ``tune.epochs`` epochs (the most a client takes part in a run); ``ledger`` (required, a
    :class:`post_fl.ledger.PrivacyLedger`) must allow this round within the site's budget, else
    :class:`post_fl.ledger.BudgetExhausted` is raised before any training; the round's steps are
    recorded in the ledger after training and *before* the update is returned (write-ahead: a
    round whose noise was drawn counts even if its update is lost). The DP noise and batches are
    fresh OS entropy unless ``run_cfg.insecure_reproducible``. The update (tuned minus global
    prompt) is clipped to L2 norm ``clip`` (> 0; under user-level DP ``user_dp_clip``), and with
    distributed user-level DP a Gaussian share of std ``sigma C / sqrt(min_clients)`` is added.
    ``metrics`` holds what the reply may carry (:data:`DP_REPLY_METRIC_KEYS` under DP), ``private``
    what the client keeps (epsilon, delta, loss, examples).
    """
    from .randomness import dp_numpy_rng
    from .tuning import calibrate_noise_multiplier, planned_steps, resolve_delta, sample_rate, tune_prompt

    tune = run_cfg.tune
    n = len(data)
    if n == 0:
        raise ValueError(f"round {server_round}: this client's partition is empty")
    q = sample_rate(tune, n)
    steps = planned_steps(tune, n)
    delta = resolve_delta(tune, n)
    sigma = 0.0
    history: list = []
    if tune.private:
        if ledger is None:
            raise ValueError("train_client: a DP client needs its privacy ledger")
        sigma = calibrate_noise_multiplier(tune, n, fed_cfg.rounds * steps)  # memoised in tuning
        ledger.check(sigma, q, steps, delta)  # raises BudgetExhausted before anything is trained
        history = ledger.history()
    elif ledger is not None and math.isfinite(ledger.budget):
        from .ledger import BudgetExhausted

        raise BudgetExhausted(ledger.epsilon(delta), math.inf, ledger.budget, delta)
    insecure = insecure_seed_for(run_cfg, server_round, client_id)
    torch.manual_seed(derive_seed(run_cfg.seed, server_round, 3, client_id))  # dropout etc.: not a DP mechanism
    prompt = SoftPrompt(torch.from_numpy(np.array(global_prompt, dtype=np.float32)))
    res = tune_prompt(student, prompt, data, tune, seed=derive_seed(run_cfg.seed, server_round, 4, client_id),
                      accountant_history=history, noise_multiplier=sigma if tune.private else None,
                      insecure_seed=insecure)
    epsilon = math.inf
    if tune.private:  # write-ahead: the record exists before the update leaves this function
        epsilon = ledger.record(sigma, q, res.steps, delta, run_id, server_round)
    delta_prompt = res.prompt.weight.detach().cpu().numpy().astype(np.float32) - np.asarray(global_prompt, np.float32)
    clip = fed_cfg.user_dp_clip if fed_cfg.user_dp else clip
    if clip > 0 and math.isfinite(clip):
        from .user_dp import clip_update

        delta_prompt, _ = clip_update(delta_prompt, clip)
    if fed_cfg.user_noise_mode == "distributed":
        from .user_dp import noise_share

        share = noise_share(delta_prompt.shape, fed_cfg.user_dp_clip, user_noise_multiplier(fed_cfg),
                            fed_cfg.min_clients, dp_numpy_rng(insecure, 5))
        delta_prompt = (delta_prompt.astype(np.float64) + share).astype(np.float32)
    private = {"epsilon": float(epsilon), "delta": float(delta), "examples": int(n), "loss": float(res.mean_loss),
               "steps": int(res.steps), "noise-multiplier": float(sigma), "sample-rate": float(q)}
    if tune.private:
        metrics: dict[str, float | int] = {"round": int(server_round)}
    else:  # a non-private run: the reply may say more (the run is labelled non-private)
        metrics = {"round": int(server_round), "num-examples": int(n), "loss": float(res.mean_loss),
                   "steps": int(res.steps), "sample-rate": float(q)}
    return ClientResult(delta_prompt, metrics, private)



def budget_status(exc) -> dict:
    """The ``budget-exhausted`` status fields of a :class:`post_fl.ledger.BudgetExhausted` refusal."""
    return {"status": BUDGET_EXHAUSTED, "spent": float(exc.spent), "after": float(exc.after),
            "budget": float(exc.budget), "delta": float(exc.delta), "reason": str(exc)}
