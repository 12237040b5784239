"""Federated DP prompt tuning, without Flower: the round logic the ServerApp and ClientApp call.

One round (server round r)::

    server: sample clients (seeded by (seed, r)) ──▶ global prompt P_r, student hash, client seed
    client: student from its cache (by sha256 of the safetensors state; asks once if missing)
            DP-SGD on its private partition (accountant history kept in its state across rounds)
            ──▶ prompt update P_client - P_r, num-examples, loss, epsilon, delta (nothing else)
    server: validate updates (shape, finite, norm bound), FedAvg (or DP-FedAvg with noise),
            P_{r+1} = P_r + mean update; evaluate; checkpoint atomically
    after R rounds: POST transfer of P_R to the teacher on public data; evaluate; results.json

Message schema (names shared by ``server_app`` and ``client_app``; only these cross the wire):

* train instruction: ArrayRecord ``global-prompt`` {``prompt``}; ConfigRecord ``config``
  {``round``, ``model-hash``, ``client-seed``, ``prior-steps``, ``clip``}
* train reply: ArrayRecord ``prompt-update`` {``delta``}; MetricRecord ``metrics``
  {``num-examples``, ``loss``, ``epsilon``, ``delta``, ``steps``, ``noise-multiplier``,
  ``sample-rate``} -- or ConfigRecord ``status`` {``status`` = ``need-model``, ``cache-key``}
* query ``hello``: ConfigRecord ``config`` {``model-hash``} -> ConfigRecord ``hello``
  {``client-id``, ``has-model``, ``cache-key``}
* query ``model``: ArrayRecord ``student-weights``; ConfigRecord ``student`` {``model-hash``,
  ``spec`` (JSON: labels, verbalizer, head, template), ``file:<name>`` (config/tokenizer bytes)}

Randomness is derived from one seed: the round's client sample and DP-FedAvg noise from
(seed, round), each client's DP-SGD from (seed, round, client id). A run resumed from its
checkpoint therefore repeats an uninterrupted run exactly.
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

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- message schema
TRAIN_PROMPT_RECORD, TRAIN_CONFIG_RECORD = "global-prompt", "config"
REPLY_UPDATE_RECORD, REPLY_METRICS_RECORD, REPLY_STATUS_RECORD = "prompt-update", "metrics", "status"
HELLO_RECORD, STUDENT_WEIGHTS_RECORD, STUDENT_FILES_RECORD = "hello", "student-weights", "student"
NEED_MODEL = "need-model"
REPLY_METRIC_KEYS = ("num-examples", "loss", "epsilon", "delta", "steps", "noise-multiplier", "sample-rate")
CLIENT_STATE_RECORD = "post-fl-client"
CHECKPOINT_FILE = "checkpoint.safetensors"
STUDENT_WEIGHTS_FILE = "model.safetensors"
STUDENT_SPEC_FILE = "post_fl_student_spec.json"


# ---------------------------------------------------------------- configuration
@dataclass
class FederatedConfig:
    """Settings of the federation: rounds, client sampling, data split, aggregation, privacy, checkpoints.

    ``fraction_train`` of ``num_clients`` clients are sampled each round (at least
    ``min_clients``); a round with fewer than ``min_clients`` valid updates fails.
    ``aggregation`` is ``fedavg`` (weighted by examples) or ``uniform``. Updates with L2 norm
    above ``max_update_norm`` are rejected (0 = no bound). ``user_dp`` switches on DP-FedAvg:
    Poisson client sampling at rate ``fraction_train``, clipping to ``user_dp_clip``, Gaussian
    noise with multiplier ``user_dp_noise_multiplier`` (0 = calibrated to
    ``user_dp_target_epsilon`` over ``rounds``) at ``user_dp_delta`` (0 = 1/num_clients).
    ``secagg`` aggregates with Flower's SecAgg+ (clients clip to ``max_update_norm`` or
    ``user_dp_clip``, weigh updates equally); the server then sees only the mean.
    """

    rounds: int = 3
    num_clients: int = 10
    fraction_train: float = 0.5
    min_clients: int = 2
    partitioning: str = "iid"
    dirichlet_alpha: float = 0.5
    classes_per_client: int = 1
    aggregation: str = "fedavg"
    max_update_norm: float = 0.0
    user_dp: bool = False
    user_dp_clip: float = 1.0
    user_dp_noise_multiplier: float = 0.0
    user_dp_target_epsilon: float = 8.0
    user_dp_delta: float = 0.0
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
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"federated.aggregation: expected one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.max_update_norm < 0:
            raise ConfigError(f"federated.max_update_norm: expected >= 0 (0 = no bound), got {self.max_update_norm}")
        if self.user_dp_clip <= 0:
            raise ConfigError(f"federated.user_dp_clip: expected > 0, got {self.user_dp_clip}")
        if self.user_dp_noise_multiplier < 0:
            raise ConfigError(f"federated.user_dp_noise_multiplier: expected >= 0, got {self.user_dp_noise_multiplier}")
        if self.user_dp_target_epsilon <= 0:
            raise ConfigError(f"federated.user_dp_target_epsilon: expected > 0, got {self.user_dp_target_epsilon}")
        if not 0 <= self.user_dp_delta < 1:
            raise ConfigError(f"federated.user_dp_delta: expected in [0, 1), got {self.user_dp_delta}")
        if self.secagg and not (self.max_update_norm > 0 or self.user_dp):
            raise ConfigError("federated.secagg: needs client-side clipping; set federated.max_update_norm > 0 "
                              "or federated.user_dp = true")
        if self.eval_every < 1:
            raise ConfigError(f"federated.eval_every: expected >= 1, got {self.eval_every}")
        if self.timeout < 0:
            raise ConfigError(f"federated.timeout: expected >= 0, got {self.timeout}")

    @property
    def clients_per_round(self) -> int:
        """Clients sampled per round without user-level DP: max(min_clients, ceil(fraction * N))."""
        return min(self.num_clients, max(self.min_clients, math.ceil(self.fraction_train * self.num_clients)))

    @property
    def client_clip(self) -> float:
        """The L2 bound clients clip their update to (user-DP clip, or the norm bound under SecAgg); 0 = none."""
        if self.user_dp:
            return self.user_dp_clip
        return self.max_update_norm if self.secagg else 0.0

    @property
    def resolved_user_delta(self) -> float:
        return self.user_dp_delta if self.user_dp_delta > 0 else 1.0 / self.num_clients


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
    return config_from_dict(nested), fed_cfg


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
                      fed_cfg.dirichlet_alpha, fed_cfg.classes_per_client], sort_keys=True, default=str)
    if key not in _PARTITIONS:
        train = _load_task(run_cfg)[0]
        _PARTITIONS[key] = partition(train, n, fed_cfg.partitioning, fed_cfg.dirichlet_alpha,
                                     fed_cfg.classes_per_client, run_cfg.seed)
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


@dataclass
class ClientResult:
    """A client's prompt update, the metrics it reports and its new private state."""

    delta: np.ndarray
    metrics: dict[str, float | int]
    state: dict[str, float | int]


