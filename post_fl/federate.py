"""``post-fl federate``: the federated POST job, end to end, on simulated users.

    distil (cached) -> N users, each a partition of the private training set (iid | dirichlet | pathological)
    -> R rounds: each sampled user tunes the global prompt on the student with DP-SGD on its partition, the
       server aggregates (FedAvg, optional DP-FedAvg / SecAgg+) -> POST transfer of the global prompt to the
       teacher on public data -> the single-site evaluation -> results.json, rounds.csv, federated.png

The rounds are the one round loop of the federation (:func:`post_fl.federated.server.run_federated`) over
one of two engines: ``batched`` (default: every sampled user's DP-SGD in shared passes of the student, in
this process, :class:`post_fl.federated.transports.BatchedTransport`) or ``flower`` (Flower's Simulation
Engine with the real ServerApp, ClientApp and messages, and SecAgg+ when configured; the Flower glue supplies
it, :mod:`simulation.federate`). After the rounds the global prompt is saved as ``prompt_student`` and the
single-site stages of :class:`post_fl.pipeline.Pipeline` transfer it, tune the teacher's own prompt (the
non-private upper bound) and evaluate everything, so the table is the one ``post-fl run`` prints; the
privacy section is the federation's (each user's ledger, user-level DP).

A stopped job resumes: the rounds continue after the last checkpointed round (the users' ledgers are
write-ahead, so a round redone draws fresh noise and is charged again), completed stages are skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from .core.config import RunConfig, read_config_file
from .core.jsonio import read_json, write_json

log = logging.getLogger(__name__)

FEDERATE_OUTPUT_DIR = "runs/federated"
RESULTS_PNG = "federated.png"
ENGINES = ("batched", "flower")
# a Flower engine: (run config, federated config, after_round hook, backend "ray" | "inprocess") -> None
FlowerEngine = Callable[..., None]


class RoundsStopped(RuntimeError):
    """The engine returned before the last round was checkpointed (Flower logs why); rerunning resumes."""


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """A config file's nested tables as flat ``section.key`` values (label words stay one table)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key != "model.label_words":
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def federate_configs(config_path: str | Path | None, overrides: dict[str, Any], users: int | None = None,
                     rounds: int | None = None, partitioning: str | None = None):
    """(RunConfig, FederatedConfig) of a job: the defaults, a TOML file (its ``[federated]`` table too) or a run
    folder's ``config.json``, then ``overrides`` (flat ``section.key``, as ``--set`` gives) and the
    ``--users`` / ``--rounds`` / ``--partitioning`` options. The output folder defaults to
    ``runs/federated``; ``federated.eval_every`` (the server's test-split scoring) to the number of rounds,
    since each round is shown on validation. Raises ConfigError naming the setting."""
    from .federated.config import build_configs

    flat: dict[str, Any] = {"output_dir": FEDERATE_OUTPUT_DIR}
    if config_path is not None:
        flat.update(_flat(read_config_file(config_path)))
    flat.update(overrides)
    for key, value in (("federated.num_clients", users), ("federated.rounds", rounds),
                       ("federated.partitioning", partitioning)):
        if value is not None:
            flat[key] = value
    if users is not None and "federated.min_clients" not in flat:
        flat["federated.min_clients"] = max(1, min(2, users))  # one user alone is a federation of one
    run_cfg, fed = build_configs(flat)
    if "federated.eval_every" not in flat:
        fed = dataclasses.replace(fed, eval_every=fed.rounds)
    return run_cfg, fed


def checkpoint_round(server) -> int:
    """The last round the server's checkpoint holds (0 without one, or with ``federated.resume`` off)."""
    from .federated.checkpoint import read_checkpoint

    if not server.fed.resume or not server.checkpoint_path.is_file():
        return 0
    return int(read_checkpoint(server.checkpoint_path)[0]["round"])


def run_rounds(server, engine: str, hook: Callable[[int], None], flower: FlowerEngine | None,
               flower_backend: str) -> None:
    """The federation's rounds up to ``federated.rounds`` on ``engine``; ``server`` is prepared afterwards
    (restored from the last round's checkpoint when Flower ran them in its own server object)."""
    from .federated.server import run_federated

    if engine == "batched":
        from .federated.transports import BatchedTransport

        server.prepare()
        run_federated(server, BatchedTransport(server, server.cfg, server.fed), hook, finish=False)
        return
    if flower is None:
        raise ValueError("--engine flower: run it as 'post-fl federate --engine flower' (python -m simulation.federate)")
    level = logging.getLogger("post_fl").level  # the ServerApp quiets post_fl's logger to one log view
    try:
        flower(server.cfg, server.fed, hook, backend=flower_backend)
    finally:
        logging.getLogger("post_fl").setLevel(level)
    server.prepare()
    if server.round < server.fed.rounds and server.checkpoint_path.is_file():
        server.load_checkpoint()  # federated.resume = false: the rounds Flower just ran are in the checkpoint


