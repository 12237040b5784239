"""Privacy-utility sweeps: a grid of federated prompt-tuning runs, one CSV row per cell, plots, a table.

    post-fl sweep --config sweeps/default.toml        # run (or resume) the grid
    post-fl sweep --config sweeps/default.toml --report-only   # redraw plots and table from results.csv

A sweep file (TOML) names the grid axes and a base run config::

    output_dir = "runs/sweep-default"
    methods = ["zero_shot", "majority", "direct", "post", "teacher_dp", "rapt"]
    num_clients = [1, 10, 100]          # 1 = a single-site run
    target_epsilon = [1, 4, 8, inf]     # inf = no DP
    partitioning = ["iid", "dirichlet"] # label skew across clients (ignored for 1 client)
    dirichlet_alpha = [0.5]
    seeds = [0]
    rounds = 3                          # federated rounds per cell
    clients_per_round = 10              # sampled per round (all when fewer)
    [base]      # a RunConfig, exactly as 'post-fl run --config' reads it ([model], [data], [tune], ...)
    [federated] # optional FederatedConfig settings other than the axes (e.g. aggregation)
    [rapt]      # RAPT settings (reconstruction weight, head learning rate)
    [audit]     # membership-inference audit: which cells, how many canaries and trials

Methods, all on the same data split and the same teacher:

``zero_shot``
    the teacher without a prompt (one cell per seed).
``majority``
    a reference line, not a learner: every test example gets the most frequent label of the
    training split (one cell per seed). A prompt that does no better has learnt only the
    class prior.
``direct``
    federated DP-SGD prompt tuned on the student, used on the teacher untransferred; the
    student's own accuracy with that prompt is in ``student_accuracy``.
``post``
    the same federated DP prompt, transferred to the teacher with POST on public data.
    ``direct`` and ``post`` cells of equal parameters share one federated run.
``teacher_dp``
    federated DP-SGD prompt tuning on the teacher itself (every client runs the large model:
    the cost POST avoids).
``rapt``
    RAPT (Li et al. 2023): each client privatises its texts once, locally, with the
    d_χ-privacy token mechanism of ``post_fl.rapt`` and its labels with randomised response,
    and tunes the prompt on the teacher with the task loss plus a reconstruction loss of the
    *privatised* tokens (RAPT reconstructs the plain ones, which would put raw data into the
    uploaded update); no DP-SGD. The sweep's ε is mapped to RAPT's η by
    ``per-token ε = η · diam(φ(V))`` (see :func:`rapt_eta`), a *local, per-token* guarantee;
    the update, post-processing of the privatised data, is ``(k ε + ε_label)``-LDP per example
    of k tokens (:func:`rapt_row_privacy`), not DP-SGD's example-level (ε, δ).

The student is distilled once per sweep (into ``<output_dir>/student``) unless the base
config names one. Each finished cell is appended to ``<output_dir>/results.csv`` (and
flushed) under a stable key made of its parameters; running the sweep again skips cells
whose key has a row with ``status = ok``. A federated run interrupted mid-way resumes from
its own round checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .config import ConfigError, RunConfig, config_from_dict, read_toml
from .jsonio import jsonable

log = logging.getLogger(__name__)

METHODS = ("zero_shot", "majority", "direct", "post", "teacher_dp", "rapt")
REFERENCE_METHODS = ("zero_shot", "majority")  # one cell per seed, no clients, no privacy cost
STUDENT_METHODS = ("direct", "post")  # share one federated run on the student
PARTITIONINGS = ("iid", "dirichlet", "pathological")
RESULTS_CSV, RESULTS_MD, SETTINGS_JSON = "results.csv", "results.md", "sweep_settings.json"
CSV_COLUMNS = [
    "key", "status", "method", "num_clients", "target_epsilon", "partitioning", "dirichlet_alpha", "seed",
    "accuracy", "student_accuracy", "accuracy_privatized_inputs",
    "epsilon", "delta", "epsilon_unit", "rapt_eta", "rapt_token_epsilon", "rapt_label_epsilon",
    "rapt_example_epsilon",
    "rounds", "clients_per_round", "train_examples", "test_examples",
    "client_s_per_round", "student_s_per_client_round", "teacher_s_per_client_round", "cost_source",
    "bytes_down_per_client_round", "bytes_up_per_client_round", "model_bytes_once",
    "audit_epsilon_lb", "audit_max_epsilon_lb", "audit_tpr", "audit_fpr", "audit_observations",
    "cell_seconds", "run_dir", "error",
]
EPSILON_AXIS_NOTE = (
    "epsilon axis: direct / post / teacher_dp use example-level (epsilon, delta)-DP of DP-SGD on each "
    "client's data (delta = min(1e-5, 1/(10 n)) per client unless set); rapt uses local DP: each text token "
    "is epsilon-LDP by d_chi-privacy with eta = epsilon / diam(phi(V)) (pure, delta = 0), each label "
    "rapt.label_epsilon-LDP by randomised response, and the prompt update is trained on that privatised data "
    "only, so an example of k tokens is (k*epsilon + label epsilon)-LDP (rapt_example_epsilon). The two "
    "epsilons are NOT the same unit: equal x positions do not mean "
    "equal protection. epsilon = inf: no DP-SGD (direct/post/teacher_dp) and no privatisation (rapt).")


# ---------------------------------------------------------------- sweep file
@dataclass
class RaptSweepConfig:
    """RAPT cells: weight λ of the privatised-token reconstruction loss, the head's learning rate and
    the label privacy.

    The soft prompt uses ``base.tune.lr``; local epochs per round are ``base.tune.epochs``. Labels are
    privatised by randomised response at ``label_epsilon`` (0 = the cell's per-token ε; ignored at ε = inf).
    """

    reconstruction_weight: float = 1.0
    head_lr: float = 0.001
    label_epsilon: float = 0.0

    def validate(self) -> None:
        if self.reconstruction_weight < 0:
            raise ConfigError(f"rapt.reconstruction_weight: expected >= 0, got {self.reconstruction_weight}")
        if self.head_lr <= 0:
            raise ConfigError(f"rapt.head_lr: expected > 0, got {self.head_lr}")
        if not self.label_epsilon >= 0:
            raise ConfigError(f"rapt.label_epsilon: expected >= 0 (0 = the cell's epsilon), got {self.label_epsilon}")


@dataclass
class AuditSweepConfig:
    """Membership-inference audit by canaries, run for cells whose method, client count and target ε are listed.

    The audited mechanism is the cell's single-site prompt tuning on the student at the
    cell's target ε (DP-SGD, δ = ``delta``): ``trials`` fresh prompts of ``num_virtual_tokens``
    tokens are tuned on ``base_examples`` training examples plus a random half of ``canaries``
    canary texts (``canary_words`` random vocabulary words with a random label), each for
    ``epochs`` epochs at ``lr`` (many epochs on few examples, so a non-private prompt
    memorises); a canary's score is how much tuning lowered its loss. The first
    ``calibration_trials`` trials choose the attack's threshold, the others test it. See
    :func:`audit_prompt_tuning`.

    Power: the defaults give (100 − 8) × 256 ≈ 23,500 test observations, about 11,800 of each
    kind, so a perfect attack could certify ε ≈ 8.1 at 95 % confidence (the least that can detect a
    violation of ε = 8, :func:`post_fl.audit.observations_needed`); every row carries the
    maximum its own observation counts allow (``audit_max_epsilon_lb``).
    """

    enabled: bool = True
    methods: list[str] = field(default_factory=lambda: ["post"])
    clients: list[int] = field(default_factory=lambda: [1])
    epsilons: list[float] = field(default_factory=lambda: [8.0, math.inf])  # the claim audited; inf = attack strength
    canaries: int = 256
    canary_words: int = 8
    trials: int = 100
    calibration_trials: int = 8
    base_examples: int = 8
    num_virtual_tokens: int = 16
    epochs: float = 10.0
    lr: float = 0.3
    batch_size: int = 32
    delta: float = 1e-5
    alpha: float = 0.05

    def validate(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ConfigError(f"audit.methods: unknown method(s) {bad}; expected some of {list(METHODS)}")
        for name in ("canaries", "canary_words", "trials", "batch_size", "num_virtual_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"audit.{name}: expected >= 1, got {getattr(self, name)}")
        if self.canaries < 2:
            raise ConfigError(f"audit.canaries: expected >= 2, got {self.canaries}")
        if self.base_examples < 0:
            raise ConfigError(f"audit.base_examples: expected >= 0, got {self.base_examples}")
        if self.epochs <= 0 or self.lr <= 0:
            raise ConfigError("audit.epochs and audit.lr: expected > 0")
        if not 0 < self.delta < 1 or not 0 < self.alpha < 1:
            raise ConfigError("audit.delta and audit.alpha: expected in (0, 1)")
        if not 0 <= self.calibration_trials < self.trials:
            raise ConfigError(f"audit.calibration_trials: expected 0 <= calibration_trials < trials = {self.trials}, "
                              f"got {self.calibration_trials}")


@dataclass
class SweepConfig:
    """A privacy-utility grid: axes, federated settings per cell, and the base run config."""

    output_dir: str = "runs/sweep"
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    num_clients: list[int] = field(default_factory=lambda: [1, 10])
    target_epsilon: list[float] = field(default_factory=lambda: [1.0, 8.0, math.inf])
    partitioning: list[str] = field(default_factory=lambda: ["iid"])
    dirichlet_alpha: list[float] = field(default_factory=lambda: [0.5])
    seeds: list[int] = field(default_factory=lambda: [0])
    rounds: int = 3
    clients_per_round: int = 10
    cost_probe_steps: int = 2
    base: RunConfig = field(default_factory=RunConfig)
    federated: dict[str, Any] = field(default_factory=dict)
    rapt: RaptSweepConfig = field(default_factory=RaptSweepConfig)
    audit: AuditSweepConfig = field(default_factory=AuditSweepConfig)

    def validate(self) -> "SweepConfig":
        """Check every axis and section; raise :class:`ConfigError` naming the bad key."""
        if not self.methods:
            raise ConfigError("methods: expected at least one method")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ConfigError(f"methods: unknown method(s) {bad}; expected some of {list(METHODS)}")
        for name in ("num_clients", "target_epsilon", "partitioning", "seeds"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: expected a non-empty list")
        if any(n < 1 for n in self.num_clients):
            raise ConfigError(f"num_clients: expected values >= 1, got {self.num_clients}")
        if any(not e > 0 for e in self.target_epsilon):
            raise ConfigError(f"target_epsilon: expected values > 0 (inf = no DP), got {self.target_epsilon}")
        bad = [p for p in self.partitioning if p not in PARTITIONINGS]
        if bad:
            raise ConfigError(f"partitioning: unknown scheme(s) {bad}; expected some of {list(PARTITIONINGS)}")
        if "dirichlet" in self.partitioning and (not self.dirichlet_alpha or any(a <= 0 for a in self.dirichlet_alpha)):
            raise ConfigError(f"dirichlet_alpha: expected a non-empty list of values > 0, got {self.dirichlet_alpha}")
        if self.rounds < 1:
            raise ConfigError(f"rounds: expected >= 1, got {self.rounds}")
        if self.clients_per_round < 1:
            raise ConfigError(f"clients_per_round: expected >= 1, got {self.clients_per_round}")
        if self.cost_probe_steps < 1:
            raise ConfigError(f"cost_probe_steps: expected >= 1, got {self.cost_probe_steps}")
        from .federated import FederatedConfig

        known = {f.name for f in dataclasses.fields(FederatedConfig)}
        owned = {"rounds", "num_clients", "fraction_train", "min_clients", "partitioning", "dirichlet_alpha",
                 "checkpoint_dir", "client_cache_dir", "resume"}
        for k in self.federated:
            if k not in known:
                raise ConfigError(f"unknown setting federated.{k}; known: {', '.join(sorted(known - owned))}")
            if k in owned:
                raise ConfigError(f"federated.{k}: set by the sweep (axes num_clients, partitioning, "
                                  "dirichlet_alpha, rounds, clients_per_round); remove it")
        self.base.validate()
        self.rapt.validate()
        self.audit.validate()
        return self


_LIST_AXES = {"methods": str, "num_clients": int, "target_epsilon": float, "partitioning": str,
              "dirichlet_alpha": float, "seeds": int}
_SCALARS = {"output_dir": str, "rounds": int, "clients_per_round": int, "cost_probe_steps": int}


def _scalar(value: Any, kind: type, key: str) -> Any:
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number (or inf), got {value!r}") from None
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _list(value: Any, kind: type, key: str) -> list:
    items = value if isinstance(value, list) else [value]
    out = [_scalar(v, kind, f"{key}[{i}]") for i, v in enumerate(items)]
    if len(set(map(str, out))) != len(out):
        raise ConfigError(f"{key}: duplicate values in {value!r}")
    return out


def _section(cls: type, data: Any, name: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a table [{name}], got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(f'{name}.{u}' for u in unknown)}; "
                          f"known in [{name}]: {', '.join(sorted(fields))}")
    kwargs = {}
    for k, v in data.items():
        default = getattr(cls(), k)
        if isinstance(default, list):
            kind = type(default[0]) if default else str
            kwargs[k] = _list(v, kind, f"{name}.{k}")
        else:
            kwargs[k] = _scalar(v, type(default), f"{name}.{k}")
    return cls(**kwargs)


def sweep_config_from_dict(data: dict[str, Any]) -> SweepConfig:
    """Build and validate a :class:`SweepConfig` from nested dicts (as TOML gives); errors name the key."""
    known = set(_LIST_AXES) | set(_SCALARS) | {"base", "federated", "rapt", "audit"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown sweep setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    kwargs: dict[str, Any] = {}
    for k, kind in _LIST_AXES.items():
        if k in data:
            kwargs[k] = _list(data[k], kind, k)
    for k, kind in _SCALARS.items():
        if k in data:
            kwargs[k] = _scalar(data[k], kind, k)
    if "base" in data:
        if not isinstance(data["base"], dict):
            raise ConfigError(f"base: expected a table [base], got {data['base']!r}")
        try:
            kwargs["base"] = config_from_dict(data["base"])
        except ConfigError as exc:
            msg = str(exc).replace("unknown setting(s) ", "unknown setting(s) base.", 1) \
                if str(exc).startswith("unknown setting(s) ") else f"base.{exc}"
            raise ConfigError(msg) from None
    if "federated" in data:
        if not isinstance(data["federated"], dict):
            raise ConfigError(f"federated: expected a table [federated], got {data['federated']!r}")
        kwargs["federated"] = dict(data["federated"])
    if "rapt" in data:
        kwargs["rapt"] = _section(RaptSweepConfig, data["rapt"], "rapt")
    if "audit" in data:
        kwargs["audit"] = _section(AuditSweepConfig, data["audit"], "audit")
    return SweepConfig(**kwargs).validate()


def load_sweep_config(path: str | Path, output_dir: str | Path | None = None) -> SweepConfig:
    """Read a sweep TOML file; ``output_dir`` overrides the file's. Errors name the file and the key."""
    p = Path(path)
    data = read_toml(p, "sweep file")
    if output_dir is not None:
        data["output_dir"] = str(output_dir)
    try:
        cfg = sweep_config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    return cfg


# ---------------------------------------------------------------- cells
def _fmt_eps(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


@dataclass(frozen=True)
class Cell:
    """One point of the grid. ``key`` is stable across runs and identifies the cell in results.csv."""

    method: str
    num_clients: int = 0  # 0 for the reference methods (no training)
    target_epsilon: float = math.inf
    partitioning: str = ""
    dirichlet_alpha: float = 0.0
    seed: int = 0

    @property
    def partition_label(self) -> str:
        return f"dirichlet({self.dirichlet_alpha:g})" if self.partitioning == "dirichlet" else self.partitioning

    @property
    def key(self) -> str:
        if self.method in REFERENCE_METHODS:
            return f"{self.method}|seed={self.seed}"
        return (f"{self.method}|clients={self.num_clients}|eps={_fmt_eps(self.target_epsilon)}|"
                f"part={self.partition_label}|seed={self.seed}")

    @property
    def run_slug(self) -> str:
        """Folder name of the federated run; ``direct`` and ``post`` share the student run."""
        kind = "student" if self.method in STUDENT_METHODS else self.method
        return (f"{kind}-c{self.num_clients}-eps{_fmt_eps(self.target_epsilon)}-"
                f"{self.partition_label.replace('(', '').replace(')', '')}-s{self.seed}")


def expand_cells(cfg: SweepConfig) -> list[Cell]:
    """Every cell of the grid, in run order, without duplicates (1 client ignores partitioning)."""
    cells: list[Cell] = []
    seen: set[str] = set()

    def add(c: Cell) -> None:
        if c.key not in seen:
            seen.add(c.key)
            cells.append(c)

    parts: list[tuple[str, float]] = []
    for p in cfg.partitioning:
        parts += [(p, a) for a in cfg.dirichlet_alpha] if p == "dirichlet" else [(p, 0.0)]
    for seed in cfg.seeds:
        for m in REFERENCE_METHODS:
            if m in cfg.methods:
                add(Cell(m, seed=seed))
        for n in cfg.num_clients:
            for p, a in (parts if n > 1 else [("iid", 0.0)]):
                for eps in cfg.target_epsilon:
                    for m in cfg.methods:
                        if m not in REFERENCE_METHODS:
                            add(Cell(m, n, eps, p, a, seed))
    return cells


# ---------------------------------------------------------------- results file
def read_results(path: str | Path) -> list[dict[str, str]]:
    """Rows of a results.csv (the last row wins when a key appears twice)."""
    p = Path(path)
    if not p.is_file():
        return []
    with p.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    last: dict[str, dict] = {}
    for r in rows:
        last[r["key"]] = r
    return list(last.values())


def finished_keys(path: str | Path) -> set[str]:
    """Keys of cells that finished (status ``ok``) in a results.csv."""
    return {r["key"] for r in read_results(path) if r.get("status") == "ok"}


def append_row(path: str | Path, row: dict[str, Any]) -> None:
    """Append one cell's row to results.csv (header first if new), then flush and fsync."""
    p = Path(path)
    new = not p.is_file() or p.stat().st_size == 0
    if not new:
        with p.open(newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), [])
        if header != CSV_COLUMNS:
            raise ConfigError(f"{p} has columns {header}, expected {CSV_COLUMNS}; use a new output_dir")
    out = {}
    for k in CSV_COLUMNS:
        v = row.get(k, "")
        if isinstance(v, float):
            v = "inf" if math.isinf(v) and v > 0 else ("" if math.isnan(v) else repr(v))
        out[k] = "" if v is None else v
    with p.open("a", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        if new:
            w.writeheader()
        w.writerow(out)
        fh.flush()
        os.fsync(fh.fileno())


# ---------------------------------------------------------------- the sweep's shared state
def settings_fingerprint(cfg: SweepConfig) -> dict:
    """Every setting other than the grid axes: cells run under different ones cannot share a CSV."""
    d = jsonable({"base": {k: v for k, v in cfg.base.to_dict().items() if k not in ("output_dir", "seed")},
                  "rounds": cfg.rounds, "clients_per_round": cfg.clients_per_round,
                  "federated": cfg.federated, "rapt": dataclasses.asdict(cfg.rapt),
                  "audit": dataclasses.asdict(cfg.audit)})
    return json.loads(json.dumps(d, sort_keys=True))


class SweepContext:
    """Loaded once per sweep: the teacher, the (distilled-once) student and their directories."""

    def __init__(self, cfg: SweepConfig, progress: bool = False) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.progress = progress
        self._tasks: dict[int, Any] = {}
        self._teacher = None
        self._student_dir: Path | None = None
        self._diameter: float | None = None

    def task(self, seed: int):
        from .pipeline import load_task

        if seed not in self._tasks:
            self._tasks[seed] = load_task(dataclasses.replace(self.cfg.base, seed=seed))
        return self._tasks[seed]

    @property
    def teacher(self):
        from .pipeline import load_teacher

        if self._teacher is None:
            self._teacher = load_teacher(self.cfg.base, self.task(self.cfg.base.seed))
        return self._teacher

    @property
    def teacher_dir(self) -> Path:
        """The teacher as a model directory (teacher_dp and rapt cells run it as the 'student')."""
        from .models import resolve_model_path

        d = Path(resolve_model_path(self.cfg.base.model.teacher))
        if not (d / "model.safetensors").is_file():
            raise FileNotFoundError(f"{d}: teacher_dp/rapt cells need the teacher as a local directory with "
                                    "model.safetensors")
        return d

    @property
    def student_dir(self) -> Path:
        """The student: ``base.model.student`` or distilled once into ``<output_dir>/student``."""
        if self._student_dir is None:
            if self.cfg.base.model.student:
                self._student_dir = Path(self.cfg.base.model.student)
            else:
                d = self.out / "student"
                if not (d / "model.safetensors").is_file():
                    from .distill import distill_student, save_student

                    public = self.task(self.cfg.base.seed).public
                    train, held = public.split(0.9, self.cfg.base.seed) if len(public) >= 20 else (public, public)
                    log.info("distilling the sweep's student once into %s", d)
                    student, rep = distill_student(self.teacher, train, self.cfg.base.distill, self.cfg.base.seed,
                                                   held_out=held, progress=self.progress)
                    save_student(student, d, rep)
                self._student_dir = d
        return self._student_dir

    def embedding_diameter(self) -> float:
        """diam(φ(V)) of the teacher's input embeddings (exact for small vocabularies, else an upper bound)."""
        if self._diameter is None:
            from .rapt import per_token_epsilon

            self._diameter = float(per_token_epsilon(1.0, self.teacher.word_embeddings))
        return self._diameter


def rapt_eta(epsilon: float, diameter: float) -> float:
    """RAPT's η for a sweep ε: ``η = ε / diam(φ(V))``, so each privatised token is ε-LDP.

    d_χ-privacy gives ``P[M(x)=y] ≤ exp(η‖φ(x)−φ(x')‖) P[M(x')=y]``; the worst pair of tokens
    is ``diam`` apart, so per-token ε = η·diam. ``ε = inf`` gives ``η = inf`` (no noise).
    """
    if math.isinf(epsilon):
        return math.inf
    if diameter <= 0:
        raise ValueError(f"embedding diameter must be > 0, got {diameter}")
    return epsilon / diameter


# ---------------------------------------------------------------- transport with per-client timing
class SweepTransport:
    """In-process clients (no Flower, no Ray) that time each client's local round.

    ``client_fn(client_id, instruction, global_prompt) -> (ClientUpdate, steps, seconds)`` does the
    local work and times its own training (one-off set-up such as noise calibration excluded);
    a client that raises (e.g. an empty Dirichlet partition) is reported as failed and the
    round goes on with the others, as :class:`post_fl.federated.FederatedServer` expects.
    """

    def __init__(self, num_clients: int, client_fn: Callable) -> None:
        self.num_clients = num_clients
        self.client_fn = client_fn
        self.client_seconds: list[float] = []
        self.client_steps: list[int] = []
        self.bytes_down = 0
        self.bytes_up = 0

    def client_ids(self) -> list[int]:
        return list(range(self.num_clients))

    def train_round(self, server_round: int, prompt: np.ndarray, instructions: dict[int, dict]):
        from .federated import RoundReplies

        out = RoundReplies()
        for cid, ins in sorted(instructions.items()):
            try:
                upd, steps, seconds = self.client_fn(cid, ins, prompt)
            except ValueError as exc:
                out.failures[cid] = str(exc)
                continue
            self.client_seconds.append(seconds)
            self.client_steps.append(steps)
            self.bytes_down = max(self.bytes_down, int(np.asarray(prompt, np.float32).nbytes))
            self.bytes_up = max(self.bytes_up, int(np.asarray(upd.delta).nbytes))
            out.updates.append(upd)
            out.metrics[cid] = upd.metrics
        return out


def _dp_client_fn(server, run_cfg: RunConfig, fed) -> Callable:
    """A client doing ``post_fl.federated.train_client`` (DP-SGD on its partition), with its state."""
    from .aggregate import ClientUpdate
    from .federated import client_partition, open_ledger, train_client

    seen: set[int] = set()

    def fn(cid: int, ins: dict, prompt: np.ndarray):
        data = client_partition(run_cfg, fed, cid)
        if run_cfg.tune.private and len(data) and cid not in seen:
            _warm_noise_calibration(run_cfg, fed, len(data))
        seen.add(cid)
        ledger = open_ledger(run_cfg, data, cid) if run_cfg.tune.private and len(data) else None
        t0 = time.perf_counter()
        res = train_client(server.student, prompt, data, run_cfg, fed, ins["round"], cid, ins["clip"], ledger,
                           run_id="sweep")
        return (ClientUpdate(cid, res.delta, res.metrics.get("num-examples"), res.metrics),
                int(res.private["steps"]), time.perf_counter() - t0)

    return fn


def _warm_noise_calibration(run_cfg: RunConfig, fed, n: int) -> None:
    """Calibrate a client's DP-SGD noise multiplier before its round is timed (one-off, memoised)."""
    from . import federated
    from .tuning import planned_steps

    warm = getattr(federated, "_calibrated_sigma", None)
    if warm is not None:
        warm(run_cfg.tune, n, fed.rounds * planned_steps(run_cfg.tune, n))


# ---------------------------------------------------------------- RAPT clients
def privatize_batch(model, batch, eta: float, generator: torch.Generator | None = None):
    """RAPT's local step: replace each text token by its d_χ-privatised nearest neighbour (template kept).

    Returns ``(privatised EncodedBatch, body mask)``; η = inf returns the tokens unchanged.
    """
    from .models import EncodedBatch
    from .rapt import privatize_token_ids

    mask = model.text_positions(batch)
    tok = model.tokenizer
    special = sorted(set(tok.all_special_ids) | ({tok.pad_token_id} if tok.pad_token_id is not None else set()))
    ids = privatize_token_ids(batch.input_ids, model.word_embeddings, eta, generator, special_ids=special,
                              attention_mask=mask)
    return EncodedBatch(ids, batch.attention_mask, batch.answer_index), mask


def scores_and_hidden(model, input_ids, attention_mask, answer_index, prompt):
    """Class scores and the text positions' hidden states of one prompted forward pass."""
    hidden, mask, n_prompt = model.hidden_states(input_ids, attention_mask, prompt)
    scores = model.class_scores(model.answer_logits_from_hidden(hidden, mask, n_prompt, answer_index))
    return scores, hidden[:, n_prompt:]


RAPT_STREAM = 7  # stream id of RAPT's privatisation in the insecure (seeded) mode of post_fl.randomness


@dataclass
class RaptPrivateData:
    """A RAPT client's training data after local privatisation: everything its update may depend on.

    ``batch``: the d_χ-privatised token ids (template kept); ``targets``: the reconstruction
    targets, the *privatised* ids at text positions (-100 elsewhere); ``labels``: labels after
    randomised response; ``max_text_tokens``: the most privatised tokens in one example (for
    the per-example guarantee ``k · ε_token + ε_label``).
    """

    batch: Any
    targets: torch.Tensor
    labels: torch.Tensor
    max_text_tokens: int


def privatize_client_data(model, data, eta: float, label_epsilon: float, generator: torch.Generator | None):
    """RAPT's local privatisation of a client's examples: d_χ on every text token, randomised response on labels.

    Returns :class:`RaptPrivateData`. The reconstruction targets are the privatised tokens, not the
    plain ones, so nothing downstream touches raw data (see :mod:`post_fl.rapt`).
    """
    from .rapt import randomized_response

    batch = model.encode(data.texts)
    priv, mask = privatize_batch(model, batch, eta, generator)
    targets = torch.where(mask.bool(), priv.input_ids, torch.full_like(priv.input_ids, -100))
    labels = randomized_response(torch.tensor(data.labels), len(data.label_names), label_epsilon, generator)
    return RaptPrivateData(priv, targets, labels, int(mask.sum(1).max()) if len(mask) else 0)


def rapt_local_round(model, private: "RaptPrivateData", head, prompt_np: np.ndarray, tune, rapt_cfg, seed: int):
    """One RAPT client round on *privatised* data only: task loss + λ · reconstruction loss of the privatised tokens.

    Returns ``(prompt update, steps, mean loss, seconds)``. The batch order follows ``seed``;
    it needs no privacy, the update being post-processing of the privatised data.
    """
    from .prompt import SoftPrompt
    from .rapt import reconstruction_loss
    from .tuning import planned_steps

    priv, targets, labels = private.batch, private.targets, private.labels
    prompt = SoftPrompt(torch.from_numpy(np.array(prompt_np, dtype=np.float32)))
    opt = torch.optim.Adam([{"params": prompt.parameters(), "lr": tune.lr},
                            {"params": head.parameters(), "lr": rapt_cfg.head_lr}])
    n = len(labels)
    steps = planned_steps(tune, n)
    bs = min(tune.batch_size, n)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randperm(n, generator=gen)[:bs]
        width = int(priv.attention_mask[idx].sum(1).max())
        ids, att = priv.input_ids[idx, :width], priv.attention_mask[idx, :width]
        scores, hidden = scores_and_hidden(model, ids, att, priv.answer_index[idx], prompt)
        loss = torch.nn.functional.cross_entropy(scores, labels[idx])
        if rapt_cfg.reconstruction_weight > 0:
            loss = loss + rapt_cfg.reconstruction_weight * reconstruction_loss(head, hidden, targets[idx, :width], att)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    delta = prompt.weight.detach().numpy().astype(np.float32) - np.asarray(prompt_np, np.float32)
    return delta, steps, float(np.mean(losses)), time.perf_counter() - t0


def rapt_label_epsilon(rapt_cfg: "RaptSweepConfig", token_epsilon: float) -> float:
    """The randomised-response ε of a RAPT cell: ``rapt.label_epsilon``, or the cell's per-token ε when 0."""
    return rapt_cfg.label_epsilon if rapt_cfg.label_epsilon > 0 else token_epsilon


def rapt_row_privacy(token_epsilon: float, label_epsilon: float, max_text_tokens) -> dict[str, Any]:
    """The privacy columns of a RAPT row: per-token, per-label and per-example local ε, and what they cover.

    The uploaded prompt update is trained only on privatised tokens and randomised-response labels, so
    it is post-processing of local DP: an example of k text tokens is ``(k ε_token + ε_label)``-LDP
    (pure, δ = 0). ``max_text_tokens`` (client id -> the most tokens in one of its examples) gives the
    worst k. ``epsilon`` holds that per-example bound (inf without privatisation).
    """
    if math.isinf(token_epsilon):
        return {"epsilon": math.inf, "delta": 0.0, "rapt_token_epsilon": math.inf, "rapt_label_epsilon": math.inf,
                "rapt_example_epsilon": math.inf, "epsilon_unit": "none (no privatisation; the update uses raw data)"}
    k = max((int(v) for v in (max_text_tokens or {}).values()), default=0)
    example = k * token_epsilon + label_epsilon if max_text_tokens else math.inf
    return {"epsilon": example, "delta": 0.0, "rapt_token_epsilon": token_epsilon, "rapt_label_epsilon": label_epsilon,
            "rapt_example_epsilon": example,
            "epsilon_unit": (f"local DP per example: {k} tokens x {token_epsilon:g} (d_chi) + label {label_epsilon:g} "
                             "(randomised response); the prompt update is post-processing of the privatised data")}


def _rapt_client_fn(server, run_cfg: RunConfig, fed, eta: float, rapt_cfg: RaptSweepConfig,
                    label_epsilon: float = math.inf) -> Callable:
    """A RAPT client: privatise its partition once, locally (d_χ tokens, randomised-response labels), then
    tune prompt + reconstruction head on the privatised data only.

    The privatisation noise comes from :func:`post_fl.randomness.dp_torch_generator` (fresh OS entropy;
    the config seed only in ``insecure_reproducible`` mode). ``fn.max_text_tokens`` records, per client,
    the most privatised tokens in one example (for the per-example guarantee).
    """
    from .aggregate import ClientUpdate
    from .federated import client_partition, derive_seed
    from .randomness import dp_torch_generator
    from .rapt import ReconstructionHead

    private: dict[int, RaptPrivateData] = {}
    heads: dict[int, ReconstructionHead] = {}
    model = server.student  # the teacher, loaded as the federation's model
    insecure_seed = run_cfg.seed if run_cfg.insecure_reproducible else None

    def fn(cid: int, ins: dict, prompt_np: np.ndarray):
        data = client_partition(run_cfg, fed, cid)
        if len(data) == 0:
            raise ValueError(f"client {cid}: empty partition")
        if cid not in private:  # privatised once: later rounds are post-processing, no further privacy cost
            private[cid] = privatize_client_data(model, data, eta, label_epsilon,
                                                 dp_torch_generator(insecure_seed, RAPT_STREAM, cid))
            fn.max_text_tokens[cid] = private[cid].max_text_tokens
            heads[cid] = ReconstructionHead(model.embedding_dim, model.word_embeddings, mlp=False)
        seed = derive_seed(run_cfg.seed, ins["round"], cid, RAPT_STREAM)  # batch order only: post-processing
        torch.manual_seed(seed)
        delta, steps, loss, seconds = rapt_local_round(model, private[cid], heads[cid], prompt_np, run_cfg.tune,
                                                       rapt_cfg, seed)
        n = len(private[cid].labels)
        metrics = {"num-examples": n, "loss": loss, "epsilon": math.inf, "delta": 0.0,
                   "steps": steps, "noise-multiplier": 0.0, "sample-rate": min(run_cfg.tune.batch_size, n) / n}
        return ClientUpdate(cid, delta, n, metrics), steps, seconds

    fn.max_text_tokens = {}
    return fn


# ---------------------------------------------------------------- cost probe
def seconds_per_step(model, data, tune, steps: int, seed: int) -> float:
    """Wall seconds of one (DP-)SGD prompt-tuning step on ``model``.

    Timed as (T(2k steps) − T(k steps)) / k, so the fixed cost of a tuning call (tokenising the
    client's data, Opacus set-up) cancels; the noise multiplier is fixed (its calibration is a
    one-off, and sigma does not change a step's cost).
    """
    from .prompt import init_from_vocab
    from .tuning import tune_prompt

    n = max(len(data), 1)

    def run(k: int) -> tuple[float, int]:
        cfg = dataclasses.replace(tune, epochs=max(k * tune.batch_size / n, 1e-6))
        prompt = init_from_vocab(model.word_embeddings, 4, torch.Generator().manual_seed(seed))
        res = tune_prompt(model, prompt, data, cfg, seed=seed, noise_multiplier=1.0 if cfg.private else None)
        return res.seconds, res.steps

    t1, s1 = run(steps)
    t2, s2 = run(2 * steps)
    if s2 > s1 and t2 > t1:
        return (t2 - t1) / (s2 - s1)
    return t2 / max(s2, 1)


# ---------------------------------------------------------------- audit
def make_canaries(model, label_names: list[str], count: int, words: int, seed: int):
    """Canary texts of random whole vocabulary words with random labels (a TextDataset)."""
    import random

    from .data import TextDataset

    rng = random.Random(seed)
    vocab = [w for w in model.tokenizer.get_vocab() if w.isalpha() and w.isascii() and w.islower() and len(w) > 2]
    if len(vocab) < words:
        vocab = [w for w in model.tokenizer.get_vocab() if w.isalpha()]
    vocab.sort()
    texts = [" ".join(rng.sample(vocab, min(words, len(vocab)))) for _ in range(count)]
    labels = [rng.randrange(len(label_names)) for _ in range(count)]
    return TextDataset(texts, labels, list(label_names))


@torch.no_grad()
def _canary_losses(model, canaries, prompt) -> np.ndarray:
    batch = model.encode(canaries.texts)
    scores = model(batch, prompt)
    return torch.nn.functional.cross_entropy(scores, torch.tensor(canaries.labels), reduction="none").numpy()


def audit_prompt_tuning(model, base_data, target_epsilon: float, audit: AuditSweepConfig, tune, seed: int):
    """Canary membership-inference audit of prompt tuning at ``target_epsilon``: an empirical ε lower bound.

    Each of ``audit.trials`` trials tunes a fresh prompt (DP-SGD at ``target_epsilon``,
    δ = ``audit.delta``, fresh DP noise every trial; none when inf) on ``base_data`` plus a
    random half of the canaries.
    A canary's membership score is its loss under the initial prompt minus its loss under the
    tuned prompt (how much tuning taught the prompt *that* text's label). Scores of included
    canaries are member observations, the others non-member ones;
    :func:`post_fl.audit.epsilon_lower_bound_from_scores` turns them into a Clopper-Pearson
    lower bound on ε at confidence 1 − ``audit.alpha``: the threshold is chosen on the first
    ``audit.calibration_trials`` trials and tested on the rest (Bonferroni over all thresholds
    when 0). Returns :class:`post_fl.audit.AuditResult`, whose ``max_epsilon_lower_bound`` is the
    most these observation counts could show.
    """
    from .audit import audit_by_canaries
    from .data import TextDataset
    from .prompt import init_from_vocab
    from .tuning import tune_prompt

    canaries = make_canaries(model, base_data.label_names, audit.canaries, audit.canary_words, seed + 101)
    cfg = dataclasses.replace(tune, target_epsilon=target_epsilon, dp=math.isfinite(target_epsilon),
                              delta=audit.delta, epochs=audit.epochs, lr=audit.lr, batch_size=audit.batch_size)
    sigma = None
    if cfg.private:  # one noise multiplier for every trial, calibrated for the worst case of q and steps
        from opacus.accountants.utils import get_noise_multiplier

        from .tuning import planned_steps, sample_rate

        n_min, n_max = max(len(base_data), 1), len(base_data) + len(canaries)
        sigma = float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=audit.delta,
                                           sample_rate=sample_rate(cfg, n_min), steps=planned_steps(cfg, n_max),
                                           accountant=cfg.accountant))
    counter = iter(range(10**6))

    def train_fn(included: list[int]):
        trial = next(counter)
        data = TextDataset(base_data.texts + [canaries.texts[i] for i in included],
                           base_data.labels + [canaries.labels[i] for i in included], list(base_data.label_names))
        prompt = init_from_vocab(model.word_embeddings, audit.num_virtual_tokens,
                                 torch.Generator().manual_seed(seed * 1000 + trial))
        before = _canary_losses(model, canaries, prompt)
        if len(data) == 0:
            return np.zeros(len(canaries))
        res = tune_prompt(model, prompt, data, cfg, seed=seed * 1000 + trial, noise_multiplier=sigma)
        if cfg.private and res.epsilon > target_epsilon * 1.001:
            raise RuntimeError(f"audit trial spent epsilon {res.epsilon:.3f} > target {target_epsilon}")
        return before - _canary_losses(model, canaries, res.prompt)

    return audit_by_canaries(train_fn, lambda scores, i: float(scores[i]), list(range(len(canaries))),
                             audit.trials, audit.delta, audit.alpha, seed=seed,
                             calibration_trials=audit.calibration_trials)