def train_client(student: ScoringModel, global_prompt: np.ndarray, data: TextDataset, run_cfg: RunConfig,
                 fed_cfg: FederatedConfig, state: dict | None, server_round: int, seed: int,
                 prior_steps: int = 0, clip: float = 0.0) -> ClientResult:
    """One client's round: DP-SGD prompt tuning from the global prompt on its private partition.

    ``state`` is the client's own record from earlier rounds (noise multiplier, sample rate,
    DP-SGD steps taken); the sample-level accountant composes over all of them. The noise
    multiplier is calibrated once, on first participation, for ``rounds`` rounds of
    ``tune.epochs`` epochs (the most this client can take part in), so epsilon never exceeds
    ``tune.target_epsilon``. ``prior_steps`` (from the server's checkpoint after a resume) can
    only raise the step count, never lower it. ``clip`` > 0 clips the update's L2 norm.
    Returns the update (tuned prompt minus global prompt) and the reply metrics.
    """
    from .tuning import planned_steps, sample_rate, tune_prompt

    state = dict(state or {})
    tune = run_cfg.tune
    n = len(data)
    if n == 0:
        raise ValueError(f"round {server_round}: this client's partition is empty")
    q = sample_rate(tune, n)
    sigma = 0.0
    if tune.private:
        sigma = float(state.get("noise-multiplier") or
                      _calibrated_sigma(tune, n, fed_cfg.rounds * planned_steps(tune, n)))
    steps_before = max(int(state.get("steps", 0)), int(prior_steps))
    history = [(sigma, q, steps_before)] if tune.private and steps_before else []
    torch.manual_seed(seed)
    prompt = SoftPrompt(torch.from_numpy(np.array(global_prompt, dtype=np.float32)))
    res = tune_prompt(student, prompt, data, tune, seed=seed, accountant_history=history,
                      noise_multiplier=sigma if tune.private else None)
    delta = res.prompt.weight.detach().cpu().numpy().astype(np.float32) - np.asarray(global_prompt, np.float32)
    if clip > 0:
        from .user_dp import clip_update

        delta, _ = clip_update(delta, clip)
    steps = steps_before + res.steps
    metrics = {"num-examples": int(n), "loss": float(res.mean_loss), "epsilon": float(res.epsilon),
               "delta": float(res.delta), "steps": int(steps), "noise-multiplier": float(sigma),
               "sample-rate": float(q)}
    new_state = {"noise-multiplier": float(sigma), "sample-rate": float(q), "steps": int(steps),
                 "rounds": int(state.get("rounds", 0)) + 1, "epsilon": float(res.epsilon)}
    return ClientResult(delta, metrics, new_state)


