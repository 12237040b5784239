"""Plots of a sweep, of one run's transfer and of a federated run (matplotlib, Agg canvas; no display needed).

The sweep plots take the rows of a sweep's results.csv (dicts of strings, as
:func:`post_fl.experiments.report.read_results` gives) and write one PNG:

* :func:`plot_accuracy_vs_epsilon`: one panel per number of clients, test accuracy against
  the target ε (``inf`` = non-private, drawn rightmost), one line per method and partitioning;
  the teacher's zero-shot accuracy is a dashed horizontal line, the majority-class accuracy
  (always the most frequent training label) a dotted one.
* :func:`plot_accuracy_vs_clients`: one panel per target ε, accuracy against the number of
  clients (1 = single site).

Points are the mean over seeds, bars the min..max over seeds. The caption states how the ε
axis is shared by DP-SGD methods and RAPT (different units). :func:`plot_transfer_curve` draws one
run's POST transfer curve (training and held-out loss per check; ``post-fl transfer`` writes it);
:func:`plot_federated_run` one federated run's validation accuracy by round and final accuracies (``post-fl
federate`` writes it).
"""

from __future__ import annotations

import math
import textwrap
from collections import defaultdict
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

METHOD_STYLE = {
    "zero_shot": dict(color="0.4", linestyle="--"),
    "majority": dict(color="0.55", linestyle=(0, (1, 1.5))),
    "direct": dict(color="tab:orange", marker="s"),
    "post": dict(color="tab:blue", marker="o"),
    "teacher_dp": dict(color="tab:green", marker="^"),
    "rapt": dict(color="tab:red", marker="D"),
}
REFERENCE_LABELS = {"zero_shot": "zero_shot (teacher)", "majority": "majority class"}
PART_STYLE = {"iid": "-", "dirichlet": ":", "pathological": "-."}


def _f(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _eps_label(e: float) -> str:
    return "∞\n(no DP)" if math.isinf(e) else f"{e:g}"


def _series(rows, x_name: str, panel_name: str):
    """{panel value: {(method, partition label): {x: [accuracies]}}} and {reference method: [accuracies]}."""
    panels: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    references: dict = defaultdict(list)
    for r in rows:
        acc = _f(r.get("accuracy"))
        if math.isnan(acc):
            continue
        if r.get("method") in REFERENCE_LABELS:
            references[r["method"]].append(acc)
            continue
        part = r.get("partitioning", "")
        if part == "dirichlet":
            part = f"dirichlet(α={_f(r.get('dirichlet_alpha')):g})"
        panels[_f(r[panel_name])][(r["method"], part)][_f(r[x_name])].append(acc)
    return panels, references


def _save(fig: Figure, path: Path, caption: str) -> Path:
    if caption:
        width_in, height_in = fig.get_size_inches()
        lines = textwrap.wrap(caption, int(width_in * 17))  # ~17 characters of 7 pt text per inch
        fig.text(0.01, 0.01, "\n".join(lines), fontsize=7, va="bottom", ha="left")
        # leave room for the caption (10 pt per line) plus the x tick labels and axis title (0.75 in)
        fig.subplots_adjust(bottom=(len(lines) * 10 / 72 + 0.75) / height_in)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=110)
    return path


def _figure(n_panels: int) -> tuple[Figure, list]:
    cols = min(n_panels, 3) or 1
    rows = max(1, math.ceil(n_panels / cols))
    width_in = 5.2 * cols
    height_in = 3.9 * rows + 1.4
    fig = Figure(figsize=(width_in, height_in))
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(max(n_panels, 1))]
    fig.subplots_adjust(left=0.7 / width_in, right=1 - 0.2 / width_in, bottom=0.2 + 0.05 / rows, top=1 - 0.6 / height_in,
                        wspace=0.28, hspace=0.45)
    return fig, axes


