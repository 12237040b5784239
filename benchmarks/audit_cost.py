"""Seconds per trial of the sweep's default canary audit (post_fl.experiments.grid.AuditSweepConfig defaults).

    python benchmarks/audit_cost.py [EPSILON] [TRIALS]     # e.g. 8 2   (inf = no DP)

Runs TRIALS trials (1 of them calibration) on a 2-layer student of the embedded MiniLM
teacher (layer selection only, no distillation steps: the cost, not the accuracy, is measured)
and the tweet task of sweeps/default.toml, and prints seconds per trial and the extrapolation
to the default 100 trials.
"""

import dataclasses
import math
import sys
import time

import torch

from post_fl import experiments as S
from post_fl.core.config import DistillConfig
from post_fl.method.distill import distill_student
from post_fl.core.tasks import load_task, load_teacher


def main() -> None:
    eps = float(sys.argv[1]) if len(sys.argv) > 1 else math.inf
    trials = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    torch.set_num_threads(2)
    cfg = S.load_sweep_config("sweeps/default.toml")
    base = dataclasses.replace(cfg.base, model=dataclasses.replace(cfg.base.model, teacher="embedded"))
    task = load_task(base)
    teacher = load_teacher(base, task)
    student, _ = distill_student(teacher, task.public, DistillConfig(num_layers=2, steps=0), 0)
    audit = dataclasses.replace(S.AuditSweepConfig(), trials=trials, calibration_trials=1)
    data = task.train.shuffled(17).head(audit.base_examples)
    t0 = time.perf_counter()
    res = S.audit_prompt_tuning(student, data, eps, audit, base.tune, 0)
    dt = time.perf_counter() - t0
    print(f"epsilon={eps} trials={trials}: {dt:.1f} s, {dt / trials:.1f} s/trial; "
          f"the default {S.AuditSweepConfig().trials} trials: {S.AuditSweepConfig().trials * dt / trials / 60:.0f} min")
    print(res)


if __name__ == "__main__":
    main()