# ---------------------------------------------------------------- server side
@dataclass
class RoundReplies:
    """What came back from one round's sampled clients.

    ``updates`` are individual updates (plain aggregation); with secure aggregation they are
    empty and ``secure_mean`` holds the (example-weighted or uniform) mean the protocol revealed,
    ``secure_count`` how many clients it covers. ``metrics`` are per-client reply metrics
    either way; ``failures`` maps clients that gave no usable reply to the reason.
    """

    updates: list[ClientUpdate] = field(default_factory=list)
    metrics: dict[int, dict] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
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
            student, rep = distill_student(self.teacher, public_train, self.cfg.distill, self.cfg.seed, held_out)
            save_student(student, self.student_dir, rep)
        self.student = load_scoring_model(str(self.student_dir), self.train.label_names, self.teacher.label_words,
                                          self.teacher.head, self.teacher.template, self.teacher.max_length)
        self.package = pack_student(self.student_dir, self.student)
        self.model_hash = self.package.model_hash
        if self.fed.user_dp:
            q = self.fed.fraction_train
            self.user_dp_sigma = self.fed.user_dp_noise_multiplier or self._calibrate_user_noise(q)
        if not (self.fed.resume and self.load_checkpoint()):
            self.prompt = self._initial_prompt()
        self._prepared = True
        self.report(f"federation ready: {self.fed.num_clients} clients, {self.fed.rounds} rounds, "
                    f"student {self.model_hash[:12]}, starting after round {self.round}")

    def _calibrate_user_noise(self, q: float) -> float:
        from .user_dp import calibrate_user_noise

        return calibrate_user_noise(self.fed.user_dp_target_epsilon, self.fed.resolved_user_delta, q,
                                    self.fed.rounds)

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
        """The clients of this round: fixed-size uniform sample, or Poisson at ``fraction_train`` with user DP."""
        ids = sorted(client_ids)
        seed = derive_seed(self.cfg.seed, server_round, 1)
        if self.fed.user_dp:
            from .user_dp import poisson_sample

            return poisson_sample(ids, self.fed.fraction_train, seed)
        k = min(len(ids), self.fed.clients_per_round)
        rng = np.random.default_rng(seed)
        return sorted(int(c) for c in rng.choice(ids, size=k, replace=False))

    def instructions(self, server_round: int, sampled: list[int]) -> dict[int, dict]:
        """Per-client train config: round, student hash, client seed, steps on record, clip bound."""
        return {c: {"round": server_round, "model-hash": self.model_hash,
                    "client-seed": derive_seed(self.cfg.seed, server_round, 2, c),
                    "prior-steps": int(self.clients.get(c, {}).get("steps", 0)),
                    "clip": float(self.fed.client_clip)} for c in sampled}

    def complete_round(self, server_round: int, sampled: list[int], replies: RoundReplies) -> dict:
        """Validate and aggregate the replies, update the global prompt, evaluate, checkpoint."""
        t0 = time.perf_counter()
        assert self.prompt is not None
        shape = tuple(self.prompt.shape)
        failed = dict(replies.failures)
        for c in sampled:
            if c not in replies.metrics and c not in failed and replies.secure_mean is None:
                failed[c] = "no reply"
        for c, why in failed.items():
            log.warning("round %s: client %s gave no usable reply: %s", server_round, c, why)
        if replies.secure_mean is not None:
            valid_ids, rejected = sorted(replies.metrics), {}
            mean = np.asarray(replies.secure_mean, np.float64)
            if mean.shape != shape or not np.isfinite(mean).all():
                raise RoundFailedError(f"round {server_round} failed: securely aggregated update has shape "
                                       f"{mean.shape} or non-finite values")
            require_min_clients(server_round, replies.secure_count, len(sampled), self.fed.min_clients,
                                0, len(failed))
            if self.fed.user_dp:  # the protocol gave a uniform mean of clipped updates: noise its sum
                from .user_dp import noised_mean

                mean = noised_mean(mean * replies.secure_count, self.fed.user_dp_clip, self.user_dp_sigma,
                                   self.fed.fraction_train * self.fed.num_clients,
                                   derive_seed(self.cfg.seed, server_round, 3))
        else:
            max_norm = self.fed.max_update_norm
            valid, rejected = filter_updates(replies.updates, shape, max_norm, server_round)
            valid_ids = [u.client_id for u in valid]
            require_min_clients(server_round, len(valid), len(sampled), self.fed.min_clients, len(rejected),
                                len(failed))
            if self.fed.user_dp:
                from .user_dp import clip_update, noised_mean

                clipped = [dataclasses.replace(u, delta=clip_update(u.delta, self.fed.user_dp_clip)[0])
                           for u in valid]
                mean = noised_mean(sum_updates(clipped), self.fed.user_dp_clip, self.user_dp_sigma,
                                   self.fed.fraction_train * self.fed.num_clients,
                                   derive_seed(self.cfg.seed, server_round, 3))
            else:
                mean = aggregate_updates(valid, self.fed.aggregation)
        self.prompt = (self.prompt.astype(np.float64) + np.asarray(mean, np.float64)).astype(np.float32)
        if self.fed.user_dp:
            self.user_dp_rounds += 1
        for c in valid_ids:
            m = replies.metrics[c]
            rec = self.clients.setdefault(c, {"rounds": []})
            rec.update({k: m[k] for k in ("epsilon", "delta", "steps", "noise-multiplier", "sample-rate") if k in m})
            rec["rounds"] = sorted(set(rec["rounds"]) | {server_round})
        used = [replies.metrics[c] for c in valid_ids]
        n_ex = sum(int(m.get("num-examples", 0)) for m in used)
        losses = [(m["loss"], m.get("num-examples", 1)) for m in used if math.isfinite(m.get("loss", math.nan))]
        row = {"round": server_round, "sampled": len(sampled), "valid": len(valid_ids),
               "rejected": {str(k): v for k, v in rejected.items()}, "failed": {str(k): v for k, v in failed.items()},
               "examples": n_ex,
               "train_loss": (sum(l * w for l, w in losses) / sum(w for _, w in losses)) if losses else math.nan,
               "update_norm": update_norm(mean),
               "max_client_epsilon": max((float(m.get("epsilon", 0.0)) for m in used), default=0.0)}
        if self.fed.user_dp:
            row["user_epsilon"] = self.user_epsilon()
        if server_round % self.fed.eval_every == 0 or server_round == self.fed.rounds:
            row["test_accuracy"] = self.evaluate_student()
        row["seconds"] = time.perf_counter() - t0
        self.metrics.append(row)
        self.round = server_round
        self.save_checkpoint()
        acc = f", test acc {row['test_accuracy']:.3f}" if "test_accuracy" in row else ""
        self.report(f"round {server_round}/{self.fed.rounds}: {row['valid']}/{row['sampled']} updates "
                    f"({len(rejected)} rejected, {len(failed)} failed), loss {row['train_loss']:.4f}, "
                    f"max client eps {row['max_client_epsilon']:.3g}{acc}")
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

    # ------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.ckpt_dir / CHECKPOINT_FILE

    def save_checkpoint(self) -> Path:
        """Write prompt, round, per-client privacy records, seeds and metrics in one file, atomically."""
        from safetensors.torch import save_file

        state = {"round": self.round, "fingerprint": self.fingerprint(), "seed": self.cfg.seed,
                 "rng": "per-round streams derived from (seed, round[, client]) with numpy SeedSequence",
                 "model_hash": self.model_hash, "metrics": self.metrics,
                 "clients": {str(k): v for k, v in self.clients.items()},
                 "user_dp": {"rounds": self.user_dp_rounds, "noise_multiplier": self.user_dp_sigma}}
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
        self.user_dp_rounds = int(state["user_dp"]["rounds"])
        self.report(f"resuming from {p} after round {self.round}")
        return True

    # ------------------------------------------------------------ the end
    def finish(self) -> dict:
        """Transfer the global prompt to the teacher (POST, public data), evaluate everything, write results."""
        from .evaluate import accuracy
        from .transfer import transfer_prompt

        bs = self.cfg.eval.batch_size
        student_prompt = SoftPrompt(torch.from_numpy(self.prompt.copy()))
        eps = {str(c): float(r.get("epsilon", math.inf)) for c, r in sorted(self.clients.items())}
        max_eps = max(eps.values(), default=0.0)
        tune = self.cfg.tune
        meta = {"stage": "federated-dp-tune", "rounds": self.round, "max_client_epsilon": max_eps,
                "user_epsilon": self.user_epsilon(), "label_words": self.student.label_words,
                "template": self.student.template}
        save_prompt(student_prompt, self.run / "prompt_student", head=self.student.head,
                    base_model=str(self.student_dir), metadata=meta)
        self.report("transferring the global prompt to the teacher on public data (POST)")
        tr = transfer_prompt(self.student, student_prompt, self.teacher, self.public, self.cfg.transfer,
                             self.cfg.seed)
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
            "accuracy": acc,
            "rounds": self.metrics,
            "privacy": {
                "sample_level": {"dp": tune.private, "target_epsilon": tune.target_epsilon,
                                 "epsilon_per_client": eps, "max_epsilon": max_eps,
                                 "delta_per_client": {str(c): r.get("delta") for c, r in sorted(self.clients.items())},
                                 "unit": "example-level, composed over every round a client took part in"},
                "user_level": ({"epsilon": self.user_epsilon(), "delta": self.fed.resolved_user_delta,
                                "noise_multiplier": self.user_dp_sigma, "clip": self.fed.user_dp_clip,
                                "sample_rate": self.fed.fraction_train, "rounds": self.user_dp_rounds,
                                "unit": "user-level (DP-FedAvg, RDP accountant)"} if self.fed.user_dp else None),
                "secure_aggregation": self.fed.secagg,
            },
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
    if len(ids) != server.fed.num_clients:
        raise ConfigError(f"federated.num_clients is {server.fed.num_clients} but {len(ids)} clients answered")
    for rnd in range(server.round + 1, server.fed.rounds + 1):
        sampled = server.sample(rnd, ids)
        replies = transport.train_round(rnd, server.prompt, server.instructions(rnd, sampled))
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
        out = RoundReplies()
        root = cache_root(self.fed)
        for cid, ins in instructions.items():
            student = cached_student(ins["model-hash"], root)
            if student is None:  # the client would reply need-model; the server sends the package
                self.model_sends += 1
                student = install_student(self.server.package, root)
            try:  # as in Flower, a client that raises gives an error reply, not a dead run
                data = client_partition(self.cfg, self.fed, cid)
                res = train_client(student, prompt, data, self.cfg, self.fed, self.states.get(cid), server_round,
                                   ins["client-seed"], ins["prior-steps"], ins["clip"])
            except ValueError as exc:  # bad or empty private data (DataError is a ValueError)
                out.failures[cid] = f"{type(exc).__name__}: {exc}"
                continue
            self.states[cid] = res.state
            upd = ClientUpdate(cid, res.delta, int(res.metrics["num-examples"]), res.metrics)
            if self.tamper is not None:
                upd = self.tamper(upd)
            out.updates.append(upd)
            out.metrics[cid] = upd.metrics
        return out
