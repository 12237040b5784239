"""``post-fl``: the command line of the federated job, the single-site pipeline and the evaluation harness.

    post-fl federate   [--engine batched|flower] [--users N] [--rounds R] [--partitioning P] + run's options
                                                                              many simulated users + results
    post-fl run        [--config F] [--output-dir D] [--set key=value ...]   all stages + results table
    post-fl distill    same options                                           stage 1 only
    post-fl tune       ...                                                    stage 2 (DP prompt tuning)
    post-fl transfer   ...                                                    stage 3 (POST transfer)
    post-fl tune-teacher ...                                                  baseline (non-private)
    post-fl evaluate   ...                                                    stage 4 -> results.json
    post-fl sweep      --config GRID.toml [--dry-run | --report-only]          privacy-utility sweep
    post-fl show-config                                                       every setting and its default

Every command takes ``--verbose`` / ``-v`` (post-fl's debug lines too) or ``--quiet`` / ``-q`` (warnings
and errors only, no progress); see :func:`post_fl.core.progress.setup_logging`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .core.config import ConfigError, RunConfig, load_config

STAGES = {
    "distill": "derive the student from the teacher by knowledge distillation on public text",
    "tune": "tune a soft prompt on the student with DP-SGD on the private training set",
    "transfer": "transfer the student prompt to the teacher with POST's loss on public text",
    "tune-teacher": "baseline: tune a non-private prompt on the teacher itself (costly upper bound)",
    "evaluate": "test accuracy of every baseline + epsilon + cost -> results.json",
}


def _parse_value(text: str):
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string such as a path


def parse_overrides(items: list[str]) -> dict:
    """``["tune.lr=0.1", "data.train=x.csv"]`` -> ``{"tune.lr": 0.1, "data.train": "x.csv"}`` (TOML values)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. tune.target_epsilon=4")
        out[key.strip()] = _parse_value(value.strip())
    return out


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, default=None,
                   help="TOML file with [model] [data] [prompt] [tune] [distill] [transfer] [eval] sections "
                        "(see 'post-fl show-config'), or a run folder's saved config.json to continue that "
                        "run; default: the embedded default model and data")
    p.add_argument("--output-dir", "-o", type=Path, default=None,
                   help="run folder for every artifact (default: output_dir from the config, runs/default)")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set tune.target_epsilon=4 --set data.train=my.csv "
                        "(repeatable; values are TOML: numbers, true/false, \"strings\", inf)")
    p.add_argument("--seed", type=int, default=None,
                   help="the one seed of every non-private random choice (DP noise never uses it)")
    p.add_argument("--insecure-reproducible", action="store_true", default=None,
                   help="seed the DP noise and sampling from --seed for bit-exact reruns: the outputs are NOT "
                        "private and are labelled so (tests and debugging only)")
    _verbosity(p)


