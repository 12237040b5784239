"""What the cells of one sweep share and how their clients are reached: the sweep's state loaded once
(:class:`SweepContext`: tasks, teacher, the distilled-once student, zero-shot scores), transports that
time each client (:class:`SweepTransport`, :class:`TimedBatchedTransport`), the DP-SGD client of the
``direct`` / ``post`` / ``teacher_dp`` cells, and the cost probe (:func:`seconds_per_step`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..core.config import RunConfig, identifying_settings
from ..core.jsonio import jsonable
from .grid import SweepConfig

log = logging.getLogger(__name__)


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
        from ..core.tasks import load_task

        if seed not in self._tasks:
            self._tasks[seed] = load_task(dataclasses.replace(self.cfg.base, seed=seed))
        return self._tasks[seed]

    @property
    def teacher(self):
        from ..core.tasks import load_teacher

        if self._teacher is None:
            self._teacher = load_teacher(self.cfg.base, self.task(self.cfg.base.seed))
        return self._teacher

    @property
    def teacher_dir(self) -> Path:
        """The teacher as a model directory (teacher_dp and rapt cells run it as the 'student')."""
        from ..core.models import resolve_model_path

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
                    from ..core.embedded import cache_dir
                    from ..method.student_cache import cached_or_distilled_student, save_student

                    dcfg = self.cfg.base.distill
                    task = self.task(self.cfg.base.seed)
                    log.info("the sweep's student: from the student cache or distilled once into %s", d)
                    cached, student, _, _ = cached_or_distilled_student(
                        self.teacher, task.public, dcfg, self.cfg.base.seed,
                        cache_dir() / "students" if dcfg.cache else None, validation=task.validation,
                        progress=self.progress, corpus=task.distill_corpus)
                    if cached is not None:
                        d = cached
                    else:
                        save_student(student, d)
                self._student_dir = d
        return self._student_dir

    def zero_shot_scores(self, seed: int, split: str) -> torch.Tensor:
        """The teacher's class scores (no prompt) on the ``test`` or ``validation`` split, computed once."""
        from ..method.evaluate import class_scores

        if (seed, split) not in self._zero_shot_scores:
            data = self.task(seed).test if split == "test" else self.task(seed).validation
            self._zero_shot_scores[(seed, split)] = class_scores(self.teacher, data.texts, None,
                                                                 self.cfg.base.eval.batch_size)
        return self._zero_shot_scores[(seed, split)]

    def embedding_diameter(self) -> float:
        """diam(φ(V)) of the teacher's input embeddings (exact for small vocabularies, else an upper bound)."""
        if self._diameter is None:
            from ..privacy.rapt import per_token_epsilon

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
        from ..federated.server import RoundReplies

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
    """:class:`post_fl.federated.transports.BatchedTransport` with the cost counters of :class:`SweepTransport`.

    All sampled clients of a round train in shared passes, so a client's seconds are the round's
    training seconds (:attr:`post_fl.federated.batched.BatchedRound.seconds`) divided by the clients in it
    (amortised, not one client alone); its steps are its own DP-SGD steps.
    """

    def __init__(self, server, run_cfg: RunConfig, fed) -> None:
        from ..federated.transports import BatchedTransport

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


def dp_client_fn(server, run_cfg: RunConfig, fed) -> Callable:
    """A client doing ``post_fl.federated.train_client`` (DP-SGD on its partition), with its state."""
    from ..federated.aggregate import ClientUpdate
    from ..federated.client import client_partition, open_ledger, train_client

    seen: set[int] = set()

    def fn(cid: int, ins: dict, prompt: np.ndarray):
        data = client_partition(run_cfg, fed, cid)
        if run_cfg.tune.private and len(data) and cid not in seen:
            warm_noise_calibration(run_cfg, fed, len(data))
        seen.add(cid)
        ledger = open_ledger(run_cfg, data, cid) if run_cfg.tune.private and len(data) else None
        t0 = time.perf_counter()
        res = train_client(server.student, prompt, data, run_cfg, fed, ins["round"], cid, ins["clip"], ledger,
                           run_id="sweep")
        return (ClientUpdate(cid, res.delta, res.metrics.get("num-examples"), res.metrics),
                int(res.private["steps"]), time.perf_counter() - t0)

    return fn


def warm_noise_calibration(run_cfg: RunConfig, fed, n: int) -> None:
    """Calibrate a client's DP-SGD noise multiplier before its round is timed (one-off, memoised in tuning)."""
    from ..privacy.accounting import calibrate_noise_multiplier, planned_steps

    if run_cfg.tune.private:
        calibrate_noise_multiplier(run_cfg.tune, n, fed.rounds * planned_steps(run_cfg.tune, n))


# ---------------------------------------------------------------- cost probe
def seconds_per_step(model, data, tune, steps: int, seed: int) -> float:
    """Wall seconds of one (DP-)SGD prompt-tuning step on ``model``.

    Timed as (T(2k steps) − T(k steps)) / k, so the fixed cost of a tuning call (tokenising the
    client's data, Opacus set-up) cancels; the noise multiplier is fixed (its calibration is a
    one-off, and sigma does not change a step's cost).
    """
    from ..core.prompt import init_from_vocab
    from ..method.tuning import tune_prompt

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
