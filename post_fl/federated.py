"""Federated DP prompt tuning, without Flower: the round logic the ServerApp and ClientApp call.

One round (server round r)::

    server: sample clients ──▶ global prompt P_r, student hash, clip bound (nothing else)
    client: student from its cache (by sha256 of the safetensors state; asks once if missing)
            budget check against its own ledger; DP-SGD on its private data (fresh OS-entropy
            noise and Poisson batches); write-ahead ledger record; clip; [distributed-DP noise share]
            ──▶ the prompt update P_client - P_r (+ data-independent metadata only)
    server: validate updates (shape, finite, norm bound), aggregate (uniform mean under DP,
            capped FedAvg / median / trimmed mean otherwise, or DP-FedAvg),
            P_{r+1} = P_r + aggregate; evaluate; checkpoint atomically
    after R rounds: POST transfer of P_R to the teacher on public data; evaluate; results.json

Message schema (names shared by ``server_app`` and ``client_app``; only these cross the wire):

* train instruction: ArrayRecord ``global-prompt`` {``prompt``}; ConfigRecord ``config``
  {``round``, ``model-hash``, ``clip``}. No seed: the server cannot predict a client's noise.
* train reply: ArrayRecord ``prompt-update`` {``delta``}; MetricRecord ``metrics``
  {``round``} under DP (:data:`DP_REPLY_METRIC_KEYS`: nothing data-dependent besides the noised
  update), or {``round``, ``num-examples``, ``loss``, ``steps``, ``sample-rate``} in a non-DP run
  (labelled non-private) -- or ConfigRecord ``status`` {``status`` = ``need-model``, ``cache-key``}
  | {``status`` = ``budget-exhausted``, ``spent``, ``after``, ``budget``, ``delta``}
  | {``status`` = ``refused``, ``reason``}
* query ``hello``: ConfigRecord ``config`` {``model-hash``} -> ConfigRecord ``hello``
  {``client-id``, ``has-model``, ``cache-key``}
* query ``model``: ArrayRecord ``student-weights``; ConfigRecord ``student`` {``model-hash``,
  ``spec`` (JSON: labels, verbalizer, head, template), ``file:<name>`` (config/tokenizer bytes)}

Randomness (see :mod:`post_fl.randomness`): DP-SGD noise and Poisson batches are drawn by each
client from fresh OS entropy; DP-FedAvg noise and Poisson client sampling by the server from
fresh OS entropy; distributed-DP noise shares by each client likewise. Only non-private choices
(initial prompt, data partition, fixed-size client sampling without user-level DP) follow
``seed``. A resumed run therefore continues with new noise: it repeats the rounds and the privacy
accounting of an uninterrupted run, not its bits. With ``insecure_reproducible`` every mechanism is
seeded from (seed, round[, client]) -- the client derives its own seed from its run config, the
server sends none -- so runs repeat bit for bit, and every output says :data:`NOT_PRIVATE_LABEL`.

Privacy accounting lives with the data: each client keeps a :class:`post_fl.ledger.PrivacyLedger`
(keyed by the sha256 of its data) and refuses a round that would exceed its site's budget.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from .aggregate import (AGGREGATIONS, ClientUpdate, RoundFailedError, aggregate_updates, filter_updates,
                        require_min_clients, sum_updates, update_norm)
from .config import ConfigError, RunConfig, config_from_dict, unflatten
from .data import PARTITION_SCHEMES, TextDataset, partition
from .jsonio import jsonable, write_json
from .models import ScoringModel, load_scoring_model
from .prompt import SoftPrompt, init_from_text, init_from_vocab, save_prompt
from .randomness import NOT_PRIVATE_LABEL

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- message schema
TRAIN_PROMPT_RECORD, TRAIN_CONFIG_RECORD = "global-prompt", "config"
REPLY_UPDATE_RECORD, REPLY_METRICS_RECORD, REPLY_STATUS_RECORD = "prompt-update", "metrics", "status"
HELLO_RECORD, STUDENT_WEIGHTS_RECORD, STUDENT_FILES_RECORD = "hello", "student-weights", "student"
NEED_MODEL = "need-model"
DP_REPLY_METRIC_KEYS = ("round",)  # all a DP client reports besides its noised update: data-independent
NON_DP_REPLY_METRIC_KEYS = ("round", "num-examples", "loss", "steps", "sample-rate")  # non-private runs only
BUDGET_EXHAUSTED, REFUSED = "budget-exhausted", "refused"
LEDGER_DIR_NAME = "client-ledgers"  # simulation: <output_dir>/client-ledgers (the harness reads them)
CHECKPOINT_FILE = "checkpoint.safetensors"
STUDENT_WEIGHTS_FILE = "model.safetensors"
STUDENT_SPEC_FILE = "post_fl_student_spec.json"


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
    """

    rounds: int = 3
    num_clients: int = 10
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
    def resolved_user_delta(self) -> float:
        """User-level delta: ``user_dp_delta`` or min(1e-5, 1/(10 N)); refuses delta >= 1/N."""
        from .user_dp import resolve_user_delta

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