def _verbosity(p: argparse.ArgumentParser) -> None:
    """``--verbose`` / ``--quiet``: how much a command logs (one of them, or neither)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--verbose", "-v", action="store_true",
                       help="also post-fl's debug lines (resume decisions, input digests) and the libraries' warnings")
    group.add_argument("--quiet", "-q", action="store_true",
                       help="no progress (post-fl's or the libraries'), no library warnings; post-fl warnings only")


def build_parser() -> argparse.ArgumentParser:
    """The ``post-fl`` argument parser: one subcommand per pipeline stage, plus ``run``, ``sweep`` and ``show-config``."""
    parser = argparse.ArgumentParser(
        prog="post-fl",
        description="POST: privacy-preserving soft-prompt transfer. A prompt is tuned with DP-SGD on a small "
                    "model distilled from a large one, then transferred to the large model on public data only.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _federate_arguments(sub.add_parser("federate", help=FEDERATE_HELP, description=FEDERATE_HELP))
    p = sub.add_parser("run", help="run every stage (distill, DP tune, transfer, baselines, evaluate) "
                                   "and print a results table; resumes after the last completed stage")
    _common(p)
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="run every stage again even if it completed earlier in this run folder with the "
                        "same inputs (default: skip those, so a killed run continues where it stopped)")
    for name, text in STAGES.items():
        _common(sub.add_parser(name, help=text, description=text))
    sub.add_parser("show-config", help="print every setting with its default value and what it means (TOML)")
    _sweep_arguments(sub.add_parser("sweep", help=SWEEP_HELP, description=SWEEP_HELP))
    return parser


FEDERATE_HELP = ("the federated job: distil (cached), N simulated users each tune the prompt with DP-SGD on "
                 "their part of the private data for R rounds, the server aggregates, POST transfers the "
                 "global prompt to the teacher on public data, evaluation -> results table, results.json, "
                 "rounds.csv, federated.png (default folder runs/federated; resumes after the last round)")


def _federate_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--engine", choices=("batched", "flower"), default="batched",
                   help="batched (default): every sampled user's DP-SGD in shared passes of the student, in this "
                        "process; flower: Flower's Simulation Engine with the real ServerApp/ClientApp and messages "
                        "(SecAgg+ with federated.secagg = true); both run the same round loop")
    p.add_argument("--users", type=int, default=None, metavar="N",
                   help="simulated users, each holding a part of the private training set "
                        "(federated.num_clients; default 20)")
    p.add_argument("--rounds", type=int, default=None, metavar="R", help="federated rounds (federated.rounds; "
                                                                         "default 8)")
    p.add_argument("--partitioning", choices=("iid", "dirichlet", "pathological"), default=None,
                   help="how the private training set is split among the users (federated.partitioning; default "
                        "iid; federated.dirichlet_alpha / federated.classes_per_client set the skew)")
    p.add_argument("--flower-backend", choices=("ray", "inprocess"), default="ray",
                   help="with --engine flower: ray (Flower's Simulation Engine, default) or inprocess (the same "
                        "apps and messages over an in-process grid, no Ray; tests and debugging)")


def run_federate_command(args, argv: list[str] | None, engines: dict | None) -> int:
    """``post-fl federate``: resolve the settings, run (or resume) the job, print the results table."""
    from .federate import RoundsStopped, federate_configs, run_federate, summary_lines

    flower = (engines or {}).get("flower")
    if args.engine == "flower" and flower is None:  # the Flower glue runs it; post_fl never imports the glue
        import subprocess

        return subprocess.call([sys.executable, "-m", "simulation.federate",
                                *(argv if argv is not None else sys.argv[1:])])
    overrides = parse_overrides(args.overrides)
    for key, value in (("seed", args.seed), ("output_dir", args.output_dir and str(args.output_dir)),
                       ("insecure_reproducible", args.insecure_reproducible or None)):
        if value is not None:
            overrides[key] = value
    run_cfg, fed = federate_configs(args.config, overrides, args.users, args.rounds, args.partitioning)
    try:
        results = run_federate(run_cfg, fed, args.engine, flower, args.flower_backend, progress=not args.quiet,
                               emit=(lambda line: None) if args.quiet else lambda line: print(line, flush=True))
    except RoundsStopped as exc:
        print(f"post-fl federate: error: {exc}", file=sys.stderr)
        return 1
    run = Path(run_cfg.output_dir)
    print_results(results, run)
    for line in summary_lines(results, run):
        print(line)
    return 0


SWEEP_HELP = ("privacy-utility sweep: accuracy of zero-shot / direct / POST / teacher-DP / RAPT over clients, "
              "epsilon and partitioning -> results.csv, plots, Markdown table (resumable)")


def _sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, required=True,
                   help="sweep file (TOML): grid axes + [base] run config, e.g. sweeps/default.toml")
    p.add_argument("--output-dir", "-o", type=Path, default=None,
                   help="where results.csv, results.md and plots/ go (default: output_dir in the sweep file)")
    p.add_argument("--dry-run", action="store_true", help="list the cells (and which are done) and exit")
    p.add_argument("--report-only", action="store_true",
                   help="only redraw plots and the Markdown table from an existing results.csv")
    _verbosity(p)


def run_sweep_command(args) -> int:
    """``post-fl sweep``: list, run (or resume) or redraw a sweep (:mod:`post_fl.experiments`)."""
    from .experiments.grid import RESULTS_CSV, RESULTS_MD, expand_cells, load_sweep_config
    from .experiments.report import finished_keys, read_results, write_report

    cfg = load_sweep_config(args.config, args.output_dir)
    out = Path(cfg.output_dir)
    if args.dry_run:
        done = finished_keys(out / RESULTS_CSV)
        for c in expand_cells(cfg):
            print(("done  " if c.key in done else "todo  ") + c.key)
        return 0
    if args.report_only:
        rows = read_results(out / RESULTS_CSV)
        if not rows:
            print(f"post-fl sweep: error: {out / RESULTS_CSV} has no rows", file=sys.stderr)
            return 2
        paths = write_report(rows, out, cfg)
    else:
        from .experiments.sweep import run_sweep
        from .preflight import check_run

        check_run(cfg.base, check_folder=False)  # every input of the base run checked before any cell starts
        run_sweep(cfg, progress=not args.quiet, report=print)
        paths = {"markdown": out / RESULTS_MD, "plots": out / "plots"}
    print(f"sweep results: {out / RESULTS_CSV}; table: {paths['markdown']}; plots: {out / 'plots'}")
    return 0


def resolve_config(args) -> RunConfig:
    """The RunConfig from --config, --set overrides, --seed, --output-dir and --insecure-reproducible."""
    overrides = parse_overrides(args.overrides)
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.output_dir is not None:
        overrides["output_dir"] = str(args.output_dir)
    if getattr(args, "insecure_reproducible", None):
        overrides["insecure_reproducible"] = True
    try:
        return load_config(args.config, overrides)
    except ConfigError as first:  # report every bad setting, not only the first
        from .core.tasks import PreflightError
        from .preflight import config_problems

        raise PreflightError(config_problems(args.config, overrides) or [str(first)]) from None


def _fmt(v) -> str:
    """A number for the results table: 4 significant digits, so a small delta stays exact (0.00025, 1e-05)."""
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.4g}"
    return str(v)


def print_results(results: dict, run_dir: Path) -> None:
    """A results table (rich) of accuracies, privacy and cost."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"POST results ({run_dir / 'results.json'})")
    table.add_column("method")
    table.add_column("test accuracy", justify="right")
    table.add_column("95% interval (Wilson)", justify="right")
    intervals = results.get("accuracy_intervals", {})
    for name, value in results["accuracy"].items():
        ci = intervals.get(name, {}).get("ci95")
        table.add_row(name.replace("_", " "), f"{value:.3f}", f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "")
    console.print(table)
    comp = results.get("comparison", {})
    for key, value in comp.items():
        if key == "recovery_ratio":
            console.print(f"recovery ratio (transferred - zero-shot) / (own prompt - zero-shot) = {value:.2f}")
        else:
            console.print(f"{key.replace('_', ' ')}: {value['difference']:+.3f} "
                          f"({value['in_standard_errors']:+.1f} standard errors independent, "
                          f"{value.get('in_paired_standard_errors', float('nan')):+.1f} paired)")
    dist = results.get("distill", {})
    if "agreement_after" in dist:
        val = dist.get("validation_agreement_after")
        console.print(f"student/teacher agreement: class {dist['agreement_after']:.3f} (held-out public text)"
                      + (f", {val:.3f} (validation)" if val is not None else "")
                      + f", next-token top-1 {dist.get('next_token_agreement_after', float('nan')):.3f}; "
                      f"student cache {dist.get('student_cache', 'off')}")
    priv = results["privacy"]
    console.print(f"privacy: epsilon = {_fmt(priv['epsilon'])}, delta = {_fmt(priv['delta'])} "
                  f"({priv['unit']}; noise multiplier {_fmt(priv['noise_multiplier'])})")
    if priv.get("outside_dp"):
        console.print(f"outside DP: {priv['outside_dp']}")
    cost = results.get("cost", {})
    if "tune_time_ratio_per_example_teacher_over_student" in cost:
        console.print(f"cost: student has {cost['student_parameters']:,} parameters vs teacher "
                      f"{cost['teacher_parameters']:,}; per training example, the teacher's prompt tuning (no DP) "
                      f"took {cost['tune_time_ratio_per_example_teacher_over_student']:.2f}x the student's "
                      "(DP-SGD, per-example gradients)")


