"""A sweep's outputs: the append-only ``results.csv`` (one row per finished cell, read back to resume),
and the report drawn from it: plots and the Markdown table.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .config import ConfigError
from .sweep_grid import METHODS, RESULTS_MD


CSV_COLUMNS = [
    "key", "status", "method", "num_clients", "target_epsilon", "partitioning", "dirichlet_alpha", "seed",
    "accuracy", "student_accuracy", "accuracy_privatized_inputs",
    "epsilon", "delta", "epsilon_unit", "rapt_eta", "rapt_token_epsilon", "rapt_label_epsilon",
    "rapt_example_epsilon",
    "rounds", "clients_per_round", "train_examples", "test_examples",
    "client_s_per_round", "student_s_per_client_round", "teacher_s_per_client_round", "cost_source",
    "bytes_down_per_client_round", "bytes_up_per_client_round", "model_bytes_once",
    "audit_epsilon_lb", "audit_max_epsilon_lb", "audit_tpr", "audit_fpr", "audit_observations",
    "cell_seconds", "run_dir", "error",
]
EPSILON_AXIS_NOTE = (
    "epsilon axis: direct / post / teacher_dp use example-level (epsilon, delta)-DP of DP-SGD on each "
    "client's data (delta = min(1e-5, 1/(10 n)) per client unless set); rapt uses local DP: each text token "
    "is epsilon-LDP by d_chi-privacy with eta = epsilon / diam(phi(V)) (pure, delta = 0), each label "
    "rapt.label_epsilon-LDP by randomised response, and the prompt update is trained on that privatised data "
    "only, so an example of k tokens is (k*epsilon + label epsilon)-LDP (rapt_example_epsilon). The two "
    "epsilons are NOT the same unit: equal x positions do not mean "
    "equal protection. epsilon = inf: no DP-SGD (direct/post/teacher_dp) and no privatisation (rapt).")



# ---------------------------------------------------------------- results file
def read_results(path: str | Path) -> list[dict[str, str]]:
    """Rows of a results.csv (the last row wins when a key appears twice)."""
    p = Path(path)
    if not p.is_file():
        return []
    with p.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    last: dict[str, dict] = {}
    for r in rows:
        last[r["key"]] = r
    return list(last.values())


def finished_keys(path: str | Path) -> set[str]:
    """Keys of cells that finished (status ``ok``) in a results.csv."""
    return {r["key"] for r in read_results(path) if r.get("status") == "ok"}


def append_row(path: str | Path, row: dict[str, Any]) -> None:
    """Append one cell's row to results.csv (header first if new), then flush and fsync."""
    p = Path(path)
    new = not p.is_file() or p.stat().st_size == 0
    if not new:
        with p.open(newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), [])
        if header != CSV_COLUMNS:
            raise ConfigError(f"{p} has columns {header}, expected {CSV_COLUMNS}; use a new output_dir")
    out = {}
    for k in CSV_COLUMNS:
        v = row.get(k, "")
        if isinstance(v, float):
            v = "inf" if math.isinf(v) and v > 0 else ("" if math.isnan(v) else repr(v))
        out[k] = "" if v is None else v
    with p.open("a", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        if new:
            w.writeheader()
        w.writerow(out)
        fh.flush()
        os.fsync(fh.fileno())



def write_report(rows: list[dict], out: str | Path) -> dict[str, Path]:
    """Plots (PNG) and the Markdown table of a sweep's rows into ``out``; returns their paths."""
    from .plots import plot_accuracy_vs_clients, plot_accuracy_vs_epsilon

    out = Path(out)
    paths = {"markdown": out / RESULTS_MD,
             "accuracy_vs_epsilon": out / "plots" / "accuracy_vs_epsilon.png",
             "accuracy_vs_clients": out / "plots" / "accuracy_vs_clients.png"}
    ok = [r for r in rows if r.get("status") == "ok"]
    plot_accuracy_vs_epsilon(ok, paths["accuracy_vs_epsilon"], caption=EPSILON_AXIS_NOTE)
    plot_accuracy_vs_clients(ok, paths["accuracy_vs_clients"], caption=EPSILON_AXIS_NOTE)
    paths["markdown"].write_text(markdown_table(rows))
    return paths


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _cellfmt(vals: list[float], digits: int = 3) -> str:
    vals = [v for v in vals if not math.isnan(v)]
    if not vals:
        return ""
    m = float(np.mean(vals))
    if math.isinf(m):
        return "inf"
    if len(vals) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {float(np.std(vals)):.{digits}f}"


def _delta_cell(group: list[dict]) -> str:
    """The δ of a group's ε (the largest over seeds), in scientific notation; '' when none."""
    d = [_num(r.get("delta")) for r in group]
    d = [v for v in d if math.isfinite(v)]
    return ("0" if max(d) == 0 else f"{max(d):.0e}") if d else ""


def _audit_cell(group: list[dict]) -> str:
    """``lb (max M)``: the audit's ε lower bound beside the most its observation counts could show."""
    lb = _cellfmt([_num(r.get("audit_epsilon_lb")) for r in group], 2)
    mx = [_num(r.get("audit_max_epsilon_lb")) for r in group]
    mx = [v for v in mx if math.isfinite(v)]
    return lb if lb in ("", "–") or not mx else f"{lb} (max {min(mx):.2f})"


def markdown_table(rows: list[dict]) -> str:
    """A Markdown table of a sweep: one line per cell (seeds averaged, ± std), with the ε-axis caveat."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        k = (r["method"], r.get("num_clients", ""), r.get("partitioning", ""), r.get("dirichlet_alpha", ""),
             r.get("target_epsilon", ""))
        groups.setdefault(k, []).append(r)
    order = {m: i for i, m in enumerate(METHODS)}
    keys = sorted(groups, key=lambda k: (order.get(k[0], 99), _num(k[1]) if k[1] else 0, k[2], k[3],
                                         _num(k[4]) if k[4] else 0))
    lines = ["| method | clients | partitioning | target ε | accuracy | student acc. | ε spent | δ | audit ε lb (max) | "
             "s/client/round (student) | s/client/round (teacher) | bytes/client/round (up) | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in keys:
        g = groups[k]
        part = k[2] + (f"(α={k[3]})" if k[2] == "dirichlet" else "")
        col = lambda name, d=3: _cellfmt([_num(r.get(name)) for r in g], d)  # noqa: E731
        lines.append(f"| {k[0]} | {k[1] or '–'} | {part or '–'} | {k[4] or '–'} | {col('accuracy')} | "
                     f"{col('student_accuracy')} | {col('epsilon', 2)} | {_delta_cell(g)} | {_audit_cell(g)} | "
                     f"{col('student_s_per_client_round', 2)} | {col('teacher_s_per_client_round', 2)} | "
                     f"{col('bytes_up_per_client_round', 0)} | {len(g)} |")
    errors = [r for r in rows if r.get("status") != "ok"]
    text = "\n".join(lines) + "\n\n" + "Note on the " + EPSILON_AXIS_NOTE + "\n"
    text += ("\nAccuracy is test accuracy of the teacher (student for `student acc.`); ± is the std over "
             "seeds. The non-measured model's seconds come from a short probe (see `cost_source`).\n")
    if errors:
        text += "\nFailed cells (rerun the sweep to retry): " + ", ".join(f"`{r['key']}`" for r in errors) + "\n"
    return text

