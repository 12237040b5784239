"""The student frontier: for each (student, prompt form) point, does a prompt steer the student, and
does POST carry what it learns to the teacher? A measurement, not a test.

Each point is a set of run-config overrides (``--set``-style ``section.key=value``) on top of a base
config (the embedded default when none). For every point the script measures, on the task's
*validation* split (never test):

* ``student_zero_shot``: the student without a prompt;
* ``student_nondp``: the student with a prompt tuned without DP (``tune.dp = false``, same recipe),
  and ``gain_nondp`` over ``student_zero_shot`` next to the teacher's own non-DP gain when measured;
* ``student_dp``: the student with a DP prompt (``tune.target_epsilon``, default 8) and the epsilon spent;
* ``transferred``: the teacher with the DP prompt transferred by POST (label-free checkpoint selection);
* ``student_epoch_s`` / ``teacher_epoch_s``: seconds of one prompt-tuning epoch on each (measured on a
  few batches in this run, so the ratio is what matters), ``distill_s``: the distillation's CPU time
  (0 on a student-cache hit: the report's own figure is given as ``distill_report_s``).

Rows are appended to ``--out`` (JSON list) as each finishes; a rerun skips points already there
(``--redo`` to measure them again). ``--plot`` draws the table as ``<out>.png``.

    .venv/bin/python benchmarks/student_frontier.py --out benchmarks/results/student_frontier.json \\
        --point lm10-deep distill.objective=lm distill.num_layers=10 distill.layer_selection=ends prompt.form=deep
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from post_fl.core.config import load_config
from post_fl.core.embedded import cache_dir
from post_fl.core.tasks import load_task, load_teacher
from post_fl.method.evaluate import accuracy
from post_fl.method.student_cache import cached_or_distilled_student
from post_fl.method.transfer import transfer_prompt
from post_fl.method.tuning import tune_prompt
from post_fl.core.deep_prompt import as_input_prompt, new_prompt

log = logging.getLogger("student_frontier")


def parse_value(text: str):
    """A --set value: bool, int, float, or string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def epoch_seconds(model, prompt, data, cfg, batches: int = 4) -> float:
    """Seconds of one non-private tuning epoch of ``prompt`` on ``model``, from ``batches`` timed batches."""
    probe = data.head(min(len(data), cfg.batch_size * batches))
    t0 = time.perf_counter()
    tune_prompt(model, prompt, probe, replace(cfg, dp=False, epochs=1.0))
    per_batch = (time.perf_counter() - t0) / max(1, len(probe) // cfg.batch_size)
    return per_batch * len(data) / cfg.batch_size


def measure_point(name: str, overrides: dict, base: str | None, nondp_lr: float | None, skip: set[str]) -> dict:
    """Every figure of one frontier point (see the module docstring)."""
    cfg = load_config(base, overrides)
    task = load_task(cfg)
    val = task.validation
    if val is None or not len(val):
        raise SystemExit("the frontier needs a task with a validation split")
    teacher = load_teacher(cfg, task)
    row: dict = {"point": name, "overrides": overrides, "task": cfg.data.embedded_task if cfg.data.train == "embedded"
                 else cfg.data.train, "n_validation": len(val), "n_train": len(task.train)}
    t0 = time.perf_counter()
    root = cache_dir() / "students" if cfg.distill.cache else None
    cached, student, report, status = cached_or_distilled_student(
        teacher, task.public, cfg.distill, cfg.seed, root, validation=val, corpus=task.distill_corpus)
    if student is None:
        from post_fl.core.tasks import load_student

        student = load_student(cached, cfg, task, teacher)
    row.update(distill_cache=status, distill_s=round(time.perf_counter() - t0, 1) if status != "hit" else 0.0,
               distill_report_s=report.get("seconds"), teacher_layers_kept=report.get("teacher_layers_kept"),
               next_token_agreement=report.get("next_token_agreement_after"),
               class_agreement=report.get("agreement_after"))
    row["student_zero_shot"] = accuracy(student, val)
    log.info("%s: student zero-shot %.3f (distil %s)", name, row["student_zero_shot"], status)
    nondp_cfg = replace(cfg.tune, dp=False, lr=nondp_lr if nondp_lr is not None else cfg.tune.lr)
    if "nondp" not in skip:
        prompt = new_prompt(student, cfg.prompt, cfg.seed)
        t1 = time.perf_counter()
        tune_prompt(student, prompt, task.train, nondp_cfg, cfg.seed)
        row["student_nondp"] = accuracy(student, val, prompt)
        row["nondp_s"] = round(time.perf_counter() - t1, 1)
        row["gain_nondp"] = row["student_nondp"] - row["student_zero_shot"]
        log.info("%s: student + non-DP prompt %.3f", name, row["student_nondp"])
    if "cost" not in skip:
        student_s = epoch_seconds(student, new_prompt(student, cfg.prompt, cfg.seed), task.train, nondp_cfg)
        teacher_s = epoch_seconds(teacher, new_prompt(teacher, cfg.prompt, cfg.seed, "input"), task.train, nondp_cfg)
        # unrounded: a tiny model's epoch can take a few milliseconds
        row.update(student_epoch_s=student_s, teacher_epoch_s=teacher_s, cost_ratio=student_s / teacher_s)
    if "dp" not in skip:
        prompt = new_prompt(student, cfg.prompt, cfg.seed)
        t1 = time.perf_counter()
        res = tune_prompt(student, prompt, task.train, cfg.tune, cfg.seed)
        row.update(student_dp=accuracy(student, val, prompt), epsilon=res.epsilon, delta=res.delta,
                   dp_steps=res.steps, dp_s=round(time.perf_counter() - t1, 1))
        row["gain_dp"] = row["student_dp"] - row["student_zero_shot"]
        log.info("%s: student + DP prompt %.3f (epsilon %.2f)", name, row["student_dp"], res.epsilon)
        if "transfer" not in skip:
            t1 = time.perf_counter()
            tr = transfer_prompt(student, prompt, teacher, task.public, cfg.transfer, cfg.seed)
            row.update(transferred=accuracy(teacher, val, tr.prompt), transfer_s=round(time.perf_counter() - t1, 1),
                       transfer_best_step=tr.best_step, transfer_alpha=tr.alpha_used,
                       direct_use=accuracy(teacher, val, as_input_prompt(prompt)))
            log.info("%s: transferred %.3f, direct use %.3f", name, row["transferred"], row["direct_use"])
    if "teacher" not in skip:
        row["teacher_zero_shot"] = accuracy(teacher, val)
    return row


def plot(rows: list[dict], path: Path) -> None:
    """Bars per point: student zero-shot, + non-DP prompt, + DP prompt, transferred (validation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("student_zero_shot", "student zero-shot"), ("student_nondp", "student + non-DP prompt"),
            ("student_dp", "student + DP prompt (eps 8)"), ("transferred", "teacher + POST-transferred DP prompt"),
            ("transferred_nondp", "teacher + POST-transferred non-DP prompt")]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows) + 2), 4.2))
    width = 0.8 / len(keys)
    for k, (key, label) in enumerate(keys):
        pts = [(i + (k - (len(keys) - 1) / 2) * width, r[key]) for i, r in enumerate(rows) if r.get(key) is not None]
        if not pts:  # a measure no point has: no bar and no legend entry
            continue
        ax.bar([x for x, _ in pts], [y for _, y in pts], width, label=label,  # a point not measured: no bar
               color=("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")[k])
    teacher = [r["teacher_zero_shot"] for r in rows if r.get("teacher_zero_shot") is not None]
    if teacher:
        ax.axhline(teacher[0], color="k", ls="--", lw=1, label="teacher zero-shot")
    own = [r["teacher_nondp"] for r in rows if r.get("teacher_nondp") is not None]
    if own:
        ax.axhline(own[0], color="k", ls=":", lw=1, label="teacher + own non-DP prompt")
    ax.set_xticks(range(len(rows)), [r["point"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0.4, 0.9)
    ax.set_ylabel("validation accuracy")
    ax.set_title("Student frontier: does a prompt steer the student, and does POST carry it?")
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/student_frontier.json")
    ap.add_argument("--config", default=None, help="base run config (TOML); default: the embedded default")
    ap.add_argument("--point", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                    help="a point: its name, then run-config overrides")
    ap.add_argument("--nondp-lr", type=float, default=None, help="learning rate of the non-DP prompt (default tune.lr)")
    ap.add_argument("--skip", default="", help="comma list of measures to skip: nondp,cost,dp,transfer,teacher")
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--plot", action="store_true", help="draw <out>.png from the rows in --out")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    rows = json.loads(out.read_text()) if out.exists() else []
    skip = {s for s in a.skip.split(",") if s}
    for spec in a.point:
        name, pairs = spec[0], spec[1:]
        overrides = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise SystemExit(f"--point {name}: expected key=value, got {pair!r}")
            overrides[key] = parse_value(value)
        if any(r["point"] == name for r in rows) and not a.redo:
            log.info("%s: already in %s (--redo to measure again)", name, out)
            continue
        row = measure_point(name, overrides, a.config, a.nondp_lr, skip)
        row["measured"] = time.strftime("%Y-%m-%d")
        rows = [r for r in rows if r["point"] != name] + [row]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1))
    if a.plot:
        plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
