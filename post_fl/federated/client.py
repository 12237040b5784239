"""One federated client: its private partition or site file, its privacy ledger and budget, and its
round of DP-SGD prompt tuning (:func:`train_client`); refusals and the fixed codes its replies carry.

A deployed site (node config ``data-path``) decides itself what it reads and spends
(:class:`SiteSettings`, from its node config): the text and label columns, the label set, the dataset
name its ledger is kept under, its budget and its delta. The run config (the server's choice) cannot
move any of them; a run that names other columns or labels is refused (:func:`check_run_matches_site`).
Whatever goes wrong on a site, its reply says one fixed code (:func:`reply_code`); the detailed message
stays in the site's own log.

DP-SGD noise and Poisson batches come from fresh OS entropy (:mod:`post_fl.privacy.randomness`) unless the
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

from ..core.config import ConfigError, RunConfig
from ..core.data import TextDataset, partition
from ..core.models import ScoringModel
from ..core.deep_prompt import prompt_with_weight
from ..core.tasks import load_task
from .config import FederatedConfig, derive_seed, user_noise_multiplier
from .protocol import (BUDGET_EXHAUSTED, LEDGER_DIR_NAME, REFUSED_DATA_SETTINGS, REFUSED_INSECURE, REPLY_CODES,
                       SITE_ERROR, SITE_INPUT_INVALID)


# ---------------------------------------------------------------- client side
_PARTITIONS: dict[str, list[TextDataset]] = {}  # process-wide: the private split, read once per process


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
        train = load_task(run_cfg).train
        _PARTITIONS[key] = partition(train, n, fed_cfg.partitioning, fed_cfg.dirichlet_alpha,
                                     fed_cfg.classes_per_client, run_cfg.seed, fed_cfg.min_partition_size)
    return _PARTITIONS[key][partition_id]


class ClientRefusal(RuntimeError):
    """A client declines a round (the run goes on). The message stays in the site's log; the reply
    carries only ``code``, one of :data:`post_fl.federated.protocol.REFUSAL_CODES`."""

    def __init__(self, message: str, code: str = REFUSED_INSECURE) -> None:
        super().__init__(message)
        self.code = code


class SiteInputInvalid(ValueError):
    """A site's own node config or data file is unusable; the message (key or file, field, expected value)
    stays in the site's log, the reply says ``site input invalid``."""


def reply_code(exc: BaseException) -> str:
    """The fixed code a site's reply carries for ``exc``: never its message (which may quote the site's data)."""
    from ..core.config import ConfigError
    from ..core.data import DataError
    from ..core.tasks import PreflightError
    from ..privacy.ledger import BudgetExhausted

    if isinstance(exc, BudgetExhausted):
        return BUDGET_EXHAUSTED
    if isinstance(exc, ClientRefusal):
        return exc.code if exc.code in REPLY_CODES else SITE_ERROR
    if isinstance(exc, (SiteInputInvalid, DataError, PreflightError, ConfigError)):
        return SITE_INPUT_INVALID
    return SITE_ERROR


# ---------------------------------------------------------------- what a deployed site reads: its own choice
@dataclass(frozen=True)
class SiteSettings:
    """What a deployed site reads and how its spending is keyed, from its node config (never the run config).

    ``data_path`` (``data-path``), ``dataset_name`` (``dataset-name``: the ledger's key, so a re-exported
    file keeps its budget), ``labels`` (``labels``: the site's label set), ``text_column`` /
    ``label_column`` (``text-column`` / ``label-column``, default ``text`` / ``label``).
    """

    data_path: str
    dataset_name: str
    labels: tuple[str, ...]
    text_column: str = "text"
    label_column: str = "label"


def site_settings(node_config: dict | None) -> SiteSettings | None:
    """A deployed site's :class:`SiteSettings`, or None in simulation (no ``data-path``).

    Every missing or bad key is reported at once in one :class:`SiteInputInvalid` (logged on the site only).
    """
    from ..privacy.ledger import DATASET_NAME

    node_config = node_config or {}
    path = node_config.get("data-path")
    if not path:
        return None
    problems = []
    name = str(node_config.get("dataset-name", "")).strip()
    if not name:
        problems.append("node config dataset-name: missing; expected the name this site's privacy ledger is kept "
                        "under (e.g. dataset-name='cohort-2024'), the same whenever this data is re-exported")
    elif not DATASET_NAME.fullmatch(name):
        problems.append(f"node config dataset-name = {name!r}: expected 1-128 letters, digits, '.', '_' or '-' "
                        "(not starting with '.', '_' or '-')")
    raw = str(node_config.get("labels", "")).strip()
    labels = tuple(dict.fromkeys(x.strip() for x in raw.split(",") if x.strip()))
    if len(labels) < 2:
        problems.append(f"node config labels = {raw!r}: expected this site's label set, at least two labels "
                        "separated by commas (e.g. labels='negative,positive')")
    columns = {}
    for key, default in (("text-column", "text"), ("label-column", "label")):
        value = str(node_config.get(key, default)).strip()
        if not value:
            problems.append(f"node config {key}: expected a column name of this site's data file, got ''")
        columns[key] = value
    if problems:
        raise SiteInputInvalid("; ".join(problems))
    return SiteSettings(str(path), name, labels, columns["text-column"], columns["label-column"])