def per_user_privacy(server, privacy: dict) -> dict:
    """The table's privacy section: the federation's (per-user ledgers, user level, aggregation) plus the
    largest per-user epsilon and delta as ``epsilon`` / ``delta``, and min / median / max over all users
    (0 for a user never sampled)."""
    from .federated.client import client_partition
    from .privacy.accounting import calibrate_noise_multiplier, planned_steps

    run_cfg, fed = server.cfg, server.fed
    sample = privacy["sample_level"]
    private = run_cfg.tune.private
    eps = [float(sample["epsilon_per_client"].get(str(c), 0.0)) if private else math.inf
           for c in range(fed.num_clients)]
    deltas = [float(d) for d in sample["delta_per_client"].values() if d is not None]
    sizes = [len(client_partition(run_cfg, fed, c)) for c in range(fed.num_clients)]
    sigmas = sorted({calibrate_noise_multiplier(run_cfg.tune, n, fed.rounds * planned_steps(run_cfg.tune, n))
                     for n in set(sizes)}) if private else [0.0]
    sigma = f"{sigmas[0]:.4g}" if len(sigmas) == 1 else f"{sigmas[0]:.4g}-{sigmas[-1]:.4g} by user size"
    return {**privacy, "epsilon": max(eps), "delta": max(deltas, default=None), "noise_multiplier": sigma,
            "dp": private, "target_epsilon": run_cfg.tune.target_epsilon,
            "unit": f"example-level per user: the largest over {fed.num_clients} users, each user's own ledger",
            "per_user_epsilon": {"min": min(eps), "median": statistics.median(eps), "max": max(eps),
                                 "users": fed.num_clients, "users_trained": len(sample["epsilon_per_client"])},
            "examples_per_user": {"min": min(sizes), "median": statistics.median(sizes), "max": max(sizes)}}


def run_federate(run_cfg: RunConfig, fed_cfg, engine: str = "batched", flower: FlowerEngine | None = None,
                 flower_backend: str = "ray", progress: bool = True, emit: Callable[[str], None] = print,
                 after_round: Callable[[int], None] | None = None) -> dict:
    """Run (or resume) the federated job into ``run_cfg.output_dir``; returns its results.

    Every input is checked first (:func:`post_fl.preflight.check_federate`; nothing is written when one is
    bad). ``flower`` is the Flower engine (needed for ``engine = "flower"``); ``emit`` prints the round lines;
    ``after_round(r)`` runs after round r's line (tests use it to stop a job).
    """
    from .federated.server import FederatedServer
    from .pipeline import Pipeline
    from .preflight import check_federate
    from .resume import write_marker
    from .round_monitor import RoundMonitor, VALIDATION_NOTE

    if engine not in ENGINES:
        raise ValueError(f"--engine: expected one of {', '.join(ENGINES)}, got {engine!r}")
    t0 = time.perf_counter()
    check_federate(run_cfg, fed_cfg, engine)
    pipe = Pipeline(run_cfg, progress=progress)
    pipe.save_config()
    if not pipe.is_complete("distill"):
        pipe.distill()
    cache = pipe.stage_result("distill").get("student_cache")
    emit("student: " + {"hit": "the cached distilled student", "miss": "distilled now (and cached)",
                        "off": "distilled now (distill.cache off)"}.get(cache, "model.student")
         + f" -> {run_cfg.model.student or pipe.run / 'student'}")
    server = FederatedServer(run_cfg, fed_cfg, pipe.run, report=log.debug)
    monitor = RoundMonitor(run_cfg, fed_cfg, pipe.student, pipe.task.validation, server.checkpoint_path,
                           server.ledger_dir, pipe.run, emit)
    per_round = f"Poisson rate {fed_cfg.fraction_train}" if fed_cfg.user_dp else str(fed_cfg.clients_per_round)
    emit(f"{fed_cfg.num_clients} users ({fed_cfg.partitioning}), {fed_cfg.rounds} rounds of {per_round} users, "
         f"engine {engine}; the validation accuracy per round is harness monitoring outside DP (selects nothing)")
    monitor.start(checkpoint_round(server))

    def hook(rnd: int) -> None:
        monitor(rnd)
        if after_round is not None:
            after_round(rnd)

    t_rounds = time.perf_counter()
    run_rounds(server, engine, hook, flower, flower_backend)
    if server.round < fed_cfg.rounds:
        raise RoundsStopped(f"the rounds stopped after round {server.round} of {fed_cfg.rounds} (see the log "
                            "above); run the same command again to resume")
    seconds_rounds = time.perf_counter() - t_rounds
    privacy = per_user_privacy(server, server.privacy_report())
    server.save_student_prompt(privacy)
    prompt_sha = hashlib.sha256(server.prompt.tobytes()).hexdigest()
    # the federated prompt's stage record: later stages' resume digests follow the prompt
    write_json({"federated": True, "rounds": server.round, "users": fed_cfg.num_clients,
                "epsilon": privacy["epsilon"], "delta": privacy["delta"], "prompt_sha256": prompt_sha,
                **({"not_private": privacy["not_private"]} if "not_private" in privacy else {})},
               pipe.run / "stages" / "tune.json")
    rounds_detail, finish_t0 = server.metrics, time.perf_counter()
    del server  # its teacher and student; the stages below load their own
    if pipe.is_complete("evaluate"):
        emit(f"transfer and evaluation completed earlier with these inputs: {pipe.run / 'results.json'}")
        return read_json(pipe.run / "results.json")
    for stage, wanted in (("transfer", True), ("tune_teacher", run_cfg.eval.teacher_prompt_tuning)):
        if wanted and not pipe.is_complete(stage):
            emit({"transfer": "POST transfer of the global prompt to the teacher (public data only) ...",
                  "tune_teacher": "the teacher's own prompt, no DP (the upper bound) ..."}[stage])
            getattr(pipe, stage)()
    emit("evaluation ...")
    results = pipe.evaluate()
    privacy["outside_dp"] = results["privacy"]["outside_dp"] + "; " + VALIDATION_NOTE
    results["privacy"] = privacy
    results["data"].update(users=fed_cfg.num_clients, partitioning=fed_cfg.partitioning)
    results["federated"] = {
        "engine": engine, "users": fed_cfg.num_clients, "rounds": monitor.rows, "round_details": rounds_detail,
        "validation_monitoring": VALIDATION_NOTE, "prompt_sha256": prompt_sha,
        "settings": dataclasses.asdict(fed_cfg),
        # wall seconds of the run that wrote these results (a resumed run counts only its own part)
        "seconds": {"rounds": seconds_rounds, "transfer_and_evaluation": time.perf_counter() - finish_t0,
                    "total": time.perf_counter() - t0}}
    if run_cfg.insecure_reproducible:
        results["not_private"] = privacy.get("not_private")
    write_json(results, pipe.run / "results.json")
    write_marker(pipe.run, "evaluate", pipe.stage_inputs("evaluate"), pipe.run / "results.json")
    plot_run(results, pipe.run)
    return results