# ---------------------------------------------------------------- one cell
def _cell_configs(ctx: SweepContext, cell: Cell, model_dir: Path, run_dir: Path):
    from .federated import FederatedConfig

    cfg = ctx.cfg
    base = cfg.base
    private = math.isfinite(cell.target_epsilon) and cell.method != "rapt"
    run_cfg = dataclasses.replace(
        base, seed=cell.seed, output_dir=str(run_dir),
        model=dataclasses.replace(base.model, student=str(model_dir)),
        tune=dataclasses.replace(base.tune, target_epsilon=cell.target_epsilon if private else math.inf,
                                 dp=private and base.tune.dp),
        transfer=(base.transfer if cell.method in STUDENT_METHODS else dataclasses.replace(base.transfer, steps=0)))
    n = cell.num_clients
    fed = config_from_dict({**cfg.federated, "rounds": cfg.rounds, "num_clients": n,
                            "fraction_train": min(1.0, cfg.clients_per_round / n), "min_clients": 1,
                            "partitioning": cell.partitioning or "iid",
                            "dirichlet_alpha": cell.dirichlet_alpha or 0.5, "eval_every": cfg.rounds,
                            "client_cache_dir": str(ctx.out / "client-cache"), "resume": True}, FederatedConfig)
    return run_cfg, fed