def check_run_matches_site(run_cfg: RunConfig, site: SiteSettings, label_names=None) -> None:
    """Refuse (``refused: data settings``) a run whose config names other text/label columns or another label
    set than the site reads: the server cannot make a site read a different column or label its data
    differently. ``label_names``: the student's labels (train); else the run's ``model.label_words`` keys."""
    d = run_cfg.data
    problems = []
    if d.text_column != site.text_column:
        problems.append(f"the run config asks for text column data.text_column = {d.text_column!r}; this site "
                        f"reads {site.text_column!r} (node config text-column)")
    if d.label_column != site.label_column:
        problems.append(f"the run config asks for label column data.label_column = {d.label_column!r}; this "
                        f"site reads {site.label_column!r} (node config label-column)")
    asked = list(label_names) if label_names is not None else list(run_cfg.model.label_words)
    if asked and set(asked) != set(site.labels):
        problems.append(f"the run's label set {sorted(asked)} is not this site's {sorted(site.labels)} "
                        "(node config labels)")
    if problems:
        raise ClientRefusal("; ".join(problems), REFUSED_DATA_SETTINGS)


_SITE_DATA: dict[tuple, TextDataset] = {}


def site_dataset(site: SiteSettings, run_cfg: RunConfig, label_names: list[str]) -> TextDataset:
    """A deployed site's own private training file, read with the site's own columns, once per process.

    ``label_names`` (the student's labels, in its order) must be the site's label set
    (:func:`check_run_matches_site`); a bad file raises :class:`post_fl.core.data.DataError` naming the file,
    row and field (logged on the site only).
    """
    from ..core.data import read_text_file

    if set(label_names) != set(site.labels):
        raise ClientRefusal(f"student labels {sorted(label_names)} are not this site's {sorted(site.labels)}",
                            REFUSED_DATA_SETTINGS)
    d = run_cfg.data
    key = (site, tuple(label_names), run_cfg.seed, d.max_train_examples)
    if key not in _SITE_DATA:
        data = read_text_file(site.data_path, site.text_column, site.label_column, label_names=label_names)
        _SITE_DATA[key] = data.shuffled(run_cfg.seed).head(d.max_train_examples)
    return _SITE_DATA[key]


def site_delta(run_cfg: RunConfig, node_config: dict | None, n: int) -> float | None:
    """The delta a client's budget is judged (and its noise calibrated) at, for ``n`` private examples.

    Node config ``privacy-delta`` when set (0 < delta < 1/N); else on a deployed site min(1e-5, 1/(10 N)),
    fixed at the site whatever the run config says; else (simulation) None: the run's ``tune.delta``.
    """
    from ..privacy.delta import default_delta

    node_config = node_config or {}
    raw = node_config.get("privacy-delta")
    if raw is None or str(raw).strip() == "":
        return default_delta(n) if node_config.get("data-path") else None
    try:
        delta = float(raw)
    except ValueError:
        raise SiteInputInvalid(f"node config privacy-delta: expected a number, got {raw!r}") from None
    if not 0 < delta < 1.0 / max(int(n), 1):
        raise SiteInputInvalid(f"node config privacy-delta = {delta:g}: expected 0 < delta < 1/N = {1.0 / n:g} "
                               f"(N = {n} examples of this site's data); the default is "
                               f"min(1e-5, 1/(10 N)) = {default_delta(n):g}")
    return delta


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
                            "allow-insecure-reproducible=true to allow them", REFUSED_INSECURE)


def ledger_dir_for(run_cfg: RunConfig, node_config: dict | None = None) -> Path:
    """Where a client keeps its privacy ledgers: node config ``privacy-ledger``; else, on a deployed
    site, :func:`post_fl.privacy.ledger.default_site_ledger_dir`; else (simulation) ``<output_dir>/client-ledgers``,
    one set of virtual sites per experiment, continued by a resumed run."""
    from ..privacy.ledger import default_site_ledger_dir

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
            raise SiteInputInvalid(f"node config privacy-budget-epsilon: expected a number, got {raw!r}") from None
        if not budget > 0:
            raise SiteInputInvalid(f"node config privacy-budget-epsilon: expected > 0, got {raw!r}")
        return budget
    if node_config.get("data-path"):
        raise SiteInputInvalid("this site has no privacy budget: set node config privacy-budget-epsilon=<epsilon> "
                               "(the most this site's data may ever spend, over all runs)")
    return float(run_cfg.tune.target_epsilon) if run_cfg.tune.private else math.inf


def open_ledger(run_cfg: RunConfig, data: TextDataset, client_id: int, node_config: dict | None = None):
    """This client's :class:`post_fl.privacy.ledger.PrivacyLedger`: keyed by a deployed site's ``dataset-name`` (so
    re-exporting the same data keeps its budget), in simulation by the sha256 of the partition."""
    from ..privacy.ledger import PrivacyLedger, dataset_sha256

    node_config = node_config or {}
    site = site_settings(node_config)
    key = site.dataset_name if site else str(node_config.get("dataset-name") or dataset_sha256(data))
    return PrivacyLedger.open(ledger_dir_for(run_cfg, node_config), key, site_budget(run_cfg, node_config),
                              run_cfg.tune.accountant, client_id)



