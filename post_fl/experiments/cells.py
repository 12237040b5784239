"""Running one sweep cell (:func:`run_cell`): its run config, the federated run behind each method, the
cost columns and the reference methods. What the cells share (teacher, student, transports, cost probe):
:mod:`post_fl.experiments.context`.

Methods, all on the same data split and the same teacher:

``zero_shot``
    the teacher without a prompt (one cell per seed).
``calibrated_zero_shot``
    the teacher without a prompt, its class scores shifted by a per-class bias fitted on the
    *validation* split (:func:`post_fl.method.evaluate.fit_class_bias`; never on test): the zero-shot
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
    d_χ-privacy token mechanism of ``post_fl.privacy.rapt`` and its labels with randomised response,
    and tunes the prompt on the teacher with the task loss plus a reconstruction loss of the
    *privatised* tokens (RAPT reconstructs the plain ones, which would put raw data into the
    uploaded update); no DP-SGD. The sweep's ε is mapped to RAPT's η by
    ``per-token ε = η · diam(φ(V))`` (see :func:`rapt_eta`), a *local, per-token* guarantee;
    the update, post-processing of the privatised data, is ``(k ε + ε_label)``-LDP per example
    of k tokens (:func:`rapt_row_privacy`), not DP-SGD's example-level (ε, δ).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.config import config_from_dict
from .audit_cells import audit_prompt_tuning
from .context import SweepContext, SweepTransport, TimedBatchedTransport, dp_client_fn, seconds_per_step
from .grid import REFERENCE_METHODS, STUDENT_METHODS, Cell
from .rapt_cells import rapt_eta, privatize_batch, rapt_label_epsilon, rapt_row_privacy, rapt_client_fn

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- one cell
def _cell_configs(ctx: SweepContext, cell: Cell, model_dir: Path, run_dir: Path):
    from ..federated.config import FederatedConfig

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
    from ..core.config import ConfigError

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
    from ..core.jsonio import read_json, write_json
    from ..federated.client import client_partition
    from ..federated.server import FederatedServer, run_federated

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
        client_fn = rapt_client_fn(server, run_cfg, fed, eta, ctx.cfg.rapt,
                                    rapt_label_epsilon(ctx.cfg.rapt, cell.target_epsilon))
        transport = SweepTransport(fed.num_clients, client_fn)
    elif ctx.cfg.engine == "batched":
        transport = TimedBatchedTransport(server, run_cfg, fed)
    else:
        transport = SweepTransport(fed.num_clients, dp_client_fn(server, run_cfg, fed))
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
            prompt = server.prompt_module()
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
            from ..core.tasks import load_student

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
    from ..method.evaluate import accuracy_of_scores, majority_class_accuracy

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
        from ..core.tasks import load_student

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
    from ..method.evaluate import accuracy_summary

    acc, n = row.get("accuracy"), row.get("test_examples")
    if isinstance(acc, (int, float)) and math.isfinite(acc) and isinstance(n, int) and n > 0:
        summ = accuracy_summary(float(acc), n)
        row.update(accuracy_ci_low=summ["ci95"][0], accuracy_ci_high=summ["ci95"][1], accuracy_stderr=summ["stderr"])
    return row


def calibrated_zero_shot(ctx: SweepContext, seed: int) -> tuple[float, torch.Tensor]:
    """Calibrated zero-shot test accuracy of the teacher and its per-class bias, fitted on the validation
    split only (:func:`post_fl.method.evaluate.fit_class_bias`): ``(accuracy, bias)``."""
    from ..method.evaluate import accuracy_of_scores, fit_class_bias

    task = ctx.task(seed)
    if task.validation is None or len(task.validation) == 0:
        raise ValueError("calibrated_zero_shot needs a validation split (data.validation_fraction > 0 or the "
                         "embedded task); the bias is never fitted on test")
    bias = fit_class_bias(ctx.zero_shot_scores(seed, "validation"), task.validation.labels)
    return accuracy_of_scores(ctx.zero_shot_scores(seed, "test"), task.test.labels, bias), bias