def _federated_run(ctx: SweepContext, cell: Cell) -> dict:
    """Run (or reuse) the federated run behind a cell; returns its summary (accuracies, privacy, cost)."""
    from .jsonio import read_json, write_json
    from .federated import FederatedServer, client_partition, run_federated

    run_dir = ctx.out / "runs" / cell.run_slug
    summary_path = run_dir / "sweep_summary.json"
    if summary_path.is_file():
        return read_json(summary_path)
    model_dir = ctx.student_dir if cell.method in STUDENT_METHODS else ctx.teacher_dir
    run_cfg, fed = _cell_configs(ctx, cell, model_dir, run_dir)
    server = FederatedServer(run_cfg, fed, run_dir, report=log.info)
    server.prepare()
    eta = math.inf
    if cell.method == "rapt":
        eta = rapt_eta(cell.target_epsilon, ctx.embedding_diameter())
        client_fn = _rapt_client_fn(server, run_cfg, fed, eta, ctx.cfg.rapt,
                                    rapt_label_epsilon(ctx.cfg.rapt, cell.target_epsilon))
    else:
        client_fn = _dp_client_fn(server, run_cfg, fed)
    transport = SweepTransport(fed.num_clients, client_fn)
    client_partition(run_cfg, fed, 0)  # split once before timing
    summary: dict[str, Any] = {"eta": eta}
    if cell.method == "rapt":  # the guarantee's k: the most privatised tokens of one training example
        summary["rapt_max_text_tokens"] = client_fn.max_text_tokens
    bs = run_cfg.eval.batch_size
    if cell.method in STUDENT_METHODS:
        results = run_federated(server, transport)
        acc = results["accuracy"]
        summary.update(student_accuracy=acc["student_federated_prompt"], direct=acc.get("teacher_direct_prompt"),
                       post=acc["teacher_transferred_prompt"])
    else:
        server_prompt_rounds(server, transport)
        summary["accuracy"] = server.metrics[-1]["test_accuracy"]
        if cell.method == "rapt":
            from .prompt import SoftPrompt

            prompt = SoftPrompt(torch.from_numpy(server.prompt.copy()))
            test = server.test
            priv, _ = privatize_batch(server.student, server.student.encode(test.texts), eta,
                                      torch.Generator().manual_seed(cell.seed + 99))
            with torch.no_grad():
                preds = torch.cat([server.student(priv.rows(slice(i, i + bs)), prompt).argmax(-1)
                                   for i in range(0, len(test), bs)])
            summary["accuracy_privatized_inputs"] = float((preds == torch.tensor(test.labels)).float().mean())
    per_client = server.client_privacy().values()  # the clients' ledgers (every client that trained)
    eps = [float(r.get("epsilon", math.inf)) for r in per_client]
    deltas = [float(r.get("delta", 0.0)) for r in per_client if r.get("delta") is not None]
    private = run_cfg.tune.private
    summary.update(
        epsilon=max(eps) if (eps and private) else math.inf, delta=max(deltas) if (deltas and private) else 0.0,
        train_examples=len(server.train), test_examples=len(server.test),
        client_s_per_round=float(np.mean(transport.client_seconds)) if transport.client_seconds else math.nan,
        steps_per_client_round=float(np.mean(transport.client_steps)) if transport.client_steps else math.nan,
        bytes_down=transport.bytes_down or int(server.prompt.nbytes),
        bytes_up=transport.bytes_up or int(server.prompt.nbytes),
        model_bytes_once=int(sum(np.asarray(v).nbytes for v in server.package.weights.values())
                             + sum(len(b) for b in server.package.files.values())))
    # the other model's cost: a short probe on this cell's client-0 data, scaled to a client's round
    probe_data = client_partition(run_cfg, fed, 0)
    if len(probe_data):
        if cell.method in STUDENT_METHODS:
            sps = seconds_per_step(ctx.teacher, probe_data, run_cfg.tune, ctx.cfg.cost_probe_steps, cell.seed)
            summary["teacher_s_per_client_round"] = sps * summary["steps_per_client_round"]
            summary["student_s_per_client_round"] = summary["client_s_per_round"]
        else:
            from .pipeline import load_student

            student = load_student(ctx.student_dir, run_cfg, ctx.task(ctx.cfg.base.seed), ctx.teacher)
            sps = seconds_per_step(student, probe_data, run_cfg.tune, ctx.cfg.cost_probe_steps, cell.seed)
            summary["student_s_per_client_round"] = sps * summary["steps_per_client_round"]
            summary["teacher_s_per_client_round"] = summary["client_s_per_round"]  # server.student is the teacher
    write_json(summary, summary_path)
    return summary


