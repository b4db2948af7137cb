"""What a sweep ends with: the comparison table (terminal, sweep.md, sweep.csv) and sweep.png, the
compared metric against the first swept key. Read from the sweep's state (sweep.json) alone."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Callable

from affiner.core.files import write_atomic
from affiner.core.formatting import METRIC_INFO, MISSING, as_number, format_delta, format_value, metric_kind, text_table
from affiner.evaluation.plots import new_figure, png_bytes
from affiner.evaluation.report_markdown import md_table
from affiner.experiments.grid import describe_point

TABLE_MD = "sweep.md"
TABLE_CSV = "sweep.csv"
PLOT_FILE = "sweep.png"


# ---------------------------------------------------------------------------------------- the figures

def metric_values(point: dict, metric: str) -> tuple[float | None, float | None, float | None]:
    """(base, tuned, tuned − base) of the metric for one point; None where it was not measured."""
    figures = point.get("metrics") or {}
    base = (figures.get("base") or {}).get(metric)
    tuned = (figures.get("tuned") or {}).get(metric)
    return base, tuned, (tuned - base if base is not None and tuned is not None else None)


def best_point(state: dict) -> dict | None:
    """The finished point with the best tuned value of the metric (none for a metric without a better side)."""
    metric = state["metric"]
    better = METRIC_INFO.get(metric, {"higher_is_better": True}).get("higher_is_better")
    scored = [p for p in state["points"] if p["status"] == "finished" and metric_values(p, metric)[1] is not None]
    if better is None or not scored:
        return None

    def rank(point: dict) -> tuple[float, float]:  # ties broken by the held-out loss, lower is better
        loss = ((point.get("metrics") or {}).get("tuned") or {}).get("loss")
        value = metric_values(point, metric)[1]
        return (-value if better else value, math.inf if loss is None else loss)

    return min(scored, key=rank)


# ---------------------------------------------------------------------------------------- the table

def table_rows(folder: Path, state: dict) -> tuple[list[str], list[list[Any]]]:
    """Header and raw rows (numbers as numbers) of the comparison table."""
    metric, keys = state["metric"], [g["key"] for g in state["grid"]]
    best = best_point(state)
    header = ["best", "point", *keys, f"{metric}_base", f"{metric}_tuned", f"{metric}_delta", "loss_tuned",
              "train_loss", "steps", "duration_s", "status", "run"]
    rows = []
    for point in state["points"]:
        figures = point.get("metrics") or {}
        base, tuned, delta = metric_values(point, metric)
        rows.append(["*" if point is best else "", point["index"], *(point["overrides"][k] for k in keys),
                     base, tuned, delta, (figures.get("tuned") or {}).get("loss"), figures.get("train_loss"),
                     figures.get("steps"), point.get("duration"), point["status"],
                     str(folder / point["run"]) if point.get("run") else None])
    return header, rows


def format_duration(seconds: float) -> str:
    """'45 s', '12.5 min', '3.2 h'."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def display_table(folder: Path, state: dict) -> tuple[list[str], list[list[str]]]:
    """The table's labels and rows as text, each figure in its metric's unit."""
    _, rows = table_rows(folder, state)
    metric, n_keys = state["metric"], len(state["grid"])
    kind = metric_kind(metric)

    def value(number: Any) -> str:
        return format_value(number, kind)

    def loss(number: Any) -> str:
        return format_value(number, "loss")

    def change(number: Any) -> str:
        return format_delta(number, kind)

    columns: list[Callable[[Any], str]] = [str, str, *[str] * n_keys, value, value, change, loss, loss, str,
                                           format_duration, str, str]
    labels = ["", "#", *[g["key"] for g in state["grid"]], f"{metric} base", f"{metric} tuned", "delta",
              "held-out loss (tuned)", "final train loss", "steps", "duration", "status", "run"]
    return labels, [[MISSING if v is None else show(v) for v, show in zip(row, columns)] for row in rows]


def format_table(folder: Path, state: dict) -> str:
    labels, rows = display_table(folder, state)
    text = text_table([labels, *rows])
    best = best_point(state)
    if best is not None:
        text += (f"\n\n* best {state['metric']} after tuning: point {best['index']}, {best['name']} "
                 f"({describe_point(best['overrides'])})")
    return text


def format_markdown(folder: Path, state: dict) -> str:
    labels, rows = display_table(folder, state)
    labels = ["best" if not label else label for label in labels]
    best = best_point(state)
    info = METRIC_INFO.get(state["metric"], {})
    lines = [f"# Sweep {folder.name}", "",
             f"Config: {state['config']}" + (f", with {' '.join(state['overrides'])}" if state["overrides"] else ""),
             f"Metric: {state['metric']} ({info.get('label', state['metric'])})", ""]
    lines += md_table([c.replace("|", "\\|") for c in labels], ([c.replace("|", "\\|") for c in r] for r in rows))
    if best is not None:
        lines += ["", f"Best: point {best['index']}, {best['name']} ({describe_point(best['overrides'])})."]
    failed = [p for p in state["points"] if p["status"] == "failed"]
    if failed:
        lines += ["", "Failed points:", *(f"- point {p['index']} ({p['name']}): {p['error']}" for p in failed)]
    return "\n".join(lines) + "\n"