def _draw(ax, series: dict, positions: dict, references: dict) -> None:
    for (method, part), points in sorted(series.items()):
        xs = sorted(points)
        style = dict(METHOD_STYLE.get(method, {}))
        style.setdefault("linestyle", PART_STYLE.get(part.split("(")[0], "-"))
        means = [sum(points[x]) / len(points[x]) for x in xs]
        lo = [m - min(points[x]) for m, x in zip(means, xs)]
        hi = [max(points[x]) - m for m, x in zip(means, xs)]
        ax.errorbar([positions[x] for x in xs], means, yerr=[lo, hi], capsize=2, label=f"{method} [{part}]",
                    **style)
    for method, accs in sorted(references.items()):
        ax.axhline(sum(accs) / len(accs), label=REFERENCE_LABELS[method], **METHOD_STYLE[method])
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)


def _plot_panels(rows: list[dict], x_field: str, panel_field: str, x_label, x_axis_title: str,
                 panel_title, title: str, path: str | Path, caption: str) -> Path:
    """One panel per value of ``panel_field``, accuracy against ``x_field`` (categorical axis) in each."""
    panels, references = _series(rows, x_field, panel_field)
    xs = sorted({x for p in panels.values() for s in p.values() for x in s})
    positions = {x: i for i, x in enumerate(xs)}
    fig, axes = _figure(len(panels))
    for ax, key in zip(axes, sorted(panels)):
        _draw(ax, panels[key], positions, references)
        ax.set_xticks(range(len(xs)), [x_label(x) for x in xs])
        ax.set_xlabel(x_axis_title)
        ax.set_title(panel_title(key))
    if not panels:
        axes[0].text(0.5, 0.5, "no finished cells", ha="center")
    handles, _ = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    return _save(fig, Path(path), caption)


def plot_accuracy_vs_epsilon(rows: list[dict], path: str | Path, caption: str = "") -> Path:
    """Accuracy vs target ε, one panel per client count (``inf`` = no DP, rightmost). Returns the PNG path."""
    return _plot_panels(
        rows, "target_epsilon", "num_clients", _eps_label,
        "target ε (DP-SGD: example-level; RAPT: per-token local)",
        lambda n: "1 client (single site)" if n == 1 else f"{n:g} clients",
        "Privacy-utility: test accuracy vs ε", path, caption)


def plot_accuracy_vs_clients(rows: list[dict], path: str | Path, caption: str = "") -> Path:
    """Accuracy vs number of clients, one panel per target ε. Returns the PNG path."""
    return _plot_panels(
        rows, "num_clients", "target_epsilon", lambda c: f"{c:g}", "number of clients",
        lambda e: "ε = ∞ (no DP)" if math.isinf(e) else f"target ε = {e:g}",
        "Privacy-utility: test accuracy vs number of clients", path, caption)


EPSILON_COLORS = {1.0: "tab:red", 4.0: "tab:orange", 8.0: "tab:blue", math.inf: "0.2"}
REFERENCE_LINES = {"majority": ("majority class", dict(color="tab:brown", linestyle=(0, (1, 1.5)))),
                   "zero_shot": ("zero-shot teacher", dict(color="tab:gray", linestyle="--")),
                   "calibrated_zero_shot": ("calibrated zero-shot (bias fit on validation)",
                                            dict(color="tab:purple", linestyle="-."))}
DP_LEVEL_TITLES = {"sample": "sample-level DP (DP-SGD on each client)",
                   "user": "user-level DP (DP-FedAvg, server noise)"}


def _part_label(r: dict) -> str:
    part = r.get("partitioning") or "iid"
    return f"Dirichlet(α={_f(r.get('dirichlet_alpha')):g})" if part == "dirichlet" else part


def _setting_line(rows: list[dict], context: dict) -> str:
    """'n = 40 examples per client' or 'N training examples split among the clients'."""
    per = sorted({int(_f(r.get("examples_per_client"))) for r in rows
                  if math.isfinite(_f(r.get("examples_per_client"))) and _f(r.get("examples_per_client")) > 0})
    if per:
        return "fixed data per client: n = " + ", ".join(map(str, per)) + " examples per client"
    total = sorted({int(_f(r.get("train_examples"))) for r in rows if math.isfinite(_f(r.get("train_examples")))})
    n = "/".join(map(str, total)) if total else context.get("total", "?")
    return f"fixed total data: {n} training examples split among the clients"