def build_configs(run_config: dict[str, Any]) -> tuple[RunConfig, FederatedConfig]:
    """Typed (RunConfig, FederatedConfig) from Flower's flat run-config (``"tune.lr"``, ``"federated.rounds"``)."""
    flat = dict(run_config)
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


# ---------------------------------------------------------------- student distribution by hash
def state_hash(tensors: dict[str, Any]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        arr = t.detach().cpu().contiguous().numpy() if isinstance(t, torch.Tensor) else np.ascontiguousarray(t)
        h.update(name.encode())
        h.update(str(arr.dtype).encode())
        h.update(str(tuple(arr.shape)).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def read_student_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a student directory's ``model.safetensors``."""
    from safetensors.torch import load_file

    p = Path(directory) / STUDENT_WEIGHTS_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{directory}: no {STUDENT_WEIGHTS_FILE}; the student must be saved as safetensors")
    return load_file(str(p))


@dataclass
class StudentPackage:
    """What a client needs to rebuild the student: weights, small files (config, tokenizer), task spec."""

    model_hash: str
    weights: dict[str, np.ndarray]
    files: dict[str, bytes]
    spec: dict


def pack_student(directory: str | Path, model: ScoringModel) -> StudentPackage:
    """Bundle a saved student and its verbalizer spec for sending to clients."""
    d = Path(directory)
    tensors = read_student_weights(d)
    files = {p.name: p.read_bytes() for p in sorted(d.iterdir())
             if p.is_file() and p.name != STUDENT_WEIGHTS_FILE and p.suffix in (".json", ".txt", ".model")}
    spec = {"label_names": model.label_names, "label_words": model.label_words, "head": model.head,
            "template": model.template, "max_length": model.max_length}
    return StudentPackage(state_hash(tensors), {k: v.numpy() for k, v in tensors.items()}, files, spec)


_STUDENTS: dict[str, ScoringModel] = {}  # process-wide: one student per worker process, by hash
_PARTITIONS: dict[str, list[TextDataset]] = {}  # process-wide: the private split, read once per process


def cache_root(fed_cfg: FederatedConfig) -> Path:
    return Path(fed_cfg.client_cache_dir or Path(tempfile.gettempdir()) / "post_fl_students")


def cache_key() -> str:
    """Identifies this process's student cache (host and process id), so one copy serves its clients."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _load_cached_dir(d: Path, model_hash: str) -> ScoringModel:
    spec = json.loads((d / STUDENT_SPEC_FILE).read_text())
    model = load_scoring_model(str(d), spec["label_names"], spec["label_words"], spec["head"], spec["template"],
                               spec["max_length"])
    _STUDENTS[model_hash] = model
    log.info("student %s loaded in process %s", model_hash[:12], os.getpid())
    return model


def cached_student(model_hash: str, root: Path) -> ScoringModel | None:
    """The student with this hash from the process cache, else from the disk cache (verified), else None."""
    if model_hash in _STUDENTS:
        return _STUDENTS[model_hash]
    d = root / model_hash
    if (d / STUDENT_SPEC_FILE).is_file() and (d / STUDENT_WEIGHTS_FILE).is_file():
        if state_hash(read_student_weights(d)) == model_hash:
            return _load_cached_dir(d, model_hash)
    return None


def install_student(package: StudentPackage, root: Path) -> ScoringModel:
    """Write a received student into the disk cache (atomically, after checking its hash) and load it once."""
    from safetensors.torch import save_file

    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in package.weights.items()}
    got = state_hash(tensors)
    if got != package.model_hash:
        raise ValueError(f"received student weights hash to {got[:12]}, expected {package.model_hash[:12]}")
    if package.model_hash in _STUDENTS:
        return _STUDENTS[package.model_hash]
    final = root / package.model_hash
    if not (final / STUDENT_SPEC_FILE).is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=root))
        save_file(tensors, str(tmp / STUDENT_WEIGHTS_FILE), metadata={"format": "pt"})
        for name, data in package.files.items():
            if "/" in name or name.startswith("."):
                raise ValueError(f"refusing student file name {name!r}")
            (tmp / name).write_bytes(data)
        (tmp / STUDENT_SPEC_FILE).write_text(json.dumps(package.spec))
        try:
            tmp.rename(final)
        except OSError:  # another process installed it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return _load_cached_dir(final, package.model_hash)


# ---------------------------------------------------------------- client side
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


_SIGMAS: dict[tuple, float] = {}


def _calibrated_sigma(tune, n: int, total_steps: int) -> float:
    """``tuning.calibrate_noise_multiplier``, memoised per process (it takes seconds; clients of equal size share it)."""
    from .tuning import calibrate_noise_multiplier, resolve_delta, sample_rate

    key = (tune.target_epsilon, resolve_delta(tune, n), sample_rate(tune, n), total_steps, tune.accountant)
    if key not in _SIGMAS:
        _SIGMAS[key] = float(calibrate_noise_multiplier(tune, n, total_steps))
    return _SIGMAS[key]


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


_USER_SIGMAS: dict[tuple, float] = {}


def user_noise_multiplier(fed_cfg: FederatedConfig) -> float:
    """DP-FedAvg's noise multiplier: ``user_dp_noise_multiplier`` or calibrated to the user-level target
    over ``rounds`` at rate ``fraction_train`` (memoised). Server and clients compute it the same way."""
    if fed_cfg.user_dp_noise_multiplier > 0:
        return float(fed_cfg.user_dp_noise_multiplier)
    key = (fed_cfg.user_dp_target_epsilon, fed_cfg.resolved_user_delta, fed_cfg.fraction_train, fed_cfg.rounds)
    if key not in _USER_SIGMAS:
        from .user_dp import calibrate_user_noise

        _USER_SIGMAS[key] = float(calibrate_user_noise(*key))
    return _USER_SIGMAS[key]


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
    from .tuning import planned_steps, resolve_delta, sample_rate, tune_prompt

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
        sigma = _calibrated_sigma(tune, n, fed_cfg.rounds * steps)
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


# ---------------------------------------------------------------- server side
@dataclass
class RoundReplies:
    """What came back from one round's sampled clients.

    ``updates`` are individual updates (plain aggregation); with secure aggregation they are
    empty and ``secure_mean`` holds the uniform mean the protocol revealed (None if it halted),
    ``secure_count`` how many clients it covers. ``metrics`` are per-client reply metrics
    either way; ``failures`` maps clients that gave no usable reply to a one-line reason;
    ``refusals`` maps clients that declined (budget exhausted, insecure run refused) to their
    status fields.
    """

    updates: list[ClientUpdate] = field(default_factory=list)
    metrics: dict[int, dict] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    refusals: dict[int, dict] = field(default_factory=dict)
    secure_mean: np.ndarray | None = None
    secure_count: int = 0


class Transport(Protocol):
    """How the server reaches clients (Flower's Grid, or in-process for tests and debugging)."""

    def client_ids(self) -> list[int]:
        """Stable ids (partition ids) of every client in the federation."""

    def train_round(self, server_round: int, prompt: np.ndarray, instructions: dict[int, dict]) -> RoundReplies:
        """Send each sampled client its instruction and the global prompt; collect the replies."""


class FederatedServer:
    """Server state of a federated POST run: global prompt, round, per-client privacy records, metrics.

    Loads the task data and the teacher, loads the student from ``model.student`` (or
    ``<run>/student``), distilling one when none is saved, and restores the last checkpoint
    when ``federated.resume`` is on.
    """

    def __init__(self, run_cfg: RunConfig, fed_cfg: FederatedConfig, run_dir: str | Path | None = None,
                 report: Callable[[str], None] | None = None) -> None:
        self.cfg, self.fed = run_cfg, fed_cfg
        self.run = Path(run_dir or run_cfg.output_dir)
        self.ckpt_dir = Path(fed_cfg.checkpoint_dir) if fed_cfg.checkpoint_dir else self.run / "checkpoint"
        self.report = report or log.info
        self.round = 0
        self.prompt: np.ndarray | None = None
        self.metrics: list[dict] = []
        self.clients: dict[int, dict] = {}  # client id -> privacy record
        self.user_dp_rounds = 0
        self.user_dp_sigma = 0.0
        self.user_dp_short_rounds = 0  # distributed DP: rounds with fewer than min_clients noise shares
        self.refusals: dict[int, dict] = {}  # client id -> its last refusal (budget exhausted, ...)
        self.max_norm = math.inf  # the resolved federated.max_update_norm
        self.aggregation = resolve_aggregation(fed_cfg, run_cfg)
        self.started = time.perf_counter()
        self._prepared = False

    # ------------------------------------------------------------ setup
    def prepare(self) -> None:
        """Load data, teacher and student (distil one if needed); start from the checkpoint or prompt_0."""
        if self._prepared:
            return
        self.run.mkdir(parents=True, exist_ok=True)
        self.train, self.test, self.public, label_words = _load_task(self.cfg)
        m = self.cfg.model
        self.teacher = load_scoring_model(m.teacher, self.train.label_names, label_words, m.head, m.template,
                                          m.max_length)
        self.student_dir = Path(m.student) if m.student else self.run / "student"
        if not (self.student_dir / STUDENT_WEIGHTS_FILE).is_file() and not m.student:
            from .distill import distill_student, save_student

            self.report(f"no saved student at {self.student_dir}: distilling one from {m.teacher}")
            public_train, held_out = (self.public.split(0.9, self.cfg.seed) if len(self.public) >= 20
                                      else (self.public, self.public))
            student, rep = distill_student(self.teacher, public_train, self.cfg.distill, self.cfg.seed, held_out,
                                           progress=True)  # post_fl.progress: bar / log lines / quiet
            save_student(student, self.student_dir, rep)
        self.student = load_scoring_model(str(self.student_dir), self.train.label_names, self.teacher.label_words,
                                          self.teacher.head, self.teacher.template, self.teacher.max_length)
        self.package = pack_student(self.student_dir, self.student)
        self.model_hash = self.package.model_hash
        if self.fed.user_dp:
            self.user_dp_sigma = user_noise_multiplier(self.fed)
        initial = self._initial_prompt()
        self.max_norm = (self.fed.max_update_norm if self.fed.max_update_norm > 0
                         else self.fed.max_update_norm_factor * update_norm(initial))
        if not (self.fed.resume and self.load_checkpoint()):
            self.prompt = initial
        self._prepared = True
        self.report(f"federation ready: {self.fed.num_clients} clients, {self.fed.rounds} rounds, "
                    f"student {self.model_hash[:12]}, starting after round {self.round}")

    @property
    def client_clip(self) -> float:
        """The L2 bound clients clip their update to: ``user_dp_clip`` under user DP, else the norm bound."""
        return float(self.fed.user_dp_clip if self.fed.user_dp else self.max_norm)

    @property
    def insecure(self) -> bool:
        return bool(self.cfg.insecure_reproducible)

    def _initial_prompt(self) -> np.ndarray:
        p = self.cfg.prompt
        if p.init == "text":
            sp = init_from_text(self.student.word_embeddings, self.student._ids(p.init_text), p.num_virtual_tokens)
        else:
            sp = init_from_vocab(self.student.word_embeddings, p.num_virtual_tokens,
                                 torch.Generator().manual_seed(self.cfg.seed))
        return sp.weight.detach().numpy().astype(np.float32).copy()

    def fingerprint(self) -> str:
        """Hash of every setting that changes the result (not the output/checkpoint paths or resume flag)."""
        run = self.cfg.to_dict()
        run.pop("output_dir", None)
        fed = dataclasses.asdict(self.fed)
        for k in ("checkpoint_dir", "resume", "client_cache_dir", "timeout"):
            fed.pop(k)
        return hashlib.sha256(json.dumps(jsonable([run, fed]), sort_keys=True).encode()).hexdigest()

    # ------------------------------------------------------------ rounds
    def sample(self, server_round: int, client_ids: list[int]) -> list[int]:
        """The clients of this round: Poisson at ``fraction_train`` with user DP, else a fixed-size sample.

        Poisson sampling is part of the user-level guarantee (privacy amplification), so it draws
        fresh OS entropy (:func:`post_fl.randomness.dp_numpy_rng`). The fixed-size sample of a run
        without user-level DP is not a privacy mechanism (no guarantee relies on it being secret),
        so it stays seeded by (seed, round) and repeats.
        """
        ids = sorted(client_ids)
        if self.fed.user_dp:
            from .randomness import dp_numpy_rng
            from .user_dp import poisson_sample

            rng = dp_numpy_rng(self.cfg.seed if self.insecure else None, server_round, 1)
            return poisson_sample(ids, self.fed.fraction_train, rng)
        k = min(len(ids), self.fed.clients_per_round)
        rng = np.random.default_rng(derive_seed(self.cfg.seed, server_round, 1))
        return sorted(int(c) for c in rng.choice(ids, size=k, replace=False))

    def instructions(self, server_round: int, sampled: list[int]) -> dict[int, dict]:
        """Per-client train config: round, student hash, clip bound. No seed and nothing else."""
        return {c: {"round": server_round, "model-hash": self.model_hash, "clip": self.client_clip}
                for c in sampled}

    def _user_dp_release(self, server_round: int, update_sum: np.ndarray, contributors: int) -> np.ndarray:
        """DP-FedAvg release: (sum + the noise not yet in it) / (q N); never fails, even for 0 clients.

        ``server`` mode adds N(0, (sigma C)^2). ``distributed`` mode: each of the ``contributors``
        clients already added a share of variance (sigma C)^2 / m (m = ``min_clients``); when fewer
        than m shares arrived the server tops the noise up to (sigma C)^2, so the released prompt is
        as private as always against everyone else, while against the server that round relies on
        the shares only (counted in ``user_dp_short_rounds`` and reported).
        """
        from .randomness import dp_numpy_rng
        from .user_dp import noised_mean

        m, sigma = self.fed.min_clients, self.user_dp_sigma
        if self.fed.user_noise_mode == "distributed":
            missing = max(0, m - contributors)
            if missing:
                self.user_dp_short_rounds += 1
            sigma = sigma * math.sqrt(missing / m)
        rng = dp_numpy_rng(self.cfg.seed if self.insecure else None, server_round, 3)
        return noised_mean(update_sum, self.fed.user_dp_clip, sigma,
                           self.fed.fraction_train * self.fed.num_clients, rng)

    def complete_round(self, server_round: int, sampled: list[int], replies: RoundReplies) -> dict:
        """Validate and aggregate the replies, update the global prompt, evaluate, checkpoint.

        Clients that trained count in the privacy report whether their update was used or
        rejected; refusals (budget exhausted) are recorded per client. Without user-level DP a
        round with fewer than ``min_clients`` valid updates fails; with it, the round always
        releases the noised sum of whoever was sampled (the DP-FedAvg estimator).
        """
        t0 = time.perf_counter()
        assert self.prompt is not None
        shape = tuple(self.prompt.shape)
        failed = {c: one_line_reason(why) for c, why in replies.failures.items()}
        refused = dict(replies.refusals)
        for c in sampled:
            if c not in replies.metrics and c not in failed and c not in refused and not self.fed.secagg:
                failed[c] = "no reply"
        for c, why in failed.items():
            log.warning("round %s: client %s gave no usable reply: %s", server_round, c, why)
        for c, info in refused.items():
            log.warning("round %s: client %s refused: %s", server_round, c, info.get("reason", info))
            self.refusals[c] = {"round": server_round, **info}
        rejected: dict[int, str] = {}
        if self.fed.secagg:
            count = int(replies.secure_count) if replies.secure_mean is not None else 0
            valid_ids = sorted(replies.metrics) if replies.secure_mean is not None else []
            if replies.secure_mean is not None:
                mean = np.asarray(replies.secure_mean, np.float64)
                if mean.shape != shape or not np.isfinite(mean).all():
                    raise RoundFailedError(f"round {server_round} failed: securely aggregated update has shape "
                                           f"{mean.shape} or non-finite values")
            else:
                mean = np.zeros(shape)
            if self.fed.user_dp:  # the protocol gave the uniform mean of clipped (and share-noised) updates
                mean = self._user_dp_release(server_round, mean * count, count)
            else:
                require_min_clients(server_round, count, len(sampled), self.fed.min_clients, 0, len(failed),
                                    len(refused))
        else:
            # under user DP the server clips every update to C (its sensitivity bound) instead of rejecting
            bound = math.inf if self.fed.user_dp else self.max_norm
            valid, rejected = filter_updates(replies.updates, shape, bound, server_round)
            valid_ids = [u.client_id for u in valid]
            if self.fed.user_dp:
                from .user_dp import clip_update

                clipped = [dataclasses.replace(u, delta=clip_update(u.delta, self.fed.user_dp_clip)[0])
                           for u in valid]
                mean = self._user_dp_release(server_round, sum_updates(clipped, shape), len(clipped))
            else:
                require_min_clients(server_round, len(valid), len(sampled), self.fed.min_clients, len(rejected),
                                    len(failed), len(refused))
                mean = aggregate_updates(valid, self.aggregation, self.fed.trim_fraction,
                                         self.fed.weight_cap_factor)
        self.prompt = (self.prompt.astype(np.float64) + np.asarray(mean, np.float64)).astype(np.float32)
        if self.fed.user_dp:
            self.user_dp_rounds += 1
        trained = sorted(set(valid_ids) | set(rejected))  # every client that replied with an update
        for c in trained:
            rec = self.clients.setdefault(c, {"rounds": []})
            rec["rounds"] = sorted(set(rec["rounds"]) | {server_round})
            if c in rejected:
                rec["rejected_rounds"] = sorted(set(rec.get("rejected_rounds", [])) | {server_round})
        used = [replies.metrics.get(c, {}) for c in valid_ids]
        row = {"round": server_round, "sampled": len(sampled), "valid": len(valid_ids),
               "rejected": {str(k): v for k, v in rejected.items()}, "failed": {str(k): v for k, v in failed.items()},
               "refused": {str(k): v.get("reason", v.get("status", "refused")) for k, v in refused.items()},
               "update_norm": update_norm(mean)}
        if not self.cfg.tune.private:  # non-private runs report sizes and losses (labelled non-private)
            n_ex = sum(int(m.get("num-examples", 0)) for m in used)
            losses = [(m["loss"], m.get("num-examples", 1)) for m in used if math.isfinite(m.get("loss", math.nan))]
            row["examples"] = n_ex
            row["train_loss"] = (sum(l * w for l, w in losses) / sum(w for _, w in losses)) if losses else math.nan
        if self.fed.user_dp:
            row["user_epsilon"] = self.user_epsilon()
        if server_round % self.fed.eval_every == 0 or server_round == self.fed.rounds:
            row["test_accuracy"] = self.evaluate_student()
        row["seconds"] = time.perf_counter() - t0
        self.metrics.append(row)
        self.round = server_round
        self.save_checkpoint()
        acc = f", test acc {row['test_accuracy']:.3f}" if "test_accuracy" in row else ""
        loss = f", loss {row['train_loss']:.4f}" if "train_loss" in row else ""
        self.report(f"round {server_round}/{self.fed.rounds}: {row['valid']}/{row['sampled']} updates "
                    f"({len(rejected)} rejected, {len(failed)} failed, {len(refused)} refused){loss}{acc}"
                    + (" [NOT PRIVATE: insecure_reproducible]" if self.insecure else ""))
        return row

    def evaluate_student(self) -> float:
        """Test accuracy of the student with the current global prompt."""
        from .evaluate import accuracy

        return accuracy(self.student, self.test, SoftPrompt(torch.from_numpy(self.prompt.copy())),
                        self.cfg.eval.batch_size)

    def user_epsilon(self) -> float:
        """User-level epsilon of the rounds so far (DP-FedAvg), or inf when user-level DP is off."""
        if not self.fed.user_dp:
            return math.inf
        from .user_dp import user_level_epsilon

        return user_level_epsilon(self.user_dp_sigma, self.fed.fraction_train, self.user_dp_rounds,
                                  self.fed.resolved_user_delta)

    @property
    def ledger_dir(self) -> Path:
        """Where simulated clients keep their ledgers (the harness reads them; a deployment's sites keep theirs)."""
        return Path(self.cfg.output_dir) / LEDGER_DIR_NAME

    def client_privacy(self) -> dict[int, dict]:
        """Per client that trained: epsilon/delta from its ledger where this machine can read it (simulation);
        otherwise only the rounds it replied in (a deployed site's epsilon stays in its own ledger)."""
        from .ledger import read_ledgers

        ledgers = read_ledgers(self.ledger_dir, self.cfg.tune.accountant) if self.cfg.tune.private else {}
        out: dict[int, dict] = {}
        for c in sorted(set(self.clients) | set(ledgers)):
            rec = dict(self.clients.get(c, {}))
            if c in ledgers:
                rec.update(ledgers[c])
            elif not self.cfg.tune.private:
                rec.update({"epsilon": math.inf, "delta": 0.0})
            out[c] = rec
        return out

    # ------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.ckpt_dir / CHECKPOINT_FILE

    def save_checkpoint(self) -> Path:
        """Write prompt, round, per-client privacy records, seeds and metrics in one file, atomically."""
        from safetensors.torch import save_file

        state = {"round": self.round, "fingerprint": self.fingerprint(), "seed": self.cfg.seed,
                 "rng": ("insecure_reproducible: DP streams seeded from (seed, round[, client])" if self.insecure
                         else "DP noise and sampling from fresh OS entropy; resumed rounds draw new noise"),
                 "model_hash": self.model_hash, "metrics": self.metrics,
                 "clients": {str(k): v for k, v in self.clients.items()},
                 "refusals": {str(k): v for k, v in self.refusals.items()},
                 "user_dp": {"rounds": self.user_dp_rounds, "noise_multiplier": self.user_dp_sigma,
                             "short_rounds": self.user_dp_short_rounds}}
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_path.with_suffix(".tmp")
        save_file({"prompt": torch.from_numpy(self.prompt.copy())}, str(tmp),
                  metadata={"state": json.dumps(jsonable(state))})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        tmp.replace(self.checkpoint_path)
        return self.checkpoint_path

    def load_checkpoint(self) -> bool:
        """Restore the last checkpoint if there is one; refuse one written with different settings."""
        from safetensors import safe_open

        p = self.checkpoint_path
        if not p.is_file():
            return False
        with safe_open(str(p), framework="pt") as fh:
            state = json.loads(fh.metadata()["state"])
            prompt = fh.get_tensor("prompt").numpy().copy()
        if state["fingerprint"] != self.fingerprint():
            raise ValueError(f"{p} was written by a run with different settings; use another output_dir "
                             "or federated.checkpoint_dir, or set federated.resume = false")
        if state["model_hash"] != self.model_hash:
            raise ValueError(f"{p} was written with student {state['model_hash'][:12]}, "
                             f"but the student now hashes to {self.model_hash[:12]}")
        self.round, self.prompt, self.metrics = int(state["round"]), prompt, _floats(state["metrics"])
        self.clients = {int(k): _floats(v) for k, v in state["clients"].items()}
        self.refusals = {int(k): _floats(v) for k, v in state.get("refusals", {}).items()}
        self.user_dp_rounds = int(state["user_dp"]["rounds"])
        self.user_dp_short_rounds = int(state["user_dp"].get("short_rounds", 0))
        self.report(f"resuming from {p} after round {self.round}")
        return True

    # ------------------------------------------------------------ the end
    def privacy_report(self) -> dict:
        """The privacy section of results.json: per-client sample-level epsilon (every client that trained,
        rejected ones included; from the ledgers where readable), refusals, user-level epsilon and who is
        trusted for it, and the NOT-PRIVATE label of insecure or non-DP runs."""
        tune = self.cfg.tune
        per_client = self.client_privacy()
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
                  "refused": {str(c): v for c, v in sorted(self.refusals.items())},
                  "source": source,
                  "unit": "example-level, composed over every round the client's data was ever used in "
                          "(its ledger), at the client's delta"}
        user = None
        if self.fed.user_dp:
            mode = self.fed.user_noise_mode
            user = {"epsilon": self.user_epsilon(), "delta": self.fed.resolved_user_delta,
                    "noise_multiplier": self.user_dp_sigma, "clip": self.fed.user_dp_clip,
                    "sample_rate": self.fed.fraction_train, "rounds": self.user_dp_rounds,
                    "noise": mode, "trusts_server": mode == "server",
                    "holds_against_server": mode == "distributed" and self.user_dp_short_rounds == 0,
                    "rounds_with_fewer_than_min_clients_shares": self.user_dp_short_rounds,
                    "unit": "user-level (DP-FedAvg, RDP accountant)" + (
                        "; the server sees the exact sum (or each update) before noising: trusts the server"
                        if mode == "server" else "; noise added by the clients before SecAgg+ masking")}
        out = {"sample_level": sample, "user_level": user, "secure_aggregation": self.fed.secagg,
               "aggregation": self.aggregation, "max_update_norm": self.max_norm}
        if self.insecure:
            out["not_private"] = NOT_PRIVATE_LABEL
        elif not tune.private:
            out["not_private"] = "NOT PRIVATE at sample level: tune.dp is off (clients report sizes and losses)"
        return out

    def finish(self) -> dict:
        """Transfer the global prompt to the teacher (POST, public data), evaluate everything, write results."""
        from .evaluate import accuracy
        from .transfer import transfer_prompt

        bs = self.cfg.eval.batch_size
        student_prompt = SoftPrompt(torch.from_numpy(self.prompt.copy()))
        privacy = self.privacy_report()
        max_eps = privacy["sample_level"]["max_epsilon"]
        meta = {"stage": "federated-dp-tune", "rounds": self.round, "max_client_epsilon": max_eps,
                "user_epsilon": self.user_epsilon(), "label_words": self.student.label_words,
                "template": self.student.template}
        if self.insecure:
            meta["not_private"] = NOT_PRIVATE_LABEL
        save_prompt(student_prompt, self.run / "prompt_student", head=self.student.head,
                    base_model=str(self.student_dir), metadata=meta)
        self.report("transferring the global prompt to the teacher on public data (POST)")
        tr = transfer_prompt(self.student, student_prompt, self.teacher, self.public, self.cfg.transfer,
                             self.cfg.seed, progress=True)
        tcfg = self.teacher.backbone.config
        save_prompt(tr.prompt, self.run / "prompt_teacher", head=self.teacher.head, base_model=self.teacher.source,
                    num_layers=getattr(tcfg, "num_hidden_layers", None),
                    num_attention_heads=getattr(tcfg, "num_attention_heads", None),
                    metadata={**meta, "stage": "post-transfer", "alpha": self.cfg.transfer.alpha})
        acc = {"student_zero_shot": accuracy(self.student, self.test, None, bs),
               "student_federated_prompt": accuracy(self.student, self.test, student_prompt, bs),
               "teacher_zero_shot": accuracy(self.teacher, self.test, None, bs)}
        if student_prompt.dim == self.teacher.embedding_dim:
            acc["teacher_direct_prompt"] = accuracy(self.teacher, self.test, student_prompt, bs)
        acc["teacher_transferred_prompt"] = accuracy(self.teacher, self.test, tr.prompt, bs)
        results = {
            **({"not_private": NOT_PRIVATE_LABEL} if self.insecure else {}),
            "accuracy": acc,
            "rounds": self.metrics,
            "privacy": privacy,
            "transfer": {"first_loss": tr.first_loss, "last_loss": tr.last_loss, "steps": len(tr.losses),
                         "public_examples": tr.public_examples, "seconds": tr.seconds},
            "data": {"train": len(self.train), "test": len(self.test), "public": len(self.public),
                     "labels": self.train.label_names, "clients": self.fed.num_clients,
                     "partitioning": self.fed.partitioning},
            "models": {"teacher": self.teacher.describe(), "student": self.student.describe(),
                       "student_hash": self.model_hash},
            "federated": dataclasses.asdict(self.fed),
            "config": self.cfg.to_dict(),
            "seed": self.cfg.seed,
            "seconds": time.perf_counter() - self.started,
        }
        write_json(results, self.run / "results.json")
        self.report(f"done: results in {self.run / 'results.json'}; accuracy {json.dumps(jsonable(acc))}")
        return results


def _floats(value: Any) -> Any:
    """Undo :func:`jsonable` for infinities/NaN read back from JSON."""
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, dict):
        return {k: _floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_floats(v) for v in value]
    return value


def run_federated(server: FederatedServer, transport: Transport,
                  after_round: Callable[[int], None] | None = None) -> dict:
    """The round loop: sample, send, aggregate, evaluate, checkpoint; then transfer and write results.

    Starts after the last checkpointed round. ``after_round(r)`` is called once round r is
    checkpointed (progress hooks; tests use it to interrupt a run).
    """
    server.prepare()
    ids = transport.client_ids()
    n = server.fed.num_clients
    if len(ids) > n or len(ids) < server.fed.min_clients:
        raise ConfigError(f"federated.num_clients is {n} (min_clients {server.fed.min_clients}) but "
                          f"{len(ids)} distinct clients answered")
    if len(ids) < n:
        server.report(f"warning: {len(ids)} of federated.num_clients = {n} distinct clients answered; "
                      "going on with them")
    for rnd in range(server.round + 1, server.fed.rounds + 1):
        sampled = server.sample(rnd, ids)
        # a user-DP Poisson sample may be empty: the round still releases (noise only) and counts
        replies = transport.train_round(rnd, server.prompt, server.instructions(rnd, sampled)) if sampled \
            else RoundReplies()
        server.complete_round(rnd, sampled, replies)
        if after_round is not None:
            after_round(rnd)
    return server.finish()


class LocalTransport:
    """Clients simulated in this process without Flower: same student-by-hash protocol and client state.

    For tests and debugging; ``tamper`` may rewrite a client's :class:`ClientUpdate` (to test rejection).
    """

    def __init__(self, server: FederatedServer, run_cfg: RunConfig, fed_cfg: FederatedConfig,
                 tamper: Callable[[ClientUpdate], ClientUpdate] | None = None) -> None:
        self.server, self.cfg, self.fed, self.tamper = server, run_cfg, fed_cfg, tamper
        self.states: dict[int, dict] = {}
        self.model_sends = 0

    def client_ids(self) -> list[int]:
        return list(range(self.fed.num_clients))

    def train_round(self, server_round: int, prompt: np.ndarray, instructions: dict[int, dict]) -> RoundReplies:
        from .ledger import BudgetExhausted

        out = RoundReplies()
        root = cache_root(self.fed)
        for cid, ins in instructions.items():
            student = cached_student(ins["model-hash"], root)
            if student is None:  # the client would reply need-model; the server sends the package
                self.model_sends += 1
                student = install_student(self.server.package, root)
            try:  # as in Flower, a client that raises gives an error reply, not a dead run
                data = client_partition(self.cfg, self.fed, cid)
                ledger = open_ledger(self.cfg, data, cid) if self.cfg.tune.private else None
                res = train_client(student, prompt, data, self.cfg, self.fed, server_round, cid, ins["clip"],
                                   ledger, run_id="local")
            except BudgetExhausted as exc:
                out.refusals[cid] = budget_status(exc)
                continue
            except ClientRefusal as exc:
                out.refusals[cid] = {"status": REFUSED, "reason": str(exc)}
                continue
            except ValueError as exc:  # bad or empty private data (DataError is a ValueError)
                out.failures[cid] = f"{type(exc).__name__}: {exc}"
                continue
            upd = ClientUpdate(cid, res.delta, res.metrics.get("num-examples"), res.metrics)
            if self.tamper is not None:
                upd = self.tamper(upd)
            out.updates.append(upd)
            out.metrics[cid] = upd.metrics
        return out


def budget_status(exc) -> dict:
    """The ``budget-exhausted`` status fields of a :class:`post_fl.ledger.BudgetExhausted` refusal."""
    return {"status": BUDGET_EXHAUSTED, "spent": float(exc.spent), "after": float(exc.after),
            "budget": float(exc.budget), "delta": float(exc.delta), "reason": str(exc)}
