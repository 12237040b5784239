"""Privacy-utility sweeps: a grid of federated prompt-tuning runs, one CSV row per cell, plots, a table.

    post-fl sweep --config sweeps/default.toml        # run (or resume) the grid
    post-fl sweep --config sweeps/default.toml --report-only   # redraw plots and table from results.csv


This module runs the grid (:func:`run_sweep`) and the ``post-fl sweep`` command, and re-exports
the names of the modules that do each job:

* :mod:`post_fl.sweep_grid` -- the sweep file (TOML) and its grid of cells;
* :mod:`post_fl.sweep_cells` -- one cell: shared state, timed transport, cost probe, the methods;
* :mod:`post_fl.sweep_rapt` -- the RAPT baseline's clients;
* :mod:`post_fl.sweep_audit` -- the membership-inference audit;
* :mod:`post_fl.sweep_report` -- results.csv, plots and the Markdown table.

The student is distilled once per sweep (into ``<output_dir>/student``) unless the base
config names one. Each finished cell is appended to ``<output_dir>/results.csv`` (and
flushed) under a stable key made of its parameters; running the sweep again skips cells
whose key has a row with ``status = ok``. A federated run interrupted mid-way resumes from
its own round checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable

from .core.config import ConfigError
from .sweep_grid import (AuditSweepConfig, Cell, DEFAULT_METHODS, DP_LEVELS, ENGINES, expand_cells, _fmt_eps, _list,
                         _LIST_AXES, load_sweep_config, METHODS, PARTITIONINGS, RaptSweepConfig, REFERENCE_METHODS,
                         RESULTS_CSV, RESULTS_MD, _scalar, _SCALARS, _section, SETTINGS_JSON, STUDENT_METHODS,
                         sweep_config_from_dict, SweepConfig)
from .sweep_report import (append_row, _audit_cell, _cellfmt, CSV_COLUMNS, _delta_cell, EPSILON_AXIS_NOTE,
                           finished_keys, markdown_table, _num, read_results, write_report, clients_tables,
                           migrate_columns, report_context, with_row_interval)
from .sweep_cells import (calibrated_zero_shot, check_examples_per_client, TimedBatchedTransport, USER_LEVEL_UNIT,
                          with_interval, _cell_configs, _dp_client_fn, _federated_run, run_cell, seconds_per_step,
                          server_prompt_rounds, settings_fingerprint, SweepContext, SweepTransport,
                          _warm_noise_calibration)
from .sweep_rapt import (privatize_batch, privatize_client_data, _rapt_client_fn, rapt_eta, rapt_label_epsilon,
                         rapt_local_round, rapt_row_privacy, RAPT_STREAM, RaptPrivateData, scores_and_hidden)
from .sweep_audit import audit_prompt_tuning, _canary_losses, make_canaries

log = logging.getLogger(__name__)

__all__ = ["run_sweep", "CLI_COMMANDS", "METHODS", "REFERENCE_METHODS", "STUDENT_METHODS", "PARTITIONINGS",
    "RESULTS_CSV", "RESULTS_MD", "SETTINGS_JSON", "RaptSweepConfig", "AuditSweepConfig", "SweepConfig",
    "_LIST_AXES", "_SCALARS", "_scalar", "_list", "_section", "sweep_config_from_dict", "load_sweep_config",
    "_fmt_eps", "Cell", "expand_cells", "CSV_COLUMNS", "EPSILON_AXIS_NOTE", "read_results", "finished_keys",
    "append_row", "write_report", "_num", "_cellfmt", "_delta_cell", "_audit_cell", "markdown_table", "rapt_eta",
    "privatize_batch", "scores_and_hidden", "RAPT_STREAM", "RaptPrivateData", "privatize_client_data",
    "rapt_local_round", "rapt_label_epsilon", "rapt_row_privacy", "_rapt_client_fn", "make_canaries",
    "_canary_losses", "audit_prompt_tuning", "settings_fingerprint", "SweepContext", "SweepTransport",
    "_dp_client_fn", "_warm_noise_calibration", "seconds_per_step", "_cell_configs", "_federated_run",
    "server_prompt_rounds", "run_cell", "DEFAULT_METHODS", "DP_LEVELS", "ENGINES", "clients_tables",
    "migrate_columns", "report_context", "calibrated_zero_shot", "check_examples_per_client",
    "TimedBatchedTransport", "USER_LEVEL_UNIT", "with_interval", "with_row_interval"]


# ---------------------------------------------------------------- the sweep
def _check_settings(cfg: SweepConfig) -> None:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    p = out / SETTINGS_JSON
    current = settings_fingerprint(cfg)
    if p.is_file():
        saved = json.loads(p.read_text())
        if saved != current:
            diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            raise ConfigError(f"{out} holds a sweep run with other settings ({', '.join(diff)} differ); "
                              "use another output_dir (only the grid axes may change between runs)")
    else:
        p.write_text(json.dumps(current, indent=2, sort_keys=True))


def run_sweep(cfg: SweepConfig, progress: bool = False, report: Callable[[str], None] | None = None) -> list[dict]:
    """Run every unfinished cell of the grid, appending a row per cell; then write plots and the table.

    Resumable: cells whose key already has a row with status ``ok`` in results.csv are
    skipped. A cell that fails is recorded with ``status = error`` (and retried next time).
    Returns the rows of results.csv.
    """
    say = report or log.info
    _check_settings(cfg)
    out = Path(cfg.output_dir)
    csv_path = out / RESULTS_CSV
    done = finished_keys(csv_path)
    cells = expand_cells(cfg)
    todo = [c for c in cells if c.key not in done]
    say(f"sweep: {len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run -> {csv_path}")
    ctx = SweepContext(cfg, progress)
    check_examples_per_client(ctx, todo)  # n x K beyond the training set: refused before any cell runs
    for i, cell in enumerate(todo, start=1):
        t0 = time.perf_counter()
        try:
            row = run_cell(ctx, cell)
        except (ValueError, RuntimeError, FileNotFoundError) as exc:
            log.exception("cell %s failed", cell.key)
            row = {"key": cell.key, "status": "error", "method": cell.method, "seed": cell.seed,
                   "num_clients": cell.num_clients, "examples_per_client": cell.examples_per_client,
                   "dp_level": cell.dp_level, "target_epsilon": cell.target_epsilon,
                   "partitioning": cell.partitioning, "error": f"{type(exc).__name__}: {exc}"}
        append_row(csv_path, row)
        acc = row.get("accuracy")
        say(f"[{i}/{len(todo)}] {cell.key}: {row['status']}"
            + (f", accuracy {acc:.3f}" if isinstance(acc, float) else "")
            + f" ({time.perf_counter() - t0:.1f}s)")
    rows = read_results(csv_path)
    write_report(rows, out, cfg)
    return rows



# ---------------------------------------------------------------- CLI
def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, required=True,
                   help="sweep file (TOML): grid axes + [base] run config, e.g. sweeps/default.toml")
    p.add_argument("--output-dir", "-o", type=Path, default=None,
                   help="where results.csv, results.md and plots/ go (default: output_dir in the sweep file)")
    p.add_argument("--dry-run", action="store_true", help="list the cells (and which are done) and exit")
    p.add_argument("--report-only", action="store_true",
                   help="only redraw plots and the Markdown table from an existing results.csv")
    p.add_argument("--quiet", "-q", action="store_true", help="warnings only")


def _run_cli(args) -> int:
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
        from .preflight import check_run

        check_run(cfg.base, check_folder=False)  # every input of the base run checked before any cell starts
        run_sweep(cfg, progress=not args.quiet, report=print)
        paths = {"markdown": out / RESULTS_MD, "plots": out / "plots"}
    print(f"sweep results: {out / RESULTS_CSV}; table: {paths['markdown']}; plots: {out / 'plots'}")
    return 0


CLI_COMMANDS = {
    "sweep": ("privacy-utility sweep: accuracy of zero-shot / direct / POST / teacher-DP / RAPT over clients, "
              "epsilon and partitioning -> results.csv, plots, Markdown table (resumable)",
              _add_arguments, _run_cli),
}