def plot_clients_experiment(rows: list[dict], path: str | Path, method: str = "post",
                            context: dict | None = None) -> Path:
    """Write :func:`clients_experiment_figure` of ``rows`` to the PNG ``path``; returns the path."""
    fig, caption = clients_experiment_figure(rows, method, context)
    return _save(fig, Path(path), caption)


def clients_experiment_figure(rows: list[dict], method: str = "post",
                              context: dict | None = None) -> tuple[Figure, str]:
    """Accuracy of ``method`` against the number of clients (log x axis), one line per target ε.

    Panels: one column per DP level present (sample-level DP-SGD, user-level DP-FedAvg), one row
    per partitioning present (iid, Dirichlet(α)). Points are the mean test accuracy over seeds, bars
    the 95% Wilson interval (several seeds: lowest lower to highest upper bound); ε = inf (no DP)
    is drawn in every panel, the single site (1 client) in every partitioning row. The reference
    methods (majority class, zero-shot, calibrated zero-shot) are horizontal lines. ``context``
    (:func:`post_fl.experiments.report.report_context`) names the task in the title. Returns the figure
    and its caption (drawn by ``_save``).
    """
    context = context or {}
    mine = [r for r in rows if r.get("method") == method and not math.isnan(_f(r.get("accuracy")))
            and math.isfinite(_f(r.get("num_clients")))]
    levels = [lv for lv in ("sample", "user") if any((r.get("dp_level") or "sample") == lv
                                                      and math.isfinite(_f(r.get("target_epsilon"))) for r in mine)]
    levels = levels or ["sample"]
    parts = sorted({_part_label(r) for r in mine}, key=lambda p: (p != "iid", p)) or ["iid"]
    # {(level, part): {eps: {clients: [rows]}}}
    series: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in mine:
        eps = _f(r.get("target_epsilon"))
        for lv in (levels if math.isinf(eps) else [r.get("dp_level") or "sample"]):
            if lv == "user" and _f(r.get("num_clients")) <= 1:
                continue  # user-level DP with one client is not run
            single = _f(r.get("num_clients")) == 1  # a single site has no partitioning: drawn in every row
            for part in (parts if single else [_part_label(r)]):
                series[(lv, part)][eps][_f(r.get("num_clients"))].append(r)
    refs = {m: [_f(r["accuracy"]) for r in rows if r.get("method") == m and not math.isnan(_f(r.get("accuracy")))]
            for m in REFERENCE_LINES}
    n_rows, n_cols = len(parts), len(levels)
    width_in, height_in = max(6.0 * n_cols, 10.0), 4.2 * n_rows + 2.6  # one column: wide enough for title and legend
    fig = Figure(figsize=(width_in, height_in))
    fig.subplots_adjust(left=0.75 / width_in, right=1 - 0.25 / width_in, top=1 - 1.75 / height_in,
                        wspace=0.22, hspace=0.5)
    all_eps = sorted({e for s in series.values() for e in s})
    clients = sorted({x for s in series.values() for e in s.values() for x in e}) or [1.0]
    axes = []
    for i, part in enumerate(parts):
        for j, lv in enumerate(levels):
            ax = fig.add_subplot(n_rows, n_cols, i * n_cols + j + 1, sharey=axes[0] if axes else None)
            axes.append(ax)
            s = series.get((lv, part), {})
            for k, eps in enumerate(all_eps):
                pts = s.get(eps)
                if not pts:
                    continue
                xs = sorted(pts)
                shift = 1.0 + 0.06 * (k - (len(all_eps) - 1) / 2)  # spread the bars of equal x apart
                means, lo, hi = [], [], []
                for x in xs:
                    accs = [_f(r["accuracy"]) for r in pts[x]]
                    m = sum(accs) / len(accs)
                    lows = [_f(r.get("accuracy_ci_low")) for r in pts[x]]
                    highs = [_f(r.get("accuracy_ci_high")) for r in pts[x]]
                    lows = [v for v in lows if not math.isnan(v)] or [m]
                    highs = [v for v in highs if not math.isnan(v)] or [m]
                    means.append(m)
                    lo.append(max(0.0, m - min(lows)))
                    hi.append(max(0.0, max(highs) - m))
                seeds = max(len(pts[x]) for x in xs)
                label = ("ε = ∞ (no DP)" if math.isinf(eps) else f"ε = {eps:g}") + \
                    (f" ({seeds} seeds)" if seeds > 1 else "")
                ax.errorbar([x * shift for x in xs], means, yerr=[lo, hi], capsize=3, marker="o", markersize=4,
                            color=EPSILON_COLORS.get(eps), label=label)
            for m, accs in refs.items():
                if accs:
                    name, style = REFERENCE_LINES[m]
                    ax.axhline(sum(accs) / len(accs), label=name, linewidth=1.2, **style)
            ax.set_xscale("log")  # every panel the same clients axis, so columns compare at a glance
            ax.set_xticks(clients, [f"{x:g}" for x in clients])
            ax.minorticks_off()  # only the client counts of the grid are labelled
            ax.set_xlim(min(clients) / 1.6, max(clients) * 1.6)
            ax.set_xlabel("number of clients (log scale)")
            ax.set_ylabel("test accuracy")
            ax.set_title(f"{DP_LEVEL_TITLES[lv]}\n{part}", fontsize=10)
            ax.grid(alpha=0.3)
            if not s:
                ax.text(0.5, 0.5, "no finished cells", ha="center", transform=ax.transAxes)
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        order = sorted(range(len(labels)), key=lambda i: (not labels[i].startswith("ε"), i))  # ε lines first
        fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="upper center",
                   ncol=min(len(labels), 4), fontsize=8, bbox_to_anchor=(0.5, 1 - 0.62 / height_in), frameon=False)
    task = context.get("task", "the sweep's task")
    fig.suptitle(f"{method}: test accuracy vs number of clients — {task}\n{_setting_line(mine, context)}",
                 fontsize=11, y=1 - 0.05 / height_in, va="top")
    test = sorted({int(_f(r.get("test_examples"))) for r in mine if math.isfinite(_f(r.get("test_examples")))})
    caption = (f"Points: mean test accuracy of {method} over seeds on {'/'.join(map(str, test)) or '?'} test examples; "
               "bars: 95% Wilson interval (several seeds: lowest to highest bound). Sample-level ε: example-level "
               "(ε, δ)-DP of DP-SGD on each client's data (the most any client spent); user-level ε: DP-FedAvg over "
               "a client's whole data (δ = min(1e-5, 1/(10 K))), not run for 1 client. ε = ∞: no DP, drawn in "
               "both columns; 1 client (single site, no partitioning) is drawn in every row. Horizontal lines: "
               "the reference methods (no private training).")
    return fig, caption


