"""The sweep file and its grid: :class:`SweepConfig` (axes, base run config, [rapt], [audit]) read
from TOML, and the grid expanded into cells (:class:`Cell`), each under a stable key.

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
    examples_per_client = [0]           # 0 = the training set split among the clients; n > 0 = n each
    dp_level = ["sample"]               # "sample" = DP-SGD per client; "user" = DP-FedAvg (user level)
    extra_seeds = []                    # more seeds, run only at the epsilons in extra_seeds_at_epsilon
    extra_seeds_at_epsilon = []
    engine = "sequential"               # or "batched": DP-SGD clients of direct/post/teacher_dp in shared passes
    [base]      # a RunConfig, exactly as 'post-fl run --config' reads it ([model], [data], [tune], ...)
    [federated] # optional FederatedConfig settings other than the axes (e.g. aggregation)
    [rapt]      # RAPT settings (reconstruction weight, head learning rate)
    [audit]     # membership-inference audit: which cells, how many canaries and trials
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.config import ConfigError, RunConfig, config_from_dict, read_toml



METHODS = ("zero_shot", "calibrated_zero_shot", "majority", "direct", "post", "teacher_dp", "rapt")
DEFAULT_METHODS = ("zero_shot", "majority", "direct", "post", "teacher_dp", "rapt")  # a file without `methods`
REFERENCE_METHODS = ("zero_shot", "calibrated_zero_shot", "majority")  # one cell per seed, no clients, no privacy
DP_LEVELS = ("sample", "user")  # DP-SGD per client (example level) | DP-FedAvg (user level)
ENGINES = ("sequential", "batched")
STUDENT_METHODS = ("direct", "post")  # share one federated run on the student
PARTITIONINGS = ("iid", "dirichlet", "pathological")
RESULTS_CSV, RESULTS_MD, SETTINGS_JSON = "results.csv", "results.md", "sweep_settings.json"


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
    violation of ε = 8, :func:`post_fl.privacy.audit.observations_needed`); every row carries the
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
    """A privacy-utility grid: axes, federated settings per cell, and the base run config.

    Axes beyond methods x clients x epsilon x partitioning x seeds:

    * ``examples_per_client``: 0 (default) splits the base training set among the clients (fixed
      total); ``n > 0`` gives each of K clients exactly ``n`` examples, ``n K`` drawn from the
      training set (the base config's, after ``base.data.max_train_examples``); iid only.
    * ``dp_level``: ``sample`` (default) = example-level DP-SGD on each client; ``user`` =
      DP-FedAvg: clients train without DP-SGD, the server clips each update to
      ``federated.user_dp_clip`` and adds Gaussian noise calibrated to the cell's ε over the
      rounds (``user_dp_noise = server``: secure aggregation is not simulated in-process, so the
      guarantee trusts the server). Skipped for 1 client; ε = inf has one (no-DP) cell for both
      levels; RAPT (a local guarantee of its own) runs at the sample level only.
    * ``extra_seeds`` run only at the ε values in ``extra_seeds_at_epsilon`` (e.g. a second seed
      for the ε = 8 column); ``seeds`` run everywhere.

    ``engine = "batched"`` trains the DP-SGD (and non-private) clients of direct / post /
    teacher_dp in shared passes (:class:`post_fl.federated.transports.BatchedTransport`); RAPT always runs
    client by client.
    """

    output_dir: str = "runs/sweep"
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    num_clients: list[int] = field(default_factory=lambda: [1, 10])
    target_epsilon: list[float] = field(default_factory=lambda: [1.0, 8.0, math.inf])
    partitioning: list[str] = field(default_factory=lambda: ["iid"])
    dirichlet_alpha: list[float] = field(default_factory=lambda: [0.5])
    seeds: list[int] = field(default_factory=lambda: [0])
    rounds: int = 3
    clients_per_round: int = 10
    cost_probe_steps: int = 2
    examples_per_client: list[int] = field(default_factory=lambda: [0])
    dp_level: list[str] = field(default_factory=lambda: ["sample"])
    extra_seeds: list[int] = field(default_factory=list)
    extra_seeds_at_epsilon: list[float] = field(default_factory=list)
    engine: str = "sequential"
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
        for name in ("num_clients", "target_epsilon", "partitioning", "seeds", "examples_per_client", "dp_level"):
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
        if any(n < 0 for n in self.examples_per_client):
            raise ConfigError(f"examples_per_client: expected values >= 0 (0 = split the training set), "
                              f"got {self.examples_per_client}")
        if any(n > 0 for n in self.examples_per_client) and any(p != "iid" for p in self.partitioning):
            raise ConfigError(f"examples_per_client > 0 gives every client exactly n examples, which only iid "
                              f"partitioning does; got partitioning = {self.partitioning} (use [\"iid\"], or a "
                              "separate sweep file for the label-skewed grid)")
        bad = [d for d in self.dp_level if d not in DP_LEVELS]
        if bad:
            raise ConfigError(f"dp_level: unknown level(s) {bad}; expected some of {list(DP_LEVELS)}")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine: expected one of {list(ENGINES)}, got {self.engine!r}")
        overlap = sorted(set(self.extra_seeds) & set(self.seeds))
        if overlap:
            raise ConfigError(f"extra_seeds: {overlap} already in seeds; extra seeds are run only at "
                              "extra_seeds_at_epsilon, seeds everywhere")
        if self.extra_seeds and not self.extra_seeds_at_epsilon:
            raise ConfigError("extra_seeds_at_epsilon: expected the epsilon value(s) where extra_seeds run "
                              f"(e.g. [8]); extra_seeds = {self.extra_seeds}")
        missing = [e for e in self.extra_seeds_at_epsilon if float(e) not in [float(t) for t in self.target_epsilon]]
        if missing:
            raise ConfigError(f"extra_seeds_at_epsilon: {missing} not in target_epsilon {self.target_epsilon}")
        if self.rounds < 1:
            raise ConfigError(f"rounds: expected >= 1, got {self.rounds}")
        if self.clients_per_round < 1:
            raise ConfigError(f"clients_per_round: expected >= 1, got {self.clients_per_round}")
        if self.cost_probe_steps < 0:
            raise ConfigError(f"cost_probe_steps: expected >= 0 (0 = no probe), got {self.cost_probe_steps}")
        from ..federated.config import FederatedConfig

        known = {f.name for f in dataclasses.fields(FederatedConfig)}
        owned = {"rounds", "num_clients", "fraction_train", "min_clients", "partitioning", "dirichlet_alpha",
                 "checkpoint_dir", "client_cache_dir", "resume"}
        if "user" in self.dp_level:
            owned |= {"user_dp", "user_dp_target_epsilon", "user_dp_noise", "user_dp_noise_multiplier"}
        for k in self.federated:
            if k not in known:
                raise ConfigError(f"unknown setting federated.{k}; known: {', '.join(sorted(known - owned))}")
            if k in owned:
                raise ConfigError(f"federated.{k}: set by the sweep (axes num_clients, partitioning, "
                                  "dirichlet_alpha, dp_level, target_epsilon, rounds, clients_per_round); remove it")
        if self.engine == "batched" and self.federated.get("secagg"):
            raise ConfigError("engine = batched: the client-batched simulation aggregates in the clear; "
                              "federated.secagg needs engine = sequential")
        self.base.validate()
        self.rapt.validate()
        self.audit.validate()
        return self


_LIST_AXES = {"methods": str, "num_clients": int, "target_epsilon": float, "partitioning": str,
              "dirichlet_alpha": float, "seeds": int, "examples_per_client": int, "dp_level": str,
              "extra_seeds": int, "extra_seeds_at_epsilon": float}
_SCALARS = {"output_dir": str, "rounds": int, "clients_per_round": int, "cost_probe_steps": int, "engine": str}


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
    examples_per_client: int = 0  # 0 = the training set split among the clients
    dp_level: str = "sample"  # "sample" (DP-SGD per client; also every eps = inf cell) | "user" (DP-FedAvg)

    @property
    def partition_label(self) -> str:
        return f"dirichlet({self.dirichlet_alpha:g})" if self.partitioning == "dirichlet" else self.partitioning

    @property
    def key(self) -> str:
        if self.method in REFERENCE_METHODS:
            return f"{self.method}|seed={self.seed}"
        n = f"|n={self.examples_per_client}" if self.examples_per_client else ""
        dp = "|dp=user" if self.dp_level == "user" else ""
        return (f"{self.method}|clients={self.num_clients}{n}|eps={_fmt_eps(self.target_epsilon)}{dp}|"
                f"part={self.partition_label}|seed={self.seed}")

    @property
    def run_slug(self) -> str:
        """Folder name of the federated run; ``direct`` and ``post`` share the student run."""
        kind = "student" if self.method in STUDENT_METHODS else self.method
        n = f"-n{self.examples_per_client}" if self.examples_per_client else ""
        dp = "-user" if self.dp_level == "user" else ""
        return (f"{kind}-c{self.num_clients}{n}-eps{_fmt_eps(self.target_epsilon)}{dp}-"
                f"{self.partition_label.replace('(', '').replace(')', '')}-s{self.seed}")


def expand_cells(cfg: SweepConfig) -> list[Cell]:
    """Every cell of the grid, in run order, without duplicates.

    1 client ignores partitioning and has no user-level cells; ε = inf is one no-DP cell whatever
    the dp_level; RAPT has no user-level cells; ``extra_seeds`` add cells only at
    ``extra_seeds_at_epsilon`` (and no reference cells).
    """
    cells: list[Cell] = []
    seen: set[str] = set()

    def add(c: Cell) -> None:
        if c.key not in seen:
            seen.add(c.key)
            cells.append(c)

    parts: list[tuple[str, float]] = []
    for p in cfg.partitioning:
        parts += [(p, a) for a in cfg.dirichlet_alpha] if p == "dirichlet" else [(p, 0.0)]
    extra_eps = [float(e) for e in cfg.extra_seeds_at_epsilon]
    for seed in [*cfg.seeds, *cfg.extra_seeds]:
        extra = seed not in cfg.seeds
        if not extra:
            for m in REFERENCE_METHODS:
                if m in cfg.methods:
                    add(Cell(m, seed=seed))
        for n in cfg.num_clients:
            for per in cfg.examples_per_client:
                for p, a in (parts if n > 1 else [("iid", 0.0)]):
                    for level in cfg.dp_level:
                        if level == "user" and n == 1:
                            continue  # one client: user level = the whole data set, not a federation
                        for eps in cfg.target_epsilon:
                            if extra and float(eps) not in extra_eps:
                                continue
                            lv = "sample" if math.isinf(eps) else level  # no DP: one cell for both levels
                            for m in cfg.methods:
                                if m in REFERENCE_METHODS or (m == "rapt" and lv == "user"):
                                    continue
                                add(Cell(m, n, eps, p, a, seed, per, lv))
    return cells

