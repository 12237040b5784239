"""Transports that reach in-process clients without Flower, behind the same round loop
(:func:`post_fl.federated.server.run_federated`) as Flower's Grid in ``server_app``:

* :class:`LocalTransport` -- the clients one by one, as Flower's ClientApp would (tests, debugging);
* :class:`BatchedTransport` -- all sampled clients of a round in shared passes of the frozen student
  (:mod:`post_fl.federated.batched`), for simulating many clients on one machine.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ..core.compute import resolve_compute
from ..core.config import RunConfig
from ..core.deep_prompt import DeepPrompt, prompt_with_weight
from ..core.models import ScoringModel
from ..privacy.accounting import calibrate_noise_multiplier, planned_steps, resolve_delta, sample_rate
from .aggregate import ClientUpdate
from .batched import DEFAULT_MICRO_BATCH, BatchedRound, check_client_data, train_clients_batched
from .client import ClientRefusal, budget_status, client_partition, insecure_seed_for, open_ledger, train_client
from .config import FederatedConfig, derive_seed, user_noise_multiplier
from .server import FederatedServer, RoundReplies
from .shipping import cache_root, cached_student, install_student


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
        from ..privacy.ledger import BudgetExhausted

        out = RoundReplies()
        root = cache_root(self.fed)
        for cid, ins in instructions.items():
            student = cached_student(ins["model-hash"], root, resolve_compute(self.cfg.compute))
            if student is None:  # the client would reply need-model; the server sends the package
                self.model_sends += 1
                student = install_student(self.server.package, root, resolve_compute(self.cfg.compute))
            try:  # as in Flower, a client that raises gives an error reply, not a dead run
                data = client_partition(self.cfg, self.fed, cid)
                ledger = open_ledger(self.cfg, data, cid) if self.cfg.tune.private else None
                res = train_client(student, prompt, data, self.cfg, self.fed, server_round, cid, ins["clip"],
                                   ledger, run_id="local")
            except BudgetExhausted as exc:
                out.refusals[cid] = budget_status(exc)
                continue
            except ClientRefusal as exc:  # its fixed code only, as a site's reply would say
                out.refusals[cid] = {"status": exc.code}
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


class BatchedTransport:
    """The :class:`post_fl.federated.server.Transport` of in-process simulation with the client-batched engine.

    Mirrors :class:`LocalTransport` (and so Flower's ClientApp): each sampled
    client takes its partition (``client_partition``), opens its privacy ledger (``open_ledger``),
    is refused before training when the round would exceed its budget (else the round is recorded in
    its ledger in the same locked step, before any noise is drawn: write-ahead), trains from the global
    prompt with the noise multiplier calibrated for ``rounds x epochs``, clips its update to the
    instruction's bound (or ``user_dp_clip``), adds its distributed-DP noise share when that mode is on, and replies with
    the same update and metrics as ``train_client``. The difference: all sampled clients' DP-SGD runs
    in shared forward/backward passes (:func:`train_clients_batched`), which gives each client the
    update ``train_client`` would give it (same insecure seeds in ``insecure_reproducible`` mode).
    SecAgg+ is simulated only on Flower (``federated.secagg`` is refused here).
    """

    def __init__(self, server, run_cfg, fed_cfg, micro_batch: int = DEFAULT_MICRO_BATCH) -> None:
        from ..core.config import ConfigError

        if fed_cfg.secagg:
            raise ConfigError("federated.secagg: the client-batched simulation aggregates in the clear; "
                              "run SecAgg+ on Flower's Simulation Engine (simulation.run)")
        self.server, self.cfg, self.fed, self.micro_batch = server, run_cfg, fed_cfg, micro_batch
        self.model_sends = 0
        self.last_round: BatchedRound | None = None

    def client_ids(self) -> list[int]:
        """Every partition id 0..num_clients-1 (one virtual client each)."""
        return list(range(self.fed.num_clients))

    def _student(self, model_hash: str) -> ScoringModel:
        root = cache_root(self.fed)
        student = cached_student(model_hash, root, resolve_compute(self.cfg.compute))  # one device, every client
        if student is None:  # one process: the student is installed once, as for one Flower worker
            self.model_sends += 1
            student = install_student(self.server.package, root, resolve_compute(self.cfg.compute))
        return student

    def train_round(self, server_round: int, prompt: np.ndarray, instructions: dict[int, dict]):
        """Train every instructed client of ``server_round`` in shared passes; their replies."""
        from ..privacy.ledger import BudgetExhausted
        from ..privacy.randomness import dp_numpy_rng

        out = RoundReplies()
        tune = self.cfg.tune
        hashes = {ins["model-hash"] for ins in instructions.values()}
        if len(hashes) != 1:
            raise ValueError(f"round {server_round}: instructions name {len(hashes)} student hashes, expected one")
        student = self._student(hashes.pop())
        # a deep prompt's per-layer scales, recomputed from the student as each client's train_client does
        start = prompt_with_weight(prompt, student, self.cfg.prompt, self.cfg.seed)
        datasets, ledgers, sigmas, histories, insecure, seeds = {}, {}, {}, {}, {}, {}
        for cid in sorted(instructions):
            try:  # as train_client: refuse before any training, fail alone on bad data
                data = client_partition(self.cfg, self.fed, cid)
                if len(data) == 0:
                    raise ValueError(f"round {server_round}: this client's partition is empty")
                check_client_data(student, data, cid)
                n = len(data)
                ledger = open_ledger(self.cfg, data, cid) if tune.private else None
                if tune.private:
                    steps, q = planned_steps(tune, n), sample_rate(tune, n)
                    sigmas[cid] = float(calibrate_noise_multiplier(tune, n, self.fed.rounds * steps))
                    histories[cid] = ledger.history()
                    # write-ahead and atomic (as train_client): checked and recorded before any noise is drawn
                    ledger.spend(sigmas[cid], q, steps, resolve_delta(tune, n), "batched", server_round)
                elif ledger is not None and math.isfinite(ledger.budget):
                    raise BudgetExhausted(ledger.epsilon(resolve_delta(tune, n)), math.inf, ledger.budget,
                                          resolve_delta(tune, n))
            except BudgetExhausted as exc:
                out.refusals[cid] = budget_status(exc)
                continue
            except ClientRefusal as exc:
                out.refusals[cid] = {"status": exc.code}
                continue
            except ValueError as exc:  # bad or empty private data (DataError is a ValueError)
                out.failures[cid] = f"{type(exc).__name__}: {exc}"
                continue
            datasets[cid], ledgers[cid] = data, ledger
            insecure[cid] = insecure_seed_for(self.cfg, server_round, cid)
            seeds[cid] = derive_seed(self.cfg.seed, server_round, 4, cid)
        if not datasets:
            return out
        any_insecure = any(s is not None for s in insecure.values())
        result = train_clients_batched(student, prompt, datasets, tune, histories=histories,
                                       noise_multipliers=sigmas if tune.private else None,
                                       insecure_seeds=insecure if any_insecure else None, seeds=seeds,
                                       micro_batch=self.micro_batch,
                                       scales=start.scales if isinstance(start, DeepPrompt) else None)
        self.last_round = result
        for cid in sorted(datasets):
            res, ins = result.clients[cid], instructions[cid]
            if tune.private and res.steps > planned_steps(tune, res.examples):  # the ledger holds the planned steps
                raise RuntimeError(f"client {cid}: DP-SGD took {res.steps} steps, more than were recorded")
            update = res.update
            clip = self.fed.user_dp_clip if self.fed.user_dp else float(ins["clip"])
            if clip > 0 and math.isfinite(clip):
                from ..privacy.user_dp import clip_update

                update, _ = clip_update(update, clip)
            if self.fed.user_noise_mode == "distributed":
                from ..privacy.user_dp import noise_share

                share = noise_share(update.shape, self.fed.user_dp_clip, user_noise_multiplier(self.fed),
                                    self.fed.min_clients, dp_numpy_rng(insecure[cid], 5))
                update = (update.astype(np.float64) + share).astype(np.float32)
            if tune.private:
                metrics: dict = {"round": int(server_round)}
            else:
                metrics = {"round": int(server_round), "num-examples": int(res.examples),
                           "loss": float(res.mean_loss), "steps": int(res.steps), "sample-rate": float(res.sample_rate)}
            upd = ClientUpdate(cid, update, metrics.get("num-examples"), metrics)
            out.updates.append(upd)
            out.metrics[cid] = upd.metrics
        return out
