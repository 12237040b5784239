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

from ..core.config import ConfigError
from .grid import METHODS, REFERENCE_METHODS, RESULTS_MD


CSV_COLUMNS = [
    "key", "status", "method", "num_clients", "examples_per_client", "dp_level", "target_epsilon", "partitioning",
    "dirichlet_alpha", "seed",
    "accuracy", "accuracy_ci_low", "accuracy_ci_high", "accuracy_stderr", "student_accuracy",
    "accuracy_privatized_inputs",
    "epsilon", "delta", "epsilon_unit", "rapt_eta", "rapt_token_epsilon", "rapt_label_epsilon",
    "rapt_example_epsilon",
    "rounds", "clients_per_round", "train_examples", "test_examples",
    "client_s_per_round", "student_s_per_client_round", "teacher_s_per_client_round", "cost_source",
    "bytes_down_per_client_round", "bytes_up_per_client_round", "model_bytes_once",
    "audit_epsilon_lb", "audit_max_epsilon_lb", "audit_tpr", "audit_fpr", "audit_observations",
    "engine", "cell_seconds", "run_dir", "error",
]
EPSILON_AXIS_NOTE = (
    "epsilon axis: direct / post / teacher_dp use example-level (epsilon, delta)-DP of DP-SGD on each "
    "client's data (delta = min(1e-5, 1/(10 n)) per client unless set); rapt uses local DP: each text token "
    "is epsilon-LDP by d_chi-privacy with eta = epsilon / diam(phi(V)) (pure, delta = 0), each label "
    "rapt.label_epsilon-LDP by randomised response, and the prompt update is trained on that privatised data "
    "only, so an example of k tokens is (k*epsilon + label epsilon)-LDP (rapt_example_epsilon). The two "
    "epsilons are NOT the same unit: equal x positions do not mean "
    "equal protection. epsilon = inf: no DP-SGD (direct/post/teacher_dp) and no privatisation (rapt). "
    "Rows with dp_level = user are user-level (epsilon, delta)-DP of DP-FedAvg (one user = one client's "
    "whole data; delta = min(1e-5, 1/(10 K)); server-side noise, so the guarantee trusts the server), "
    "a third unit.")



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
            if set(header) <= set(CSV_COLUMNS) and {"key", "status"} <= set(header):
                migrate_columns(p)  # a results.csv from before columns were added: same rows, new header
            else:
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



def migrate_columns(path: Path) -> None:
    """Rewrite a results.csv written with an older subset of :data:`CSV_COLUMNS` under the current header
    (new columns empty; rows unchanged), atomically: a temporary file replaces it only when complete."""
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") or "" for k in CSV_COLUMNS})
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def report_context(cfg) -> dict[str, str]:
    """What the experiment plots' titles and captions say about the task: teacher, task, data sizes."""
    if cfg is None:
        return {}
    d = cfg.base.data
    task = d.embedded_task if "embedded" in (d.train, d.test) else Path(d.train).name
    return {"task": f"{task} (teacher {cfg.base.model.teacher})", "test": str(d.max_test_examples),
            "total": str(d.max_train_examples), "rounds": str(cfg.rounds)}


def write_report(rows: list[dict], out: str | Path, cfg=None) -> dict[str, Path]:
    """Plots (PNG) and the Markdown table of a sweep's rows into ``out``; returns their paths.

    Besides the two overview plots, one ``plots/clients_<method>.png`` per trained method: accuracy
    against the number of clients, a line per ε with 95% intervals, panels per DP level (and
    partitioning), the reference methods as horizontal lines (:func:`post_fl.experiments.plots.plot_clients_experiment`).
    ``cfg`` (the :class:`SweepConfig`, optional) names the task in their titles.
    """
    from .plots import plot_accuracy_vs_clients, plot_accuracy_vs_epsilon, plot_clients_experiment

    out = Path(out)
    paths = {"markdown": out / RESULTS_MD,
             "accuracy_vs_epsilon": out / "plots" / "accuracy_vs_epsilon.png",
             "accuracy_vs_clients": out / "plots" / "accuracy_vs_clients.png"}
    ok = [with_row_interval(r) for r in rows if r.get("status") == "ok"]
    plot_accuracy_vs_epsilon(ok, paths["accuracy_vs_epsilon"], caption=EPSILON_AXIS_NOTE)
    plot_accuracy_vs_clients(ok, paths["accuracy_vs_clients"], caption=EPSILON_AXIS_NOTE)
    context = report_context(cfg)
    for m in METHODS:
        if m not in REFERENCE_METHODS and any(r.get("method") == m for r in ok):
            paths[f"clients_{m}"] = plot_clients_experiment(ok, out / "plots" / f"clients_{m}.png", m, context)
    paths["markdown"].write_text(markdown_table(rows) + "\n" + clients_tables(ok))
    return paths