def main(argv: list[str] | None = None, engines: dict | None = None) -> int:
    """Entry point of the ``post-fl`` command; ``engines`` = {"flower": ...} when the Flower glue calls it
    (``python -m simulation.federate``)."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "show-config":
        from .core.config_help import dumps_config_with_help

        print(dumps_config_with_help(RunConfig()))
        return 0
    from .core.progress import setup_logging

    # one switch for every progress report and log line; quiet also silences the libraries
    setup_logging(-1 if args.quiet else 1 if args.verbose else 0)
    try:
        if args.command == "sweep":
            return run_sweep_command(args)
        if args.command == "federate":
            return run_federate_command(args, argv, engines)
        from .pipeline import Pipeline

        cfg = resolve_config(args)
        pipe = Pipeline(cfg, progress=not args.quiet)
        if args.command == "run":
            results = pipe.run_all(resume=args.resume)
            print_results(results, pipe.run)
            return 0
        pipe.preflight([args.command.replace("-", "_")])  # every input checked before anything is written
        pipe.save_config()
        method = {"distill": pipe.distill, "tune": pipe.tune, "transfer": pipe.transfer,
                  "tune-teacher": pipe.tune_teacher, "evaluate": pipe.evaluate}[args.command]
        out = method()
        if args.command == "evaluate":
            print_results(out, pipe.run)
        else:
            print(f"{args.command}: done; artifacts in {pipe.run}")
        return 0
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"post-fl {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