def server_prompt_rounds(server, transport) -> None:
    """The round loop of :func:`post_fl.federated.run_federated` without the POST transfer at the end."""
    server.prepare()
    ids = transport.client_ids()
    for rnd in range(server.round + 1, server.fed.rounds + 1):
        sampled = server.sample(rnd, ids)
        server.complete_round(rnd, sampled, transport.train_round(rnd, server.prompt,
                                                                  server.instructions(rnd, sampled)))


def run_cell(ctx: SweepContext, cell: Cell) -> dict[str, Any]:
    """Run one cell and return its CSV row (accuracy, privacy spent, cost, optional audit)."""
    from .evaluate import accuracy, majority_class_accuracy

    t0 = time.perf_counter()
    cfg = ctx.cfg
    row: dict[str, Any] = {"key": cell.key, "status": "ok", "method": cell.method, "seed": cell.seed}
    if cell.method in REFERENCE_METHODS:
        task = ctx.task(cell.seed)
        if cell.method == "zero_shot":
            acc, unit = (accuracy(ctx.teacher, task.test, None, cfg.base.eval.batch_size),
                         "none (no private data used)")
        else:
            acc, unit = (majority_class_accuracy(task.train.labels, task.test.labels),
                         "none (reference: the training split's most frequent label)")
        row.update(accuracy=acc, test_examples=len(task.test), train_examples=len(task.train), epsilon=0.0,
                   delta=0.0, epsilon_unit=unit, cell_seconds=time.perf_counter() - t0)
        return row
    row.update(num_clients=cell.num_clients, target_epsilon=cell.target_epsilon, partitioning=cell.partitioning,
               dirichlet_alpha=cell.dirichlet_alpha if cell.partitioning == "dirichlet" else "",
               rounds=cfg.rounds, clients_per_round=min(cell.num_clients, cfg.clients_per_round),
               run_dir=str(Path("runs") / cell.run_slug))
    s = _federated_run(ctx, cell)
    if cell.method in STUDENT_METHODS:
        row["accuracy"] = s[cell.method]
        row["student_accuracy"] = s["student_accuracy"]
    else:
        row["accuracy"] = s["accuracy"]
        row["accuracy_privatized_inputs"] = s.get("accuracy_privatized_inputs", "")
    if cell.method == "rapt":
        row.update(rapt_row_privacy(cell.target_epsilon, rapt_label_epsilon(cfg.rapt, cell.target_epsilon),
                                    s.get("rapt_max_text_tokens")), rapt_eta=s["eta"])
    else:
        row.update(epsilon=s["epsilon"], delta=s["delta"],
                   epsilon_unit="example-level DP-SGD (max over clients)" if math.isfinite(cell.target_epsilon)
                   else "none (no DP)")
    measured = "student" if cell.method in STUDENT_METHODS else "teacher"
    row.update(train_examples=s["train_examples"], test_examples=s["test_examples"],
               client_s_per_round=s["client_s_per_round"],
               student_s_per_client_round=s.get("student_s_per_client_round", ""),
               teacher_s_per_client_round=s.get("teacher_s_per_client_round", ""),
               cost_source=f"{measured} measured in the run; the other model probed for "
                           f"{cfg.cost_probe_steps} steps on client 0 data",
               bytes_down_per_client_round=s["bytes_down"], bytes_up_per_client_round=s["bytes_up"],
               model_bytes_once=s["model_bytes_once"])
    a = cfg.audit
    if a.enabled and cell.method in a.methods and cell.num_clients in a.clients and \
            float(cell.target_epsilon) in [float(e) for e in a.epsilons]:
        from .pipeline import load_student

        task = ctx.task(cell.seed)
        student = load_student(ctx.student_dir, cfg.base, task, ctx.teacher)
        base = task.train.shuffled(cell.seed + 17).head(a.base_examples) if a.base_examples else \
            task.train.subset([])
        res = audit_prompt_tuning(student, base, cell.target_epsilon, a, cfg.base.tune, cell.seed)
        row.update(audit_epsilon_lb=res.epsilon_lower_bound, audit_max_epsilon_lb=res.max_epsilon_lower_bound,
                   audit_tpr=res.tpr, audit_fpr=res.fpr, audit_observations=res.n_members + res.n_nonmembers)
    row["cell_seconds"] = time.perf_counter() - t0
    return row


