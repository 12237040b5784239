"""Acceptance measurement of the main job (not a test): wall time, stage times, load, and every accuracy.

Runs the README's first command (``post-fl run``, optionally with ``--config`` / ``--set``) as a
subprocess into ``--out``, with the post-fl cache in ``--cache`` (use an empty directory for a
fresh-machine run: SmolLM2 conversion, the teacher's one pass over the public text and the
distillation are then included). Samples /proc/loadavg every 10 s (the machine may be shared: the
JSON says how busy it was). With ``--rerun-distill`` it then times ``post-fl distill`` into a second
folder, which finds the cached student, so the cached-student wall time of the main job is the fresh
wall time minus the distill stage plus that.

    .venv/bin/python benchmarks/bench_default.py --out runs/bench/default --cache runs/bench/cache \\
        --json runs/bench/default.json [--config benchmarks/sst2_agnews.toml] [--set key=value ...]

Writes: wall seconds, per-stage seconds (from the job's log), load samples, and from results.json
the accuracies with n, standard errors and 95% Wilson intervals, the comparisons in standard errors,
the recovery ratio, tuning cost per epoch (student vs teacher) and the distillation report.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def run_timed(cmd: list[str], env: dict, log_path: Path) -> tuple[float, list[float], str]:
    """Run ``cmd``; return (wall seconds, 1-min load average samples every 10 s, combined output)."""
    samples: list[float] = [_load()]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(10):
            samples.append(_load())

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    with log_path.open("w") as fh:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    done.set()
    out = log_path.read_text()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed with exit code {proc.returncode}; see {log_path}")
    return wall, samples, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cache", type=Path, required=True, help="POST_FL_CACHE for the run (empty = fresh machine)")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--rerun-distill", action="store_true")
    args = ap.parse_args()
    env = {**os.environ, "POST_FL_CACHE": str(args.cache.resolve())}
    fresh = not any(args.cache.glob("students/*")) if args.cache.exists() else True
    base = [str(ROOT / ".venv" / "bin" / "post-fl")]
    opts = (["--config", str(args.config)] if args.config else []) + sum((["--set", s] for s in args.overrides), [])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    wall, loads, out = run_timed(base + ["run", "-o", str(args.out), "--no-resume"] + opts, env,
                                 args.out.parent / f"{args.out.name}.log")
    stages = {m.group(1): float(m.group(2)) for m in re.finditer(r"stage (\w+) done in ([0-9.]+)s", out)}
    res = json.loads((args.out / "results.json").read_text())
    summary = {"command": " ".join(["post-fl", "run"] + opts), "cache_was_empty": fresh, "wall_seconds": wall,
               "stage_seconds": stages, "load_1min_samples": loads,
               "load_1min_mean": sum(loads) / len(loads), "cpu_count": os.cpu_count(),
               "accuracy": res["accuracy"], "accuracy_intervals": res.get("accuracy_intervals"),
               "comparison": res.get("comparison"), "cost": res.get("cost"), "privacy": res.get("privacy"),
               "data": res.get("data"), "distill": res.get("distill"), "transfer": res.get("transfer")}
    if args.rerun_distill:
        again = args.out.with_name(args.out.name + "-cached")
        w2, l2, _ = run_timed(base + ["distill", "-o", str(again)] + opts, env,
                              args.out.parent / f"{again.name}.log")
        summary["cached_distill_wall_seconds"] = w2
        summary["cached_distill_load_1min_samples"] = l2
        if "distill" in stages:
            summary["main_job_wall_with_cached_student_seconds"] = wall - stages["distill"] + w2
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps({k: summary[k] for k in ("wall_seconds", "stage_seconds", "load_1min_mean", "accuracy",
                                              "comparison")}, indent=2, default=str))


if __name__ == "__main__":
    main()
