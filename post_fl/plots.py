"""Plots of a privacy-utility sweep (matplotlib, Agg canvas; no display needed).

Both functions take the rows of a sweep's results.csv (dicts of strings, as
:func:`post_fl.sweep.read_results` gives) and write one PNG:

* :func:`plot_accuracy_vs_epsilon`: one panel per number of clients, test accuracy against
  the target ε (``inf`` = non-private, drawn rightmost), one line per method and partitioning;
  the teacher's zero-shot accuracy is a dashed horizontal line, the majority-class accuracy
  (always the most frequent training label) a dotted one.
* :func:`plot_accuracy_vs_clients`: one panel per target ε, accuracy against the number of
  clients (1 = single site).

Points are the mean over seeds, bars the min..max over seeds. The caption states how the ε
axis is shared by DP-SGD methods and RAPT (different units).
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