# ---------------------------------------------------------------- the sweep
def _check_settings(cfg: SweepConfig) -> None:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    p = out / SETTINGS_JSON
    current = settings_fingerprint(cfg)
    if p.is_file():
        saved = json.loads(p.read_text())
        if saved != current:
            diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            raise ConfigError(f"{out} holds a sweep run with other settings ({', '.join(diff)} differ); "
                              "use another output_dir (only the grid axes may change between runs)")
    else:
        p.write_text(json.dumps(current, indent=2, sort_keys=True))


def run_sweep(cfg: SweepConfig, progress: bool = False, report: Callable[[str], None] | None = None) -> list[dict]:
    """Run every unfinished cell of the grid, appending a row per cell; then write plots and the table.

    Resumable: cells whose key already has a row with status ``ok`` in results.csv are
    skipped. A cell that fails is recorded with ``status = error`` (and retried next time).
    Returns the rows of results.csv.
    """
    say = report or log.info
    _check_settings(cfg)
    out = Path(cfg.output_dir)
    csv_path = out / RESULTS_CSV
    done = finished_keys(csv_path)
    cells = expand_cells(cfg)
    todo = [c for c in cells if c.key not in done]
    say(f"sweep: {len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run -> {csv_path}")
    ctx = SweepContext(cfg, progress)
    for i, cell in enumerate(todo, start=1):
        t0 = time.perf_counter()
        try:
            row = run_cell(ctx, cell)
        except (ValueError, RuntimeError, FileNotFoundError) as exc:
            log.exception("cell %s failed", cell.key)
            row = {"key": cell.key, "status": "error", "method": cell.method, "seed": cell.seed,
                   "num_clients": cell.num_clients, "target_epsilon": cell.target_epsilon,
                   "partitioning": cell.partitioning, "error": f"{type(exc).__name__}: {exc}"}
        append_row(csv_path, row)
        acc = row.get("accuracy")
        say(f"[{i}/{len(todo)}] {cell.key}: {row['status']}"
            + (f", accuracy {acc:.3f}" if isinstance(acc, float) else "")
            + f" ({time.perf_counter() - t0:.1f}s)")
    rows = read_results(csv_path)
    write_report(rows, out)
    return rows