def format_csv(folder: Path, state: dict) -> str:
    header, rows = table_rows(folder, state)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else repr(v) if isinstance(v, float) else v for v in row] for row in rows])
    return buffer.getvalue()


def write_results(folder: Path, state: dict) -> str:
    """Write sweep.md, sweep.csv and sweep.png; return the table for the terminal."""
    write_atomic(folder / TABLE_MD, format_markdown(folder, state))
    write_atomic(folder / TABLE_CSV, format_csv(folder, state))
    write_atomic(folder / PLOT_FILE, plot(state))
    return format_table(folder, state)


def point_summary(state: dict, point: dict) -> str:
    """One finished point in a line: 'contains base 20 % -> tuned 60 %  (45 s)'."""
    metric = state["metric"]
    base, tuned, _ = metric_values(point, metric)
    kind = metric_kind(metric)
    return (f"{metric} base {format_value(base, kind)} -> tuned {format_value(tuned, kind)}  "
            f"({format_duration(point['duration'])})")


# ---------------------------------------------------------------------------------------- the plot

def plot(state: dict) -> bytes:
    """The metric after tuning against the first swept key; one line per value of the other keys; base dashed."""
    metric, first = state["metric"], state["grid"][0]["key"]
    figure = new_figure(6.5, 4.2)
    axes = figure.add_subplot()
    position = place_points(axes, state)
    finished = [p for p in state["points"] if p["status"] == "finished" and metric_values(p, metric)[1] is not None]
    draw_lines(axes, state, finished, position)
    if not finished:
        axes.text(0.5, 0.5, "no finished point to plot", ha="center", va="center", transform=axes.transAxes)
    info = METRIC_INFO.get(metric, {"label": metric})
    if info.get("kind") == "rate":
        from matplotlib.ticker import PercentFormatter

        axes.set_ylim(-0.03, 1.03)
        axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    axes.set_xlabel(first)
    axes.set_ylabel(f"{info['label']} (tuned)")
    axes.set_title(f"{metric} against {first}", fontsize=10)
    axes.grid(alpha=0.3)
    if finished:
        axes.legend(fontsize=8)
    return png_bytes(figure)


def place_points(axes: Any, state: dict) -> dict[int, float]:
    """Each point's x position ({index: x}) along the first swept key, with the axis ticks to match:
    numbers at their value (log scale across decades), other values one tick each in grid order."""
    grid, points = state["grid"], state["points"]
    first = grid[0]["key"]
    xs = [p["values"][first] for p in points]
    if all(as_number(x) is not None for x in xs):
        if min(xs) > 0 and max(xs) / min(xs) > 10:
            axes.set_xscale("log")
        ticks = {float(p["values"][first]): p["overrides"][first] for p in points}
        axes.set_xticks(sorted(ticks), [ticks[t] for t in sorted(ticks)])
        axes.minorticks_off()
        return {p["index"]: float(p["values"][first]) for p in points}
    order = grid[0]["values"]
    axes.set_xticks(range(len(order)), order)
    return {p["index"]: float(order.index(p["overrides"][first])) for p in points}


def draw_lines(axes: Any, state: dict, finished: list[dict], position: dict[int, float]) -> None:
    """One line of tuned values per combination of the other swept keys, and the base as dashes."""
    metric, others = state["metric"], [g["key"] for g in state["grid"][1:]]
    groups: dict[tuple, list[dict]] = {}
    for point in finished:
        groups.setdefault(tuple(point["overrides"][k] for k in others), []).append(point)
    bases = {metric_values(p, metric)[0] for p in finished} - {None}
    colours = [f"C{i % 10}" for i in range(len(groups))]
    for colour, (combo, members) in zip(colours, groups.items()):
        members.sort(key=lambda p: position[p["index"]])
        xs = [position[p["index"]] for p in members]
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(others, combo)) or "tuned"
        axes.plot(xs, [metric_values(p, metric)[1] for p in members], marker="o", color=colour, label=label)
        if len(bases) > 1:  # the base itself varies with the grid (e.g. model.base): one reference per line
            axes.plot(xs, [metric_values(p, metric)[0] for p in members],
                      linestyle="--", color=colour, alpha=0.7, label=f"base ({label})")
    if len(bases) == 1:
        axes.axhline(next(iter(bases)), color="#555", linestyle="--", linewidth=1.2, label="base")
