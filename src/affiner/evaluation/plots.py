"""The report's figures as PNG bytes: metric means per model with their intervals, and answer lengths.

matplotlib is imported when a figure is drawn, not with this module.
"""

from __future__ import annotations

import io
import math
import textwrap
from typing import Any

from affiner.core.formatting import as_number
from affiner.evaluation.report_content import aggregate_of, answer_of, metric_label, model_colours


def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure on its own Agg canvas."""
    # Figure + the Agg canvas directly, never pyplot: nothing global (backend, current figure, figure
    # registry) changes for the code that imported us, and no display is needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def png_bytes(figure: Any) -> bytes:
    buffer = io.BytesIO()
    # No timestamp/software metadata, so that the same input gives byte-identical plots.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def empty_plot(figure: Any, message: str) -> bytes:
    """The figure with one line of text instead of axes: there is nothing to draw."""
    axes = figure.add_subplot()
    axes.text(0.5, 0.5, message, ha="center", va="center", transform=axes.transAxes)
    axes.set_axis_off()
    return png_bytes(figure)


def metrics_plot(evaluation: dict) -> bytes:
    """Grouped bars: one group per rate/score metric, one bar per model, 95 % interval whiskers."""
    from matplotlib.patches import Patch

    models, colours = evaluation["models"], model_colours(evaluation)
    metrics = [m for m, info in evaluation.get("metric_info", {}).items() if info.get("kind") in ("rate", "score")]
    # Two plots of 5.5 in (550 px) sit side by side on the page; more metrics or models widen this one.
    figure = new_figure(max(5.5, 1.2 + 1.1 * len(metrics) * max(1.0, len(models) / 2.5)), 4.0)
    if not metrics:
        return empty_plot(figure, "no rate or score metric to plot")
    axes = figure.add_subplot()
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        for j, metric in enumerate(metrics):
            draw_bar(axes, j - 0.4 + width * (i + 0.5), width, aggregate_of(evaluation, metric, model), colours[model])
    labels = [textwrap.fill(metric_label(evaluation, m), 16) for m in metrics]
    axes.set_xticks(range(len(metrics)), labels, fontsize=8)
    lowest = min((end for m in models for metric in metrics for end in
                  (as_number(aggregate_of(evaluation, metric, m).get(key)) for key in ("mean", "low"))
                  if end is not None), default=0.0)
    axes.set_ylim(min(0.0, lowest - 0.05), 1.08)  # a cosine similarity can fall below 0: its bar is drawn too
    axes.set_ylabel("mean (rate or score)")
    axes.grid(axis="y", alpha=0.3)
    axes.set_axisbelow(True)
    # Legend from patches rather than from the bars: a model with no value for the first metric still appears.
    axes.legend(handles=[Patch(color=colours[m], label=m) for m in models], fontsize=8, loc="upper left",
                bbox_to_anchor=(1.0, 1.0))
    return png_bytes(figure)


def draw_bar(axes: Any, x: float, width: float, aggregate: dict, colour: str) -> None:
    """One mean as a bar at x, with its interval as a whisker when there is one."""
    mean = as_number(aggregate.get("mean"))
    if mean is None:
        return
    axes.bar(x, mean, width, color=colour)
    low, high = as_number(aggregate.get("low")), as_number(aggregate.get("high"))
    if low is not None and high is not None:
        axes.errorbar(x, mean, yerr=[[max(mean - low, 0.0)], [max(high - mean, 0.0)]], fmt="none",
                      ecolor="#222", elinewidth=1, capsize=3)


def lengths_plot(evaluation: dict) -> bytes:
    """Histogram of answer length in tokens, one bar per model in each shared bin."""
    models, colours = evaluation["models"], model_colours(evaluation)
    lengths = {m: [t for e in evaluation.get("examples", [])
                   if (t := as_number(answer_of(e, m).get("tokens"))) is not None] for m in models}
    figure = new_figure(5.5, 4.0)
    values = [t for ts in lengths.values() for t in ts]
    if not values:
        return empty_plot(figure, "no answer lengths recorded")
    axes = figure.add_subplot()
    limit = as_number(evaluation.get("settings", {}).get("max_new_tokens"))
    top = max(values + ([limit] if limit else []))
    step = max(1, math.ceil((top + 1) / 24))
    bins = [step * k - 0.5 for k in range(math.ceil((top + 1) / step) + 1)]
    shown = [m for m in models if lengths[m]]
    # Side by side rather than overlaid: models often pile up in the same bin (at the limit) and an
    # overlay would hide one behind the other.
    axes.hist([lengths[m] for m in shown], bins=bins, color=[colours[m] for m in shown], label=shown,
              histtype="bar", rwidth=0.9)
    if limit:
        # Answers piling up at the limit were cut off, not finished: worth seeing at a glance.
        axes.axvline(limit, color="#444", linestyle="--", linewidth=1, label=f"limit ({int(limit)})")
    axes.set_xlabel("answer length (tokens)")
    axes.set_ylabel("answers")
    axes.legend(fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    axes.set_axisbelow(True)
    return png_bytes(figure)