def write_report(rows: list[dict], out: str | Path) -> dict[str, Path]:
    """Plots (PNG) and the Markdown table of a sweep's rows into ``out``; returns their paths."""
    from .plots import plot_accuracy_vs_clients, plot_accuracy_vs_epsilon

    out = Path(out)
    paths = {"markdown": out / RESULTS_MD,
             "accuracy_vs_epsilon": out / "plots" / "accuracy_vs_epsilon.png",
             "accuracy_vs_clients": out / "plots" / "accuracy_vs_clients.png"}
    ok = [r for r in rows if r.get("status") == "ok"]
    plot_accuracy_vs_epsilon(ok, paths["accuracy_vs_epsilon"], caption=EPSILON_AXIS_NOTE)
    plot_accuracy_vs_clients(ok, paths["accuracy_vs_clients"], caption=EPSILON_AXIS_NOTE)
    paths["markdown"].write_text(markdown_table(rows))
    return paths


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _cellfmt(vals: list[float], digits: int = 3) -> str:
    vals = [v for v in vals if not math.isnan(v)]
    if not vals:
        return ""
    m = float(np.mean(vals))
    if math.isinf(m):
        return "inf"
    if len(vals) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {float(np.std(vals)):.{digits}f}"


def _delta_cell(group: list[dict]) -> str:
    """The δ of a group's ε (the largest over seeds), in scientific notation; '' when none."""
    d = [_num(r.get("delta")) for r in group]
    d = [v for v in d if math.isfinite(v)]
    return ("0" if max(d) == 0 else f"{max(d):.0e}") if d else ""


