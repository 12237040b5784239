"""Running one sweep cell (:func:`run_cell`): the sweep's shared state (:class:`SweepContext`), a
transport that times each client, the cost probe, and the federated run behind each method.

Methods, all on the same data split and the same teacher:

``zero_shot``
    the teacher without a prompt (one cell per seed).
``calibrated_zero_shot``
    the teacher without a prompt, its class scores shifted by a per-class bias fitted on the
    *validation* split (:func:`post_fl.evaluate.fit_class_bias`; never on test): the zero-shot
    reference with the template's label prior removed (one cell per seed).
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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .core.config import RunConfig, config_from_dict, identifying_settings
from .core.jsonio import jsonable
from .sweep_grid import REFERENCE_METHODS, STUDENT_METHODS, SweepConfig, Cell
from .sweep_rapt import rapt_eta, privatize_batch, rapt_label_epsilon, rapt_row_privacy, _rapt_client_fn
from .sweep_audit import audit_prompt_tuning

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- the sweep's shared state
def settings_fingerprint(cfg: SweepConfig) -> dict:
    """Every setting other than the grid axes: cells run under different ones cannot share a CSV."""
    d = {"base": identifying_settings({k: v for k, v in cfg.base.to_dict().items() if k not in ("output_dir", "seed")}),
         "rounds": cfg.rounds, "clients_per_round": cfg.clients_per_round,
         "federated": cfg.federated, "rapt": dataclasses.asdict(cfg.rapt),
         "audit": dataclasses.asdict(cfg.audit)}
    if cfg.engine != "sequential":  # only when set, so sweeps run before the engine existed still match
        d["engine"] = cfg.engine
    d = jsonable(d)
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
        self._zero_shot_scores: dict[tuple[int, str], torch.Tensor] = {}

    def task(self, seed: int):
        from .core.tasks import load_task

        if seed not in self._tasks:
            self._tasks[seed] = load_task(dataclasses.replace(self.cfg.base, seed=seed))
        return self._tasks[seed]

    @property
    def teacher(self):
        from .core.tasks import load_teacher

        if self._teacher is None:
            self._teacher = load_teacher(self.cfg.base, self.task(self.cfg.base.seed))
        return self._teacher

    @property
    def teacher_dir(self) -> Path:
        """The teacher as a model directory (teacher_dp and rapt cells run it as the 'student')."""
        from .core.models import resolve_model_path

        d = Path(resolve_model_path(self.cfg.base.model.teacher))
        if not (d / "model.safetensors").is_file():
            raise FileNotFoundError(f"{d}: teacher_dp/rapt cells need the teacher as a local directory with "
                                    "model.safetensors")
        return d

    @property
    def student_dir(self) -> Path:
        """The student: ``base.model.student``; else, with ``base.distill.cache``, the cached student of the
        same teacher, public corpus, distillation settings and seed (the main job's, when those match),
        distilled and cached on a miss; without the cache, distilled once into ``<output_dir>/student``."""
        if self._student_dir is None:
            if self.cfg.base.model.student:
                self._student_dir = Path(self.cfg.base.model.student)
            else:
                d = self.out / "student"
                if not (d / "model.safetensors").is_file():
                    from .distill import cached_or_distilled_student, save_student
                    from .core.embedded import cache_dir

                    dcfg = self.cfg.base.distill
                    task = self.task(self.cfg.base.seed)
                    log.info("the sweep's student: from the student cache or distilled once into %s", d)
                    cached, student, _, _ = cached_or_distilled_student(
                        self.teacher, task.public, dcfg, self.cfg.base.seed,
                        cache_dir() / "students" if dcfg.cache else None, validation=task.validation,
                        progress=self.progress)
                    if cached is not None:
                        d = cached
                    else:
                        save_student(student, d)
                self._student_dir = d
        return self._student_dir

    def zero_shot_scores(self, seed: int, split: str) -> torch.Tensor:
        """The teacher's class scores (no prompt) on the ``test`` or ``validation`` split, computed once."""
        from .evaluate import class_scores

        if (seed, split) not in self._zero_shot_scores:
            data = self.task(seed).test if split == "test" else self.task(seed).validation
            self._zero_shot_scores[(seed, split)] = class_scores(self.teacher, data.texts, None,
                                                                 self.cfg.base.eval.batch_size)
        return self._zero_shot_scores[(seed, split)]

    def embedding_diameter(self) -> float:
        """diam(φ(V)) of the teacher's input embeddings (exact for small vocabularies, else an upper bound)."""
        if self._diameter is None:
            from .privacy.rapt import per_token_epsilon

            self._diameter = float(per_token_epsilon(1.0, self.teacher.word_embeddings))
        return self._diameter



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
        from .fed_server import RoundReplies

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


class TimedBatchedTransport:
    """:class:`post_fl.batched.BatchedTransport` with the cost counters of :class:`SweepTransport`.

    All sampled clients of a round train in shared passes, so a client's seconds are the round's
    training seconds (:attr:`post_fl.batched.BatchedRound.seconds`) divided by the clients in it
    (amortised, not one client alone); its steps are its own DP-SGD steps.
    """

    def __init__(self, server, run_cfg: RunConfig, fed) -> None:
        from .batched import BatchedTransport

        self.inner = BatchedTransport(server, run_cfg, fed)
        self.num_clients = fed.num_clients
        self.client_seconds: list[float] = []
        self.client_steps: list[int] = []
        self.bytes_down = 0
        self.bytes_up = 0

    def client_ids(self) -> list[int]:
        return self.inner.client_ids()

    def train_round(self, server_round: int, prompt: np.ndarray, instructions: dict[int, dict]):
        self.inner.last_round = None
        out = self.inner.train_round(server_round, prompt, instructions)
        res = self.inner.last_round
        if res is not None and res.clients:
            per = res.seconds / len(res.clients)
            for c in res.clients.values():
                self.client_seconds.append(per)
                self.client_steps.append(int(c.steps))
        for upd in out.updates:
            self.bytes_down = max(self.bytes_down, int(np.asarray(prompt, np.float32).nbytes))
            self.bytes_up = max(self.bytes_up, int(np.asarray(upd.delta).nbytes))
        return out


def _dp_client_fn(server, run_cfg: RunConfig, fed) -> Callable:
    """A client doing ``post_fl.federated.train_client`` (DP-SGD on its partition), with its state."""
    from .aggregate import ClientUpdate
    from .fed_client import client_partition, open_ledger, train_client

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
    """Calibrate a client's DP-SGD noise multiplier before its round is timed (one-off, memoised in tuning)."""
    from .privacy.accounting import calibrate_noise_multiplier, planned_steps

    if run_cfg.tune.private:
        calibrate_noise_multiplier(run_cfg.tune, n, fed.rounds * planned_steps(run_cfg.tune, n))


# ---------------------------------------------------------------- cost probe
def seconds_per_step(model, data, tune, steps: int, seed: int) -> float:
    """Wall seconds of one (DP-)SGD prompt-tuning step on ``model``.

    Timed as (T(2k steps) − T(k steps)) / k, so the fixed cost of a tuning call (tokenising the
    client's data, Opacus set-up) cancels; the noise multiplier is fixed (its calibration is a
    one-off, and sigma does not change a step's cost).
    """
    from .core.prompt import init_from_vocab
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



# ---------------------------------------------------------------- one cell
def _cell_configs(ctx: SweepContext, cell: Cell, model_dir: Path, run_dir: Path):
    from .fed_config import FederatedConfig

    cfg = ctx.cfg
    base = cfg.base
    user = cell.dp_level == "user" and math.isfinite(cell.target_epsilon)
    private = math.isfinite(cell.target_epsilon) and cell.method != "rapt" and not user
    data = base.data
    if cell.examples_per_client:
        data = dataclasses.replace(base.data, max_train_examples=cell.examples_per_client * cell.num_clients)
    run_cfg = dataclasses.replace(
        base, seed=cell.seed, output_dir=str(run_dir), data=data,
        model=dataclasses.replace(base.model, student=str(model_dir)),
        tune=dataclasses.replace(base.tune, target_epsilon=cell.target_epsilon if private else math.inf,
                                 dp=private and base.tune.dp),
        transfer=(base.transfer if cell.method in STUDENT_METHODS else dataclasses.replace(base.transfer, steps=0)))
    n = cell.num_clients
    fed = config_from_dict({**cfg.federated, "rounds": cfg.rounds, "num_clients": n,
                            "fraction_train": min(1.0, cfg.clients_per_round / n), "min_clients": 1,
                            "partitioning": cell.partitioning or "iid",
                            "dirichlet_alpha": cell.dirichlet_alpha or 0.5, "eval_every": cfg.rounds,
                            "client_cache_dir": str(ctx.out / "client-cache"), "resume": True,
                            **({"user_dp": True, "user_dp_target_epsilon": cell.target_epsilon,
                                "user_dp_noise": "server"} if user else {})}, FederatedConfig)
    return run_cfg, fed


def check_examples_per_client(ctx: SweepContext, cells: list[Cell]) -> None:
    """Refuse (ConfigError naming both numbers) any cell whose ``examples_per_client x num_clients``
    exceeds the base training set (after ``base.data.max_train_examples``) of its seed."""
    from .core.config import ConfigError

    for cell in cells:
        if cell.examples_per_client:
            need, have = cell.examples_per_client * cell.num_clients, len(ctx.task(cell.seed).train)
            if need > have:
                raise ConfigError(
                    f"examples_per_client = {cell.examples_per_client} x num_clients = {cell.num_clients} needs "
                    f"{need} training examples, but the training set has {have} (base.data.max_train_examples = "
                    f"{ctx.cfg.base.data.max_train_examples}); use fewer clients or examples per client")


def _federated_run(ctx: SweepContext, cell: Cell) -> dict:
    """Run (or reuse) the federated run behind a cell; returns its summary (accuracies, privacy, cost)."""
    from .core.jsonio import read_json, write_json
    from .fed_server import FederatedServer, run_federated
    from .fed_client import client_partition

    run_dir = ctx.out / "runs" / cell.run_slug
    summary_path = run_dir / "sweep_summary.json"
    if summary_path.is_file():
        return read_json(summary_path)
    check_examples_per_client(ctx, [cell])  # also when a cell is run alone, before any model is loaded
    model_dir = ctx.student_dir if cell.method in STUDENT_METHODS else ctx.teacher_dir
    run_cfg, fed = _cell_configs(ctx, cell, model_dir, run_dir)
    server = FederatedServer(run_cfg, fed, run_dir, report=log.info)
    server.prepare()
    eta = math.inf
    client_fn = None
    if cell.method == "rapt":
        eta = rapt_eta(cell.target_epsilon, ctx.embedding_diameter())
        client_fn = _rapt_client_fn(server, run_cfg, fed, eta, ctx.cfg.rapt,
                                    rapt_label_epsilon(ctx.cfg.rapt, cell.target_epsilon))
        transport = SweepTransport(fed.num_clients, client_fn)
    elif ctx.cfg.engine == "batched":
        transport = TimedBatchedTransport(server, run_cfg, fed)
    else:
        transport = SweepTransport(fed.num_clients, _dp_client_fn(server, run_cfg, fed))
    client_partition(run_cfg, fed, 0)  # split once before timing
    summary: dict[str, Any] = {"eta": eta, "engine": "batched" if isinstance(transport, TimedBatchedTransport)
                               else "sequential"}
    if cell.method == "rapt":  # the guarantee's k: the most privatised tokens of one training example
        summary["rapt_max_text_tokens"] = client_fn.max_text_tokens
    bs = run_cfg.eval.batch_size
    if cell.method in STUDENT_METHODS:
        if server.test.texts == ctx.task(cell.seed).test.texts:  # the sweep's zero-shot scores, computed once
            server.teacher_zero_shot_scores = ctx.zero_shot_scores(cell.seed, "test")
        results = run_federated(server, transport)
        acc = results["accuracy"]
        summary.update(student_accuracy=acc["student_federated_prompt"], direct=acc.get("teacher_direct_prompt"),
                       post=acc["teacher_transferred_prompt"])
    else:
        server_prompt_rounds(server, transport)
        summary["accuracy"] = server.metrics[-1]["test_accuracy"]
        if cell.method == "rapt":
            from .core.prompt import SoftPrompt

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
    if fed.user_dp:  # DP-FedAvg: the user-level epsilon of the released prompts, from the server's accountant
        summary.update(epsilon=server.user_epsilon(), delta=fed.resolved_user_delta,
                       user_dp_noise_multiplier=server.user_dp_sigma)
    else:
        summary.update(epsilon=max(eps) if (eps and private) else math.inf,
                       delta=max(deltas) if (deltas and private) else 0.0)
    summary.update(
        train_examples=len(server.train), test_examples=len(server.test),
        client_s_per_round=float(np.mean(transport.client_seconds)) if transport.client_seconds else math.nan,
        steps_per_client_round=float(np.mean(transport.client_steps)) if transport.client_steps else math.nan,
        bytes_down=transport.bytes_down or int(server.prompt.nbytes),
        bytes_up=transport.bytes_up or int(server.prompt.nbytes),
        model_bytes_once=int(sum(np.asarray(v).nbytes for v in server.package.weights.values())
                             + sum(len(b) for b in server.package.files.values())))
    # the other model's cost: a short probe on this cell's client-0 data, scaled to a client's round
    probe_data = client_partition(run_cfg, fed, 0)
    measured = "student" if cell.method in STUDENT_METHODS else "teacher"
    summary[f"{measured}_s_per_client_round"] = summary["client_s_per_round"]
    if len(probe_data) and ctx.cfg.cost_probe_steps > 0:  # 0 = no probe (the other model's column stays empty)
        if cell.method in STUDENT_METHODS:
            sps = seconds_per_step(ctx.teacher, probe_data, run_cfg.tune, ctx.cfg.cost_probe_steps, cell.seed)
            summary["teacher_s_per_client_round"] = sps * summary["steps_per_client_round"]
            summary["student_s_per_client_round"] = summary["client_s_per_round"]
        else:
            from .core.tasks import load_student

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
    from .evaluate import accuracy_of_scores, majority_class_accuracy

    t0 = time.perf_counter()
    cfg = ctx.cfg
    row: dict[str, Any] = {"key": cell.key, "status": "ok", "method": cell.method, "seed": cell.seed}
    if cell.method in REFERENCE_METHODS:
        task = ctx.task(cell.seed)
        if cell.method == "zero_shot":
            acc, unit = (accuracy_of_scores(ctx.zero_shot_scores(cell.seed, "test"), task.test.labels),
                         "none (no private data used)")
        elif cell.method == "calibrated_zero_shot":
            acc, _ = calibrated_zero_shot(ctx, cell.seed)
            unit = ("none (reference: class bias fitted on the validation split of the private task, "
                    "outside DP)")
        else:
            acc, unit = (majority_class_accuracy(task.train.labels, task.test.labels),
                         "none (reference: the training split's most frequent label)")
        row.update(accuracy=acc, test_examples=len(task.test), train_examples=len(task.train), epsilon=0.0,
                   delta=0.0, epsilon_unit=unit, cell_seconds=time.perf_counter() - t0)
        return with_interval(row)
    row.update(num_clients=cell.num_clients, examples_per_client=cell.examples_per_client, dp_level=cell.dp_level,
               target_epsilon=cell.target_epsilon, partitioning=cell.partitioning,
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
    elif cell.dp_level == "user" and math.isfinite(cell.target_epsilon):
        row.update(epsilon=s["epsilon"], delta=s["delta"], epsilon_unit=USER_LEVEL_UNIT)
    else:
        row.update(epsilon=s["epsilon"], delta=s["delta"],
                   epsilon_unit="example-level DP-SGD (max over clients)" if math.isfinite(cell.target_epsilon)
                   else "none (no DP)")
    measured = "student" if cell.method in STUDENT_METHODS else "teacher"
    row.update(train_examples=s["train_examples"], test_examples=s["test_examples"],
               client_s_per_round=s["client_s_per_round"],
               student_s_per_client_round=s.get("student_s_per_client_round", ""),
               teacher_s_per_client_round=s.get("teacher_s_per_client_round", ""),
               engine=s.get("engine", "sequential"),
               cost_source=f"{measured} measured in the run"
                           + (" (client-batched: a round's seconds / its clients)" if s.get("engine") == "batched"
                              else "")
                           + (f"; the other model probed for {cfg.cost_probe_steps} steps on client 0 data"
                              if cfg.cost_probe_steps > 0 else "; the other model not probed (cost_probe_steps = 0)"),
               bytes_down_per_client_round=s["bytes_down"], bytes_up_per_client_round=s["bytes_up"],
               model_bytes_once=s["model_bytes_once"])
    a = cfg.audit
    if a.enabled and cell.method in a.methods and cell.num_clients in a.clients and \
            float(cell.target_epsilon) in [float(e) for e in a.epsilons]:
        from .core.tasks import load_student

        task = ctx.task(cell.seed)
        student = load_student(ctx.student_dir, cfg.base, task, ctx.teacher)
        base = task.train.shuffled(cell.seed + 17).head(a.base_examples) if a.base_examples else \
            task.train.subset([])
        res = audit_prompt_tuning(student, base, cell.target_epsilon, a, cfg.base.tune, cell.seed)
        row.update(audit_epsilon_lb=res.epsilon_lower_bound, audit_max_epsilon_lb=res.max_epsilon_lower_bound,
                   audit_tpr=res.tpr, audit_fpr=res.fpr, audit_observations=res.n_members + res.n_nonmembers)
    row["cell_seconds"] = time.perf_counter() - t0
    return with_interval(row)


USER_LEVEL_UNIT = ("user-level DP-FedAvg (one user = a client's whole data; server-side noise, trusts the "
                   "server: against the world, amplified by the server's client sampling; nothing against the "
                   "server; clients run no DP-SGD)")


def with_interval(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with the 95% Wilson interval of its test accuracy (``accuracy_ci_low`` / ``_high``) and
    its binomial standard error (``accuracy_stderr``), from ``accuracy`` and ``test_examples``."""
    from .evaluate import accuracy_summary

    acc, n = row.get("accuracy"), row.get("test_examples")
    if isinstance(acc, (int, float)) and math.isfinite(acc) and isinstance(n, int) and n > 0:
        summ = accuracy_summary(float(acc), n)
        row.update(accuracy_ci_low=summ["ci95"][0], accuracy_ci_high=summ["ci95"][1], accuracy_stderr=summ["stderr"])
    return row


def calibrated_zero_shot(ctx: SweepContext, seed: int) -> tuple[float, torch.Tensor]:
    """Calibrated zero-shot test accuracy of the teacher and its per-class bias, fitted on the validation
    split only (:func:`post_fl.evaluate.fit_class_bias`): ``(accuracy, bias)``."""
    from .evaluate import accuracy_of_scores, fit_class_bias

    task = ctx.task(seed)
    if task.validation is None or len(task.validation) == 0:
        raise ValueError("calibrated_zero_shot needs a validation split (data.validation_fraction > 0 or the "
                         "embedded task); the bias is never fitted on test")
    bias = fit_class_bias(ctx.zero_shot_scores(seed, "validation"), task.validation.labels)
    return accuracy_of_scores(ctx.zero_shot_scores(seed, "test"), task.test.labels, bias), bias