@dataclass
class ClientResult:
    """A client's prompt update, what its reply may say (``metrics``) and what it keeps (``private``)."""

    delta: np.ndarray
    metrics: dict[str, float | int]
    private: dict[str, float | int]


def train_client(student: ScoringModel, global_prompt: np.ndarray, data: TextDataset, run_cfg: RunConfig,
                 fed_cfg: FederatedConfig, server_round: int, client_id: int, clip: float = 0.0,
                 ledger=None, run_id: str = "", delta: float | None = None) -> ClientResult:
    """One client's round: DP-SGD prompt tuning from the global prompt on its private data.

    Under DP (``tune.private``): the noise multiplier is calibrated for ``rounds`` rounds of
    ``tune.epochs`` epochs (the most a client takes part in a run); ``ledger`` (required, a
    :class:`post_fl.privacy.ledger.PrivacyLedger`) must allow this round within the site's budget, else
    :class:`post_fl.privacy.ledger.BudgetExhausted` is raised before any training; the round's planned steps
    are checked and recorded in one locked step *before* any noise is drawn (write-ahead: a round
    whose noise was drawn always counts, even if its update is lost; concurrent runs cannot both
    pass the check). ``delta`` (the site's, :func:`site_delta`) replaces ``tune.delta`` for the
    calibration and the budget check when given. The DP noise and batches are
    fresh OS entropy unless ``run_cfg.insecure_reproducible``. The update (tuned minus global
    prompt) is clipped to L2 norm ``clip`` (> 0; under user-level DP ``user_dp_clip``), and with
    distributed user-level DP a Gaussian share of std ``sigma C / sqrt(min_clients)`` is added.
    ``metrics`` holds what the reply may carry (:data:`DP_REPLY_METRIC_KEYS` under DP), ``private``
    what the client keeps (epsilon, delta, loss, examples).
    """
    from ..method.tuning import tune_prompt
    from ..privacy.accounting import calibrate_noise_multiplier, planned_steps, resolve_delta, sample_rate
    from ..privacy.randomness import dp_numpy_rng

    tune = run_cfg.tune if delta is None else dataclasses.replace(run_cfg.tune, delta=float(delta))
    n = len(data)
    if n == 0:
        raise ValueError(f"round {server_round}: this client's partition is empty")
    q = sample_rate(tune, n)
    steps = planned_steps(tune, n)
    delta = resolve_delta(tune, n)
    sigma = 0.0
    history: list = []
    epsilon = math.inf
    if tune.private:
        if ledger is None:
            raise ValueError("train_client: a DP client needs its privacy ledger")
        sigma = calibrate_noise_multiplier(tune, n, fed_cfg.rounds * steps)  # memoised in tuning
        history = ledger.history()
        # write-ahead and atomic: checked against the budget and recorded under the ledger's lock before any
        # noise is drawn; raises BudgetExhausted (nothing recorded) when the round does not fit
        epsilon = ledger.spend(sigma, q, steps, delta, run_id, server_round)
    elif ledger is not None and math.isfinite(ledger.budget):
        from ..privacy.ledger import BudgetExhausted

        raise BudgetExhausted(ledger.epsilon(delta), math.inf, ledger.budget, delta)
    insecure = insecure_seed_for(run_cfg, server_round, client_id)
    torch.manual_seed(derive_seed(run_cfg.seed, server_round, 3, client_id))  # dropout etc.: not a DP mechanism
    # an input prompt, or a deep prompt with the per-layer scales recomputed from the student and the run's
    # (non-private) prompt settings, exactly as the server made them
    prompt = prompt_with_weight(np.array(global_prompt, dtype=np.float32), student, run_cfg.prompt, run_cfg.seed)
    res = tune_prompt(student, prompt, data, tune, seed=derive_seed(run_cfg.seed, server_round, 4, client_id),
                      accountant_history=history, noise_multiplier=sigma if tune.private else None,
                      insecure_seed=insecure)
    if tune.private and res.steps > steps:  # never release more steps than the ledger holds
        raise RuntimeError(f"round {server_round}: DP-SGD took {res.steps} steps, {steps} were recorded")
    delta_prompt = res.prompt.weight.detach().cpu().numpy().astype(np.float32) - np.asarray(global_prompt, np.float32)
    clip = fed_cfg.user_dp_clip if fed_cfg.user_dp else clip
    if clip > 0 and math.isfinite(clip):
        from ..privacy.user_dp import clip_update

        delta_prompt, _ = clip_update(delta_prompt, clip)
    if fed_cfg.user_noise_mode == "distributed":
        from ..privacy.user_dp import noise_share

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
    """The status of a :class:`post_fl.privacy.ledger.BudgetExhausted` refusal: the fixed code and nothing else
    (spent, after, budget and delta together reveal the site's example count; they stay in its log)."""
    return {"status": BUDGET_EXHAUSTED}
