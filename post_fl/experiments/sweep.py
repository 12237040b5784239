"""Privacy-utility sweeps: a grid of federated prompt-tuning runs, one CSV row per cell, plots, a table
(``post-fl sweep``, whose command line is in :mod:`post_fl.cli`).

:func:`run_sweep` runs every unfinished cell of the grid (:mod:`post_fl.experiments.grid`), one at a
time (:func:`post_fl.experiments.cells.run_cell`), and writes the report
(:mod:`post_fl.experiments.report`). The student is distilled once per sweep (into
``<output_dir>/student``) unless the base config names one. Each finished cell is appended to
``<output_dir>/results.csv`` (and flushed) under a stable key made of its parameters; running the
sweep again skips cells whose key has a row with ``status = ok``. A federated run interrupted mid-way
resumes from its own round checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

from ..core.config import ConfigError
from .cells import check_examples_per_client, run_cell
from .context import SweepContext, settings_fingerprint
from .grid import RESULTS_CSV, SETTINGS_JSON, SweepConfig, expand_cells
from .report import append_row, finished_keys, read_results, write_report

log = logging.getLogger(__name__)


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