def _audit_cell(group: list[dict]) -> str:
    """``lb (max M)``: the audit's ε lower bound beside the most its observation counts could show."""
    lb = _cellfmt([_num(r.get("audit_epsilon_lb")) for r in group], 2)
    mx = [_num(r.get("audit_max_epsilon_lb")) for r in group]
    mx = [v for v in mx if math.isfinite(v)]
    return lb if lb in ("", "–") or not mx else f"{lb} (max {min(mx):.2f})"


def markdown_table(rows: list[dict]) -> str:
    """A Markdown table of a sweep: one line per cell (seeds averaged, ± std), with the ε-axis caveat."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        k = (r["method"], r.get("num_clients", ""), r.get("partitioning", ""), r.get("dirichlet_alpha", ""),
             r.get("target_epsilon", ""))
        groups.setdefault(k, []).append(r)
    order = {m: i for i, m in enumerate(METHODS)}
    keys = sorted(groups, key=lambda k: (order.get(k[0], 99), _num(k[1]) if k[1] else 0, k[2], k[3],
                                         _num(k[4]) if k[4] else 0))
    lines = ["| method | clients | partitioning | target ε | accuracy | student acc. | ε spent | δ | audit ε lb (max) | "
             "s/client/round (student) | s/client/round (teacher) | bytes/client/round (up) | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in keys:
        g = groups[k]
        part = k[2] + (f"(α={k[3]})" if k[2] == "dirichlet" else "")
        col = lambda name, d=3: _cellfmt([_num(r.get(name)) for r in g], d)  # noqa: E731
        lines.append(f"| {k[0]} | {k[1] or '–'} | {part or '–'} | {k[4] or '–'} | {col('accuracy')} | "
                     f"{col('student_accuracy')} | {col('epsilon', 2)} | {_delta_cell(g)} | {_audit_cell(g)} | "
                     f"{col('student_s_per_client_round', 2)} | {col('teacher_s_per_client_round', 2)} | "
                     f"{col('bytes_up_per_client_round', 0)} | {len(g)} |")
    errors = [r for r in rows if r.get("status") != "ok"]
    text = "\n".join(lines) + "\n\n" + "Note on the " + EPSILON_AXIS_NOTE + "\n"
    text += ("\nAccuracy is test accuracy of the teacher (student for `student acc.`); ± is the std over "
             "seeds. The non-measured model's seconds come from a short probe (see `cost_source`).\n")
    if errors:
        text += "\nFailed cells (rerun the sweep to retry): " + ", ".join(f"`{r['key']}`" for r in errors) + "\n"
    return text


# ---------------------------------------------------------------- CLI
def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, required=True,
                   help="sweep file (TOML): grid axes + [base] run config, e.g. sweeps/default.toml")
    p.add_argument("--output-dir", "-o", type=Path, default=None,
                   help="where results.csv, results.md and plots/ go (default: output_dir in the sweep file)")
    p.add_argument("--dry-run", action="store_true", help="list the cells (and which are done) and exit")
    p.add_argument("--report-only", action="store_true",
                   help="only redraw plots and the Markdown table from an existing results.csv")
    p.add_argument("--quiet", "-q", action="store_true", help="warnings only")


def _run_cli(args) -> int:
    cfg = load_sweep_config(args.config, args.output_dir)
    out = Path(cfg.output_dir)
    if args.dry_run:
        done = finished_keys(out / RESULTS_CSV)
        for c in expand_cells(cfg):
            print(("done  " if c.key in done else "todo  ") + c.key)
        return 0
    if args.report_only:
        rows = read_results(out / RESULTS_CSV)
        if not rows:
            print(f"post-fl sweep: error: {out / RESULTS_CSV} has no rows", file=sys.stderr)
            return 2
        paths = write_report(rows, out)
    else:
        from .preflight import check_run

        check_run(cfg.base, check_folder=False)  # every input of the base run checked before any cell starts
        run_sweep(cfg, progress=not args.quiet, report=print)
        paths = {"markdown": out / RESULTS_MD, "plots": out / "plots"}
    print(f"sweep results: {out / RESULTS_CSV}; table: {paths['markdown']}; plots: {out / 'plots'}")
    return 0


CLI_COMMANDS = {
    "sweep": ("privacy-utility sweep: accuracy of zero-shot / direct / POST / teacher-DP / RAPT over clients, "
              "epsilon and partitioning -> results.csv, plots, Markdown table (resumable)",
              _add_arguments, _run_cli),
}