def plot_run(results: dict, run_dir: Path) -> Path:
    """``federated.png``: validation accuracy by round and the final accuracies with their intervals."""
    from .experiments.plots import plot_federated_run

    fed, priv = results["federated"], results["privacy"]
    eps = priv["per_user_epsilon"]
    title = (f"federated POST: {fed['users']} users, {len(fed['rounds']) - 1} rounds, "
             + (f"ε per user ≤ {eps['max']:.3g}" if priv["dp"] else "no DP")
             + (" [NOT PRIVATE: insecure_reproducible]" if "not_private" in results else ""))
    caption = ("Left: the student with the global prompt after each round, on the private validation split, "
               "95% Wilson band (harness monitoring outside DP; selects nothing). Right: test accuracies, 95% Wilson "
               "intervals.")
    return plot_federated_run(fed["rounds"], results["accuracy"], results.get("accuracy_intervals", {}),
                              Path(run_dir) / RESULTS_PNG, title, caption,
                              validation_n=int(results.get("data", {}).get("validation") or 0))


def summary_lines(results: dict, run_dir: Path) -> list[str]:
    """What ``post-fl federate`` prints under the results table: per-user and user-level epsilon, the files."""
    priv, fed = results["privacy"], results["federated"]
    eps = priv["per_user_epsilon"]
    lines = []
    if priv["dp"]:
        lines.append(f"epsilon per user (example level, each user's own ledger; delta {priv['delta']:.3g}): "
                     f"min {eps['min']:.3g}, median {eps['median']:.3g}, max {eps['max']:.3g} over {eps['users']} "
                     f"users ({eps['users_trained']} trained)")
    user = priv.get("user_level")
    if user:
        lines.append(f"user-level epsilon (DP-FedAvg, delta {user['delta']:.3g}): {user['epsilon_against_world']:.4g} "
                     f"against the world, {user['epsilon_against_server']:.4g} against the server"
                     + (" (none: the server adds the noise)" if user["noise"] == "server" else ""))
    if "not_private" in priv:
        lines.append(f"privacy: {priv['not_private']}")
    secs = fed["seconds"]
    lines.append(f"wall time: rounds {secs['rounds']:.0f} s, transfer and evaluation {secs['transfer_and_evaluation']:.0f} s, "
                 f"total {secs['total']:.0f} s (of the run that wrote these results)")
    lines.append(f"written: {run_dir / 'results.json'}, {run_dir / 'rounds.csv'}, {run_dir / RESULTS_PNG}")
    return lines
