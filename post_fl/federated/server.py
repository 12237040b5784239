"""The federated POST server and its round loop: sample clients, send the global prompt, validate and
aggregate the replies (:class:`FederatedServer`), evaluate, checkpoint; then transfer (:func:`run_federated`).
A :class:`Transport` reaches the clients (Flower's Grid in ``server_app``, :mod:`post_fl.federated.transports`
in-process). One round, what crosses the wire and who draws which noise: :mod:`post_fl.federated.protocol`;
what the run reports about privacy: :mod:`post_fl.federated.privacy_report`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from ..core.config import ConfigError, RunConfig
from ..core.jsonio import from_jsonable, jsonable, write_json
from ..core.deep_prompt import DeepPrompt, as_input_prompt, new_prompt, save_any_prompt
from ..core.prompt import SoftPrompt, save_prompt
from ..core.tasks import load_student, load_task, load_teacher
from ..privacy.randomness import NOT_PRIVATE_LABEL
from .aggregate import (ClientUpdate, RoundFailedError, aggregate_updates, filter_updates, require_min_clients,
                        sum_updates, update_norm)
from .checkpoint import read_checkpoint, write_checkpoint
from .client import one_line_reason
from .config import FederatedConfig, resolve_aggregation, derive_seed, user_noise_multiplier
from .privacy_report import (client_privacy, privacy_lines, privacy_section, user_epsilon_against_server,
                             user_epsilon_against_world, user_level_section)
from .protocol import LEDGER_DIR_NAME, CHECKPOINT_FILE, STUDENT_WEIGHTS_FILE
from .shipping import pack_student

log = logging.getLogger(__name__)

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
        self.user_dp_contributors: list[int] = []  # per user-DP round: how many clients' updates are in the sum
        self.refusals: dict[int, dict] = {}  # client id -> its last refusal (budget exhausted, ...)
        self.max_norm = math.inf  # the resolved federated.max_update_norm
        self.aggregation = resolve_aggregation(fed_cfg, run_cfg)
        self.started = time.perf_counter()
        self._prepared = False
        # the teacher's unprompted class scores on self.test, when the caller has them already (a sweep
        # computes them once for all its runs); None = finish() computes them
        self.teacher_zero_shot_scores: torch.Tensor | None = None

    # ------------------------------------------------------------ setup
    def prepare(self) -> None:
        """Load data, teacher and student (distil one if needed); start from the checkpoint or prompt_0."""
        if self._prepared:
            return
        self.run.mkdir(parents=True, exist_ok=True)
        task = load_task(self.cfg)
        self.train, self.test, self.public = task.train, task.test, task.public
        self.distill_corpus = task.distill_corpus
        m = self.cfg.model
        self.teacher = load_teacher(self.cfg, task)  # on the device and in the precision of cfg.compute
        self.student_dir = Path(m.student) if m.student else self.run / "student"
        if not (self.student_dir / STUDENT_WEIGHTS_FILE).is_file() and not m.student:
            from ..method.distill import distill_student
            from ..method.student_cache import public_distillation_split, save_student

            self.report(f"no saved student at {self.student_dir}: distilling one from {m.teacher}")
            public_train, held_out = public_distillation_split(self.public, self.cfg.seed)
            student, rep = distill_student(self.teacher, public_train, self.cfg.distill, self.cfg.seed, held_out,
                                           progress=True, corpus=self.distill_corpus)  # post_fl.core.progress: bar / log lines / quiet
            save_student(student, self.student_dir, rep)
        self.student = load_student(self.student_dir, self.cfg, task, self.teacher)
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
        """The starting global prompt from the ``prompt`` settings and the seed: P x D, or L x P x D for
        ``prompt.form = "deep"`` (whose per-layer scales every client recomputes the same way)."""
        self._start = new_prompt(self.student, self.cfg.prompt, self.cfg.seed)
        return self._start.weight.detach().cpu().numpy().astype(np.float32).copy()

    def prompt_module(self) -> SoftPrompt | DeepPrompt:
        """The current global prompt as a module: an input prompt, or a deep prompt in its starting units."""
        weight = torch.from_numpy(self.prompt.copy()).to(self.student.device)  # where the student computes
        return self._start.with_weight(weight) if isinstance(self._start, DeepPrompt) else SoftPrompt(weight)

    def fingerprint(self) -> str:
        """Hash of every setting that changes the result (not the output/checkpoint paths or resume flag)."""
        run = self.cfg.to_dict()
        run.pop("output_dir", None)
        fed = dataclasses.asdict(self.fed)
        for k in ("checkpoint_dir", "resume", "client_cache_dir", "timeout"):
            fed.pop(k)
        if fed.get("user_dp_epsilon_against") == "":  # added later: its default keeps older checkpoints' fingerprints
            fed.pop("user_dp_epsilon_against")
        if run["prompt"].get("form") == "input":  # likewise
            run["prompt"].pop("form")
        return hashlib.sha256(json.dumps(jsonable([run, fed]), sort_keys=True).encode()).hexdigest()

    # ------------------------------------------------------------ rounds
    def sample(self, server_round: int, client_ids: list[int]) -> list[int]:
        """The clients of this round: Poisson at ``fraction_train`` with user DP, else a fixed-size sample.

        Poisson sampling is part of the user-level guarantee against the world (privacy amplification),
        so it draws fresh OS entropy (:func:`post_fl.privacy.randomness.dp_numpy_rng`). The server itself knows
        the sample, so the amplification does not hold against it (:meth:`user_epsilon_against_server`
        charges every round at rate 1). The fixed-size sample of a run
        without user-level DP is not a privacy mechanism (no guarantee relies on it being secret),
        so it stays seeded by (seed, round) and repeats.
        """
        ids = sorted(client_ids)
        if self.fed.user_dp:
            from ..privacy.randomness import dp_numpy_rng
            from ..privacy.user_dp import poisson_sample

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
        from ..privacy.randomness import dp_numpy_rng
        from ..privacy.user_dp import noised_mean

        m, sigma = self.fed.min_clients, self.user_dp_sigma
        self.user_dp_contributors.append(int(contributors))
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
                from ..privacy.user_dp import clip_update

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
            row["user_epsilon_against_world"] = self.user_epsilon_against_world()
            row["user_epsilon_against_server"] = self.user_epsilon_against_server()
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
        from ..method.evaluate import accuracy

        return accuracy(self.student, self.test, self.prompt_module(), self.cfg.eval.batch_size)

    def user_epsilon_against_world(self) -> float:
        """User-level epsilon of the rounds so far against the world
        (:func:`post_fl.federated.privacy_report.user_epsilon_against_world`); inf when user-level DP is off."""
        return user_epsilon_against_world(self.fed, self.user_dp_sigma, self.user_dp_rounds)

    def user_epsilon_against_server(self) -> float:
        """User-level epsilon of the rounds so far against the server, which drew the client sample
        (:func:`post_fl.federated.privacy_report.user_epsilon_against_server`); inf in server-noise mode and
        when user-level DP is off."""
        return user_epsilon_against_server(self.fed, self.user_dp_sigma, self.user_dp_contributors)

    def user_epsilon(self) -> float:
        """The user-level epsilon a run's user-level target is judged on (``federated.user_dp_epsilon_against``):
        against the server by default under distributed noise, against the world under server noise."""
        if self.fed.user_epsilon_against == "server":
            return self.user_epsilon_against_server()
        return self.user_epsilon_against_world()

    @property
    def ledger_dir(self) -> Path:
        """Where simulated clients keep their ledgers (the harness reads them; a deployment's sites keep theirs)."""
        return Path(self.cfg.output_dir) / LEDGER_DIR_NAME

    def client_privacy(self) -> dict[int, dict]:
        """Per client that trained: epsilon/delta from its ledger where this machine can read it (simulation);
        otherwise only the rounds it replied in (a deployed site's epsilon stays in its own ledger)."""
        return client_privacy(self.clients, self.ledger_dir, self.cfg.tune)

    # ------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.ckpt_dir / CHECKPOINT_FILE

    def save_checkpoint(self) -> Path:
        """Write prompt, round, per-client privacy records, seeds and metrics in one file, atomically."""
        state = {"round": self.round, "fingerprint": self.fingerprint(), "seed": self.cfg.seed,
                 "rng": ("insecure_reproducible: DP streams seeded from (seed, round[, client])" if self.insecure
                         else "DP noise and sampling from fresh OS entropy; resumed rounds draw new noise"),
                 "model_hash": self.model_hash, "metrics": self.metrics,
                 "clients": {str(k): v for k, v in self.clients.items()},
                 "refusals": {str(k): v for k, v in self.refusals.items()},
                 "user_dp": {"rounds": self.user_dp_rounds, "noise_multiplier": self.user_dp_sigma,
                             "short_rounds": self.user_dp_short_rounds, "contributors": self.user_dp_contributors}}
        return write_checkpoint(self.checkpoint_path, self.prompt, state)

    def load_checkpoint(self) -> bool:
        """Restore the last checkpoint if there is one; refuse one written with different settings."""
        p = self.checkpoint_path
        if not p.is_file():
            return False
        state, prompt = read_checkpoint(p)
        if state["fingerprint"] != self.fingerprint():
            raise ValueError(f"{p} was written by a run with different settings; use another output_dir "
                             "or federated.checkpoint_dir, or set federated.resume = false")
        if state["model_hash"] != self.model_hash:
            raise ValueError(f"{p} was written with student {state['model_hash'][:12]}, "
                             f"but the student now hashes to {self.model_hash[:12]}")
        self.round, self.prompt, self.metrics = int(state["round"]), prompt, from_jsonable(state["metrics"])
        self.clients = {int(k): from_jsonable(v) for k, v in state["clients"].items()}
        self.refusals = {int(k): from_jsonable(v) for k, v in state.get("refusals", {}).items()}
        self.user_dp_rounds = int(state["user_dp"]["rounds"])
        self.user_dp_short_rounds = int(state["user_dp"].get("short_rounds", 0))
        if "contributors" in state["user_dp"]:
            self.user_dp_contributors = [int(k) for k in state["user_dp"]["contributors"]]
        else:  # an older checkpoint: short rounds counted as one share each (the most a round with anyone costs)
            full = self.user_dp_rounds - self.user_dp_short_rounds
            self.user_dp_contributors = [self.fed.min_clients] * full + [1] * self.user_dp_short_rounds
        self.report(f"resuming from {p} after round {self.round}")
        return True

    # ------------------------------------------------------------ the end
    def privacy_report(self) -> dict:
        """The privacy section of results.json (:func:`post_fl.federated.privacy_report.privacy_section`)."""
        user = None
        if self.fed.user_dp:
            user = user_level_section(self.fed, self.user_dp_sigma, self.user_dp_rounds, self.user_dp_short_rounds,
                                      self.user_epsilon_against_world(), self.user_epsilon_against_server())
        return privacy_section(self.cfg, self.fed, self.client_privacy(), self.refusals, user, self.aggregation,
                               self.max_norm)

    def _teacher_zero_shot_accuracy(self, batch_size: int) -> float:
        """Teacher zero-shot accuracy on the test split, from ``teacher_zero_shot_scores`` when given."""
        from ..method.evaluate import accuracy

        scores = self.teacher_zero_shot_scores
        if scores is None:
            return accuracy(self.teacher, self.test, None, batch_size)
        if scores.shape != (len(self.test), self.teacher.num_classes):
            raise ValueError(f"teacher_zero_shot_scores has shape {tuple(scores.shape)}; expected "
                             f"({len(self.test)}, {self.teacher.num_classes}) for this run's test split")
        return float((scores.argmax(-1) == torch.tensor(self.test.labels)).float().mean())

    def save_student_prompt(self, privacy: dict | None = None) -> dict:
        """Save the global prompt as ``<run>/prompt_student`` (the federated DP prompt on the student) with its
        privacy metadata (``privacy``: :meth:`privacy_report`, computed when not given); returns the metadata."""
        privacy = privacy if privacy is not None else self.privacy_report()
        meta = {"stage": "federated-dp-tune", "rounds": self.round,
                "max_client_epsilon": privacy["sample_level"]["max_epsilon"],
                "user_epsilon_against_world": self.user_epsilon_against_world(),
                "user_epsilon_against_server": self.user_epsilon_against_server(),
                "label_words": self.student.label_words,
                "template": self.student.template}
        if self.insecure:
            meta["not_private"] = NOT_PRIVATE_LABEL
        save_any_prompt(self.prompt_module(), self.run / "prompt_student", head=self.student.head,
                        base_model=str(self.student_dir), metadata=meta)
        return meta

    def finish(self) -> dict:
        """Transfer the global prompt to the teacher (POST, public data), evaluate everything, write results."""
        from ..method.evaluate import accuracy
        from ..method.transfer import transfer_prompt, write_curve_csv

        bs = self.cfg.eval.batch_size
        student_prompt = self.prompt_module()
        privacy = self.privacy_report()
        meta = self.save_student_prompt(privacy)
        self.report("transferring the global prompt to the teacher on public data (POST)")
        tr = transfer_prompt(self.student, student_prompt, self.teacher, self.public, self.cfg.transfer,
                             self.cfg.seed, progress=True)
        tcfg = self.teacher.backbone.config
        save_prompt(tr.prompt, self.run / "prompt_teacher", head=self.teacher.head, base_model=self.teacher.source,
                    num_layers=getattr(tcfg, "num_hidden_layers", None),
                    num_attention_heads=getattr(tcfg, "num_attention_heads", None),
                    metadata={**meta, "stage": "post-transfer", "alpha": tr.alpha_used, "best_step": tr.best_step})
        write_curve_csv(tr.curve, self.run / "transfer_curve.csv")
        acc = {"student_zero_shot": accuracy(self.student, self.test, None, bs),
               "student_federated_prompt": accuracy(self.student, self.test, student_prompt, bs),
               "teacher_zero_shot": self._teacher_zero_shot_accuracy(bs)}
        if student_prompt.dim == self.teacher.embedding_dim:  # a deep prompt's layer-0 slice
            acc["teacher_direct_prompt"] = accuracy(self.teacher, self.test, as_input_prompt(student_prompt), bs)
        acc["teacher_transferred_prompt"] = accuracy(self.teacher, self.test, tr.prompt, bs)
        results = {
            **({"not_private": NOT_PRIVATE_LABEL} if self.insecure else {}),
            "accuracy": acc,
            "rounds": self.metrics,
            "privacy": privacy,
            "transfer": {k: v for k, v in tr.summary().items() if k not in ("losses", "curve")},
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
        for line in privacy_lines(privacy):
            self.report(line)
        self.report(f"done: results in {self.run / 'results.json'}; accuracy {json.dumps(jsonable(acc))}")
        return results


def run_federated(server: FederatedServer, transport: Transport,
                  after_round: Callable[[int], None] | None = None, finish: bool = True) -> dict:
    """The round loop: sample, send, aggregate, evaluate, checkpoint; then transfer and write results.

    Starts after the last checkpointed round. ``after_round(r)`` is called once round r is
    checkpointed (progress hooks; tests use it to interrupt a run). With ``finish = False`` it stops
    after the rounds (the last one checkpointed) and returns ``{"rounds": ...}``: ``post-fl federate``
    transfers and evaluates with the single-site stages (:mod:`post_fl.federate`).
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
    return server.finish() if finish else {"rounds": server.metrics}