def plot_transfer_curve(curve: list[dict], path: str | Path, best_step: int | None = None, title: str = "") -> Path:
    """The POST transfer curve (:attr:`post_fl.method.transfer.TransferResult.curve`) as a PNG: training and
    held-out public-text loss per check, the selected step, and the validation accuracy on a second axis
    when it was reported (reported only, never used to select). Returns the path."""
    def points(key: str) -> tuple[list, list]:
        rows = [r for r in curve if r.get(key) is not None and not math.isnan(_f(r[key]))]
        return [r["step"] for r in rows], [_f(r[key]) for r in rows]

    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    fig.subplots_adjust(left=0.12, right=0.86, top=0.78)
    for key, label, style in (("train_loss", "training batches (mean since the last check)", dict(color="tab:blue")),
                              ("heldout_loss", "held-out public texts (selects the step)",
                               dict(color="tab:orange", marker="o"))):
        xs, ys = points(key)
        if xs:
            ax.plot(xs, ys, label=label, **style)
    if best_step is not None:
        ax.axvline(best_step, color="0.3", linestyle="--", linewidth=1, label=f"selected: step {best_step}")
    ax.set_xlabel("transfer step")
    ax.set_ylabel("POST transfer loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    xs, ys = points("validation_accuracy")
    if xs:
        ax2 = ax.twinx()
        ax2.plot(xs, ys, color="tab:green", marker="s", markersize=4, linestyle=":")
        ax2.set_ylabel("teacher validation accuracy (reported only)", color="tab:green")
        handles += [ax2.lines[-1]]
        labels += ["validation accuracy (not used to select)"]
    if handles:  # above the axes, clear of both axes' lines
        fig.legend(handles, labels, fontsize=7, loc="upper center", ncol=2, bbox_to_anchor=(0.5, 0.93), frameon=False)
    fig.suptitle(title or "POST transfer: loss per step", y=0.98)
    caption = ("Loss = alpha KL on the prompts' change + (1 - alpha) KL on the prompted outputs, on public text only. "
               "The prompt kept is the one of the lowest held-out loss (no labels; costs no epsilon).")
    return _save(fig, Path(path), caption)


def plot_federated_run(rounds: list[dict], accuracy: dict, intervals: dict, path: str | Path, title: str = "",
                       caption: str = "", validation_n: int = 0) -> Path:
    """One federated run (``post-fl federate``) as a PNG: left, the validation accuracy of the student with the
    global prompt after each round (``rounds``: rows of ``rounds.csv``, round 0 = the initial prompt), with its
    95% Wilson interval when ``validation_n`` (the split's size) is given, on an axis at least 0.2 high so that
    noise does not look like a trend; right, every final test accuracy of ``accuracy`` as a bar with its 95%
    Wilson interval from ``intervals`` (``results.json``'s ``accuracy_intervals``). Returns the path."""
    fig = Figure(figsize=(11.0, 4.8))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.86, wspace=0.62)
    points = [(int(_f(r["round"])), _f(r.get("validation_accuracy"))) for r in rounds]
    points = [(x, y) for x, y in points if not math.isnan(y)]
    if points:
        left.plot([x for x, _ in points], [y for _, y in points], color=METHOD_STYLE["post"]["color"], marker="o",
                  label="student + global prompt")
        left.set_xticks(sorted({x for x, _ in points}))
        if validation_n > 0:
            from ..method.evaluate import wilson_interval

            bands = [wilson_interval(round(y * validation_n), validation_n) for _, y in points]
            left.fill_between([x for x, _ in points], [b[0] for b in bands], [b[1] for b in bands],
                              color=METHOD_STYLE["post"]["color"], alpha=0.15, label="95% interval")
        ys_seen = [y for _, y in points]
        mid = (max(ys_seen) + min(ys_seen)) / 2
        half = max(0.1, (max(ys_seen) - min(ys_seen)) / 2 + 0.05)
        left.set_ylim(max(0.0, mid - half), min(1.0, mid + half))
    else:
        left.text(0.5, 0.5, "no validation split", ha="center", transform=left.transAxes)
    left.set_xlabel("round (0 = initial prompt)")
    left.set_ylabel("validation accuracy")
    left.set_title("validation accuracy by round (monitoring only)", fontsize=10)
    left.grid(alpha=0.3)
    names = list(accuracy)
    ys = list(range(len(names)))[::-1]
    values = [_f(accuracy[n]) for n in names]
    lo = [max(0.0, v - _f(intervals.get(n, {}).get("ci95", [v, v])[0])) for n, v in zip(names, values)]
    hi = [max(0.0, _f(intervals.get(n, {}).get("ci95", [v, v])[1]) - v) for n, v in zip(names, values)]
    colors = ["tab:blue" if n == "teacher_transferred_prompt" else "tab:orange" if "prompt" in n else "0.6"
              for n in names]
    right.barh(ys, values, xerr=[lo, hi], color=colors, capsize=3)
    right.set_yticks(ys, [n.replace("_", " ") for n in names], fontsize=8)
    for y, v in zip(ys, values):
        right.text(0.01, y, f"{v:.3f}", va="center", fontsize=7, color="white")
    right.set_xlim(0, 1)
    right.set_xlabel("test accuracy (bars: 95% Wilson interval)")
    right.set_title("final accuracies", fontsize=10)
    right.grid(alpha=0.3, axis="x")
    fig.suptitle(title or "federated POST run")
    return _save(fig, Path(path), caption)
