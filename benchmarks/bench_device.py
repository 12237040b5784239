"""Per-stage wall times of the main job, and of POST's transfer at the paper's budget, on whatever device is here.

    .venv/bin/python benchmarks/bench_device.py --out runs/bench_device/auto.json            # the default job
    .venv/bin/python benchmarks/bench_device.py --set compute.device='"cpu"' --out runs/bench_device/cpu.json
    .venv/bin/python benchmarks/bench_device.py --small --out /tmp/bench_small.json          # a smoke run

Runs the stages of ``post-fl run`` one by one (distill, tune, transfer, tune_teacher, evaluate) into a fresh run
folder with the default settings (or ``--config`` / ``--set``), then POST's transfer once more with
``--transfer-steps`` steps (default 2000: the paper trains its transfer for thousands of steps; the main job's
default is 50), and writes one JSON: the device and precision actually used (``compute``), the machine, each
stage's seconds, the long transfer's seconds (targets, training, per step), the accuracies, and the settings.

Caches are off (``distill.cache``, ``eval.cache_zero_shot``) so every stage computes what it would on a first
run; ``--use-caches`` keeps them. On a GPU the clock is read after ``torch.cuda.synchronize()``, and peak GPU
memory is reported. Same commit, two runs (``compute.device = "auto"`` and ``"cpu"``) give the per-stage speed-up;
docs/benchmarks.md#gpu says what has been measured. ``--small`` shrinks every stage (64 training, 64 test and
128 public texts, a few steps each; a 20-step long transfer) so that the script itself can be checked on a CPU
in minutes (``tests/test_compute.py`` runs it on a tiny model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMALL = {"data.max_train_examples": 64, "data.max_test_examples": 64, "data.max_public_examples": 128,
         "data.max_validation_examples": 64, "distill.steps": 10, "distill.eval_every": 5,
         "distill.corpus_tokens": 4096, "transfer.steps": 5, "tune.epochs": 1.0}
SMALL_TRANSFER_STEPS = 20


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn):
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - t0


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def machine() -> dict:
    import torch

    out = {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if torch.cuda.is_available():
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return out


def bench(cfg, run_dir: Path, transfer_steps: int) -> dict:
    """Every stage of the main job, then a ``transfer_steps`` transfer; seconds per stage and what they produced."""
    import torch

    from post_fl.method.transfer import transfer_prompt
    from post_fl.pipeline import PROMPT_STUDENT, Pipeline

    pipe = Pipeline(cfg, run_dir)
    stages = ["distill", "tune", "transfer"] + (["tune_teacher"] if cfg.eval.teacher_prompt_tuning else [])
    pipe.preflight(stages + ["evaluate"])  # a device that is not here is refused now, before any stage
    pipe.save_config()
    _, load_seconds = _timed(lambda: (pipe.task, pipe.teacher))
    seconds = {"load_task_and_teacher": load_seconds}
    results = {}
    for name in stages + ["evaluate"]:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        results[name], seconds[name] = _timed(getattr(pipe, name))
        print(f"bench_device: {name} {seconds[name]:.1f}s", flush=True)
    student, teacher = pipe.student, pipe.teacher
    long_cfg = replace(cfg.transfer, steps=transfer_steps, eval_every=max(cfg.transfer.eval_every, transfer_steps // 20))
    long, long_seconds = _timed(lambda: transfer_prompt(student, pipe.prompt(PROMPT_STUDENT, student), teacher,
                                                        pipe.task.public, long_cfg, cfg.seed))
    print(f"bench_device: transfer of {transfer_steps} steps {long_seconds:.1f}s", flush=True)
    out = {
        "compute": teacher.compute.describe() if teacher.compute is not None else None,
        "models": {"teacher": teacher.describe(), "student": student.describe()},
        "stages_seconds": seconds,
        "main_job_seconds": sum(seconds[s] for s in stages + ["evaluate"]),
        "transfer_long": {"steps": transfer_steps, "seconds": long_seconds, "seconds_targets": long.seconds_targets,
                          "seconds_training": long.seconds_training,
                          "seconds_per_step": long.seconds_training / max(transfer_steps, 1),
                          "target_examples": long.target_examples, "best_step": long.best_step,
                          "first_loss": long.first_loss, "last_loss": long.last_loss},
        "accuracy": results["evaluate"]["accuracy"],
        "distill": {k: results["distill"].get(k) for k in ("steps", "stopped_by", "agreement_after", "seconds")},
        "tune": {k: results["tune"].get(k) for k in ("steps", "epsilon", "seconds")},
    }
    if torch.cuda.is_available():
        out["peak_gpu_memory_bytes_last_stage"] = torch.cuda.max_memory_allocated()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="a post-fl TOML config (default: the embedded default job)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one setting (TOML value), e.g. --set compute.device='\"cpu\"'")
    ap.add_argument("--transfer-steps", type=int, default=None,
                    help="steps of the long transfer (default 2000; 20 with --small)")
    ap.add_argument("--small", action="store_true", help="tiny stages: checks the script on a CPU in minutes")
    ap.add_argument("--use-caches", action="store_true",
                    help="keep distill.cache and eval.cache_zero_shot as configured (default: off, first-run times)")
    ap.add_argument("--run-dir", default=None, help="run folder (default: a fresh temporary folder)")
    ap.add_argument("--out", default="runs/bench_device/bench_device.json", help="where the JSON goes")
    args = ap.parse_args(argv)

    from post_fl.cli import parse_overrides
    from post_fl.core.config import load_config

    overrides = dict(SMALL) if args.small else {}
    if not args.use_caches:
        overrides.update({"distill.cache": False, "eval.cache_zero_shot": False})
    overrides.update(parse_overrides(args.overrides))
    cfg = load_config(args.config, overrides)
    steps = args.transfer_steps if args.transfer_steps is not None else (SMALL_TRANSFER_STEPS if args.small else 2000)
    run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="bench-device-"))
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    result = bench(cfg, run_dir, steps)
    result = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "started": started, "commit": _commit(), "machine": machine(), "run_dir": str(run_dir),
              **result, "settings": cfg.to_dict()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"bench_device: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