def with_row_interval(row: dict) -> dict:
    """A results.csv row with its Wilson interval filled in when the CSV predates the interval columns."""
    if row.get("accuracy_ci_low") or not row.get("accuracy") or not row.get("test_examples"):
        return row
    from ..method.evaluate import accuracy_summary

    acc, n = _num(row["accuracy"]), int(_num(row["test_examples"])) if math.isfinite(_num(row["test_examples"])) else 0
    if not math.isfinite(acc) or n <= 0:
        return row
    s = accuracy_summary(acc, n)
    return {**row, "accuracy_ci_low": repr(s["ci95"][0]), "accuracy_ci_high": repr(s["ci95"][1]),
            "accuracy_stderr": repr(s["stderr"])}


def _interval_cell(group: list[dict]) -> str:
    """``acc [lo, hi]`` (one seed: its 95% Wilson interval) or ``mean [min lo, max hi] (k seeds)``."""
    accs = [_num(r.get("accuracy")) for r in group]
    accs = [a for a in accs if math.isfinite(a)]
    if not accs:
        return ""
    lo = [_num(r.get("accuracy_ci_low")) for r in group]
    hi = [_num(r.get("accuracy_ci_high")) for r in group]
    lo, hi = [v for v in lo if math.isfinite(v)], [v for v in hi if math.isfinite(v)]
    text = f"{float(np.mean(accs)):.3f}"
    if lo and hi:
        text += f" [{min(lo):.3f}, {max(hi):.3f}]"
    return text + (f" ({len(accs)} seeds)" if len(accs) > 1 else "")


def clients_tables(rows: list[dict]) -> str:
    """Markdown: per trained method, test accuracy by (DP level, partitioning, examples per client,
    clients) in rows and target ε in columns, each with its 95% interval; then the reference methods."""
    ok = [r for r in rows if r.get("status") == "ok"]
    eps_all = sorted({e for e in (_num(r.get("target_epsilon")) for r in ok if r.get("method") not in REFERENCE_METHODS)
                      if not math.isnan(e)})
    if not eps_all:
        return ""
    fmt = lambda e: "∞ (no DP)" if math.isinf(e) else f"{e:g}"  # noqa: E731
    text = ["## Accuracy by number of clients", "",
            "Test accuracy with its 95% Wilson interval [low, high] (several seeds: their mean and the widest "
            "interval bounds). DP level `sample` = example-level DP-SGD per client, `user` = user-level "
            "DP-FedAvg; ε = ∞ has no DP (one cell serves both levels). `n/client` 0 = the training set split "
            "among the clients.", ""]
    for m in METHODS:
        mine = [r for r in ok if r.get("method") == m and math.isfinite(_num(r.get("num_clients")))]
        if m in REFERENCE_METHODS or not mine:
            continue
        groups: dict[tuple, dict[float, list[dict]]] = {}
        for r in mine:
            part = r.get("partitioning", "") + (f"(α={r['dirichlet_alpha']})" if r.get("partitioning") == "dirichlet"
                                                else "")
            no_dp = math.isinf(_num(r.get("target_epsilon")))
            levels = ["sample", "user"] if no_dp else [r.get("dp_level") or "sample"]
            for lv in levels:
                if lv == "user" and not any((x.get("dp_level") == "user") for x in mine):
                    continue
                if lv == "user" and _num(r.get("num_clients")) == 1:
                    continue
                per = _num(r.get("examples_per_client"))
                k = (lv, part, int(per) if math.isfinite(per) else 0,
                     int(_num(r.get("num_clients"))))
                groups.setdefault(k, {}).setdefault(_num(r.get("target_epsilon")), []).append(r)
        text += [f"### {m}", "", "| DP level | partitioning | n/client | clients | "
                 + " | ".join(f"ε = {fmt(e)}" for e in eps_all) + " |",
                 "|---|---|---|---|" + "---|" * len(eps_all)]
        for k in sorted(groups):
            cells = [_interval_cell(groups[k].get(e, [])) for e in eps_all]
            text.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | " + " | ".join(c or "–" for c in cells) + " |")
        text.append("")
    refs = [r for r in ok if r.get("method") in REFERENCE_METHODS]
    if refs:
        text += ["References (no clients, no privacy cost): " + "; ".join(
            f"{m} {_interval_cell([r for r in refs if r['method'] == m])}"
            for m in REFERENCE_METHODS if any(r["method"] == m for r in refs)) + ".", ""]
    return "\n".join(text)


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
             r.get("target_epsilon", ""), r.get("dp_level", ""), r.get("examples_per_client", ""))
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
        if k[6] not in ("", "0"):
            part += f", {k[6]}/client"
        if k[5] == "user":
            part += ", user-level DP"
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

