"""The evaluation report: what a reader opens to see whether fine-tuning helped.

`write_report(folder, evaluation)` writes, into `folder`:

- `report.md`    headline table (base, each tuned model, Δ with a better/worse mark), judge verdicts,
                 largest wins and regressions, and every question with every answer;
- `report.html`  the same content as one self-contained page (inline CSS, plots as data: URIs, no
                 scripts, no external resources), base answers tinted blue and tuned answers green;
- `metrics.png`  grouped bars, one group per rate/score metric, one bar per model, 95 % intervals;
- `lengths.png`  histogram of answer lengths (tokens) per model;
- `answers.csv`  one row per question with each model's answer, stop flag, length and scores;
- `metrics.json` settings, models, aggregate metrics, metric descriptions and judge results.

Each file is written to a temporary name in the same folder and then renamed over the target, so an
interrupted run leaves either the previous file or the new one, never half of one. Other files in the
folder are left alone.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import textwrap
from pathlib import Path
from typing import Any, Iterable
from affiner.core.files import write_atomic

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
ANSWERS_CSV = "answers.csv"
METRICS_JSON = "metrics.json"
METRICS_PLOT = "metrics.png"
LENGTHS_PLOT = "lengths.png"

TOP_EXAMPLES = 5
# Breaks ties between examples with the same primary-metric change; a graded score separates them
# where a 0/1 metric such as "contains" cannot.
PREFERRED_TIE_BREAK = "rouge_l"
# Columns of answers.csv that come from the answer itself; a per-example score with the same name
# would duplicate (and clash with) them.
ANSWER_FIELDS = ("answer", "stopped", "tokens")
MISSING = "—"

# One colour per role everywhere (table cells, answer boxes, plot bars), so that the reader learns
# "blue is base, green is tuned" once.
BASE_COLOUR = "#3b6fb6"
TUNED_COLOURS = ("#2e8b3e", "#7cb342", "#00897b", "#558b2f", "#26a69a", "#9ccc65")
BASE_TINT = "#dce8fa"
TUNED_TINT = "#daf1de"


# --------------------------------------------------------------------------- public entry point

def write_report(folder: Path, evaluation: dict) -> dict[str, Path]:
    """Write report.md, report.html (self-contained), answers.csv, metrics.json and plot PNGs into folder;
    return {name: path}, keyed by file name (e.g. "report.html").
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    models: list[str] = list(evaluation["models"])
    if not models:
        raise ValueError("evaluation['models'] is empty: there is no model to report on.")

    plots = {METRICS_PLOT: metrics_plot(evaluation), LENGTHS_PLOT: lengths_plot(evaluation)}
    written: dict[str, Path] = {}
    for name, png in plots.items():
        written[name] = write_atomic(folder / name, png)
    written[ANSWERS_CSV] = write_atomic(folder / ANSWERS_CSV, answers_csv(evaluation).encode("utf-8"))
    written[METRICS_JSON] = write_atomic(folder / METRICS_JSON, metrics_json(evaluation).encode("utf-8"))
    written[REPORT_MD] = write_atomic(folder / REPORT_MD, render_markdown(evaluation).encode("utf-8"))
    written[REPORT_HTML] = write_atomic(folder / REPORT_HTML, render_html(evaluation, plots).encode("utf-8"))
    return written


# --------------------------------------------------------------------------- what the report computes

def _tuned(evaluation: dict) -> list[str]:
    return list(evaluation["models"][1:])


def _aggregate(evaluation: dict, metric: str, model: str) -> dict:
    return (evaluation.get("metrics", {}).get(metric) or {}).get(model) or {}


def _mean(evaluation: dict, metric: str, model: str) -> float | None:
    return _number(_aggregate(evaluation, metric, model).get("mean"))


def _number(value: Any) -> float | None:
    """None for anything that is not a finite number, so that gaps show as gaps instead of 'nan'."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def delta(evaluation: dict, metric: str, model: str) -> float | None:
    """Mean of `model` minus mean of the base model (None if either is missing)."""
    tuned, base = _mean(evaluation, metric, model), _mean(evaluation, metric, evaluation["models"][0])
    return None if tuned is None or base is None else tuned - base


def verdict(change: float | None, higher_is_better: bool | None) -> str:
    """'better', 'worse', 'same', or '' when the metric has no good direction or no value."""
    if change is None or higher_is_better is None:
        return ""
    if change == 0:
        return "same"
    return "better" if (change > 0) == bool(higher_is_better) else "worse"


def per_example_metrics(evaluation: dict) -> list[str]:
    """Per-example score names in metric_info order, then any others alphabetically."""
    seen: set[str] = set()
    for example in evaluation.get("examples", []):
        for answer in (example.get("answers") or {}).values():
            seen.update((answer or {}).get("scores") or {})
    ordered = [m for m in evaluation.get("metric_info", {}) if m in seen]
    return ordered + sorted(seen - set(ordered))


def _score(example: dict, model: str, metric: str) -> float | None:
    answer = (example.get("answers") or {}).get(model) or {}
    return _number((answer.get("scores") or {}).get(metric))


def tie_break_metric(evaluation: dict) -> str | None:
    """ROUGE-L when examples carry it, else the first other per-example metric with a good direction."""
    primary, info = evaluation["primary_metric"], evaluation.get("metric_info", {})
    candidates = [m for m in per_example_metrics(evaluation)
                  if m != primary and info.get(m, {}).get("higher_is_better") is not None]
    if PREFERRED_TIE_BREAK in candidates:
        return PREFERRED_TIE_BREAK
    return candidates[0] if candidates else None


def _change(example: dict, metric: str | None, model: str, base: str) -> float | None:
    """Per-example score of `model` minus that of `base` (None if either is missing)."""
    if metric is None:
        return None
    after, before = _score(example, model, metric), _score(example, base, metric)
    return None if after is None or before is None else after - before


def wins_and_regressions(evaluation: dict, top: int = TOP_EXAMPLES) -> tuple[list[dict], list[dict]]:
    """Largest per-example changes of the primary metric, first tuned model against the base.

    Each item: {"index", "example", "change", "tie_change"}, changes being tuned − base. A win is a
    change in the metric's good direction (a drop, for a lower-is-better metric). Equal changes are
    ordered by the tie-break metric's change (best first for wins, worst first for regressions), then
    by question order so that the result is deterministic.
    """
    tuned = _tuned(evaluation)
    if not tuned:
        return [], []
    base, model, info = evaluation["models"][0], tuned[0], evaluation.get("metric_info", {})
    primary, secondary = evaluation["primary_metric"], tie_break_metric(evaluation)
    # Orientation makes "positive = better" so one sort serves both directions of metric.
    sign = -1.0 if info.get(primary, {}).get("higher_is_better") is False else 1.0
    tie_sign = -1.0 if info.get(secondary, {}).get("higher_is_better") is False else 1.0
    rows = []
    for index, example in enumerate(evaluation.get("examples", [])):
        change = _change(example, primary, model, base)
        if change is None or change == 0:
            continue
        tie_change = _change(example, secondary, model, base)
        rows.append({"index": index, "example": example, "change": change, "tie_change": tie_change,
                     "gain": sign * change, "tie_gain": tie_sign * (tie_change or 0.0)})
    wins = sorted((r for r in rows if r["gain"] > 0), key=lambda r: (-r["gain"], -r["tie_gain"], r["index"]))
    regressions = sorted((r for r in rows if r["gain"] < 0), key=lambda r: (r["gain"], r["tie_gain"], r["index"]))
    return wins[:top], regressions[:top]


# --------------------------------------------------------------------------- formatting helpers

def format_value(value: Any, kind: str) -> str:
    """An aggregate in its metric's unit: rate as %, score and loss with 3 decimals, count with 1."""
    number = _number(value)
    if number is None:
        return MISSING
    if kind == "rate":
        return f"{100 * number:.1f} %"
    if kind == "count":
        return f"{number:.1f}"
    return f"{number:.3f}"


def format_interval(low: Any, high: Any, kind: str) -> str:
    if _number(low) is None or _number(high) is None:
        return ""
    return f"[{format_value(low, kind)}, {format_value(high, kind)}]"


def format_aggregate(aggregate: dict, kind: str) -> str:
    """'95.0 % [88.0 %, 100.0 %]', or the mean alone when there is no interval."""
    value = format_value(aggregate.get("mean"), kind)
    interval = format_interval(aggregate.get("low"), aggregate.get("high"), kind)
    return f"{value} {interval}" if interval and value != MISSING else value


def displayed_delta(change: float | None, kind: str) -> float | None:
    """The difference rounded as it is shown: float noise such as 1e-17 must read "same", not "better"."""
    if change is None:
        return None
    # "+ 0.0" turns -0.0 into 0.0, so that no "-0.0" is printed.
    return round(change, 3 if kind in ("rate", "score", "loss") else 1) + 0.0


def format_delta(change: float | None, kind: str) -> str:
    """Signed difference; a difference of rates is in percentage points, not per cent."""
    if change is None:
        return MISSING
    if kind == "rate":
        return f"{100 * change:+.1f} pp"
    if kind == "count":
        return f"{change:+.1f}"
    return f"{change:+.3f}"


def format_delta_cell(change: float | None, kind: str, higher_is_better: bool | None) -> tuple[str, str]:
    """(text, verdict) of one Δ cell, e.g. ("+12.0 pp ▲ better", "better")."""
    shown = displayed_delta(change, kind)
    judged = verdict(shown, higher_is_better)
    mark = {"better": "▲ better", "worse": "▼ worse", "same": "= same"}.get(judged, "")
    text = format_delta(shown, kind)
    return (f"{text} {mark}" if mark else text), judged


def format_example_score(value: Any) -> str:
    """Per-example scores: whole numbers as such (0/1 for yes/no metrics), others with 3 decimals."""
    number = _number(value)
    if number is None:
        return MISSING
    return str(int(number)) if number.is_integer() else f"{number:.3f}"


def format_example_change(value: float | None) -> str:
    """Signed per-example difference: '+1' for a yes/no metric flipping, '+0.250' for a graded one."""
    if value is None:
        return MISSING
    return f"{value:+.0f}" if float(value).is_integer() else f"{value:+.3f}"


def format_settings(settings: dict) -> str:
    return " · ".join(f"{key}: {value}" for key, value in settings.items())


def _label(evaluation: dict, metric: str | None) -> str:
    if metric is None:
        return ""
    return evaluation.get("metric_info", {}).get(metric, {}).get("label", metric)


def md_cell(text: Any) -> str:
    """Text safe inside a markdown table cell: pipes and line breaks would end the cell or the row,
    and raw '<' would let an answer inject HTML into a rendered page."""
    text = "" if text is None else str(text)
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")
    return "<br>".join(text.splitlines()) if text.strip() else MISSING


def md_table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _question_text(example: dict) -> str:
    extra = (example.get("input") or "").strip()
    return f"{example.get('question', '')}\n\nInput: {extra}" if extra else str(example.get("question", ""))


def _answer(example: dict, model: str) -> dict:
    return (example.get("answers") or {}).get(model) or {}


# --------------------------------------------------------------------------- markdown

def headline_rows(evaluation: dict) -> list[dict]:
    """One row per metric in metric_info order: label, formatted cells, (Δ text, verdict) per tuned model."""
    rows = []
    for metric, info in evaluation.get("metric_info", {}).items():
        kind, better = info.get("kind", "score"), info.get("higher_is_better")
        rows.append({
            "metric": metric, "label": info.get("label", metric),
            "cells": [format_aggregate(_aggregate(evaluation, metric, m), kind) for m in evaluation["models"]],
            "deltas": [format_delta_cell(delta(evaluation, metric, m), kind, better) for m in _tuned(evaluation)],
        })
    return rows


def _judge_tables(judge: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) per judge mode present, cells already formatted (not yet escaped)."""
    tables = []
    absolute = judge.get("absolute") or {}
    if absolute:
        tables.append(("Absolute: the judge marks each answer right or wrong",
                       ["model", "accuracy", "judged", "unparseable", "failed"],
                       [[model, format_value(r.get("accuracy"), "rate"), _count(r.get("judged")),
                         _count(r.get("unparseable")), _count(r.get("failed"))] for model, r in absolute.items()]))
    pairwise = judge.get("pairwise") or {}
    if pairwise:
        tables.append(("Pairwise: the judge picks the better answer, tuned against base",
                       ["model", "win rate", "wins", "losses", "ties", "unparseable"],
                       [[model, format_value(r.get("win_rate"), "rate"), _count(r.get("wins")), _count(r.get("losses")),
                         _count(r.get("ties")), _count(r.get("unparseable"))] for model, r in pairwise.items()]))
    return tables


def _count(value: Any) -> str:
    number = _number(value)
    return MISSING if number is None else format_example_score(number)


def _comparison_note(evaluation: dict) -> str:
    """What the wins and regressions compare, in words (plain text, escaped by the caller)."""
    tuned, secondary = _tuned(evaluation), tie_break_metric(evaluation)
    if not tuned:
        return "There is no tuned model to compare with the base."
    note = (f"{tuned[0]} against {evaluation['models'][0]}, by the change in "
            f"{_label(evaluation, evaluation['primary_metric'])}")
    return note + (f", ties broken by {_label(evaluation, secondary)}." if secondary else ".")


def render_markdown(evaluation: dict) -> str:
    models, tuned = evaluation["models"], _tuned(evaluation)
    base, primary = models[0], evaluation["primary_metric"]
    # A line break in the title would end the heading early.
    lines = [f"# {' '.join(str(evaluation.get('title', 'Evaluation')).split())}", "",
             f"Settings: {format_settings(evaluation.get('settings', {}))}", "",
             "## Headline", ""]
    header = ["metric"] + [md_cell(m) for m in models] + [md_cell(f"Δ {m} − {base}") for m in tuned]
    rows = [[md_cell(r["label"])] + [md_cell(c) for c in r["cells"]] + [md_cell(text) for text, _ in r["deltas"]]
            for r in headline_rows(evaluation)]
    lines += md_table(header, rows)
    lines += ["", "Means with 95 % bootstrap intervals in brackets. Δ is tuned − base (rates in percentage "
              "points); ▲ better / ▼ worse takes into account whether higher is better for that metric.", ""]

    judge = evaluation.get("judge")
    if judge:
        lines += ["## Judge", ""]
        for title, head, body in _judge_tables(judge):
            lines += [f"### {title}", ""] + md_table(head, [[md_cell(c) for c in r] for r in body]) + [""]

    wins, regressions = wins_and_regressions(evaluation)
    model, secondary = (tuned or [""])[0], tie_break_metric(evaluation)
    for title, items in (("Largest wins", wins), ("Largest regressions", regressions)):
        lines += [f"## {title}", "", md_cell(_comparison_note(evaluation)), ""]
        if not items:
            lines += ["none", ""]
            continue
        head = ["#", "question", "reference", md_cell(f"{base} answer"), md_cell(f"{model} answer"),
                md_cell(f"Δ {primary}")] + ([md_cell(f"Δ {secondary}")] if secondary else [])
        body = [[str(item["index"] + 1), md_cell(_question_text(item["example"])),
                 md_cell(item["example"].get("reference")), md_cell(_answer(item["example"], base).get("text")),
                 md_cell(_answer(item["example"], model).get("text")), format_example_change(item["change"])]
                + ([format_example_change(item["tie_change"])] if secondary else []) for item in items]
        lines += md_table(head, body) + [""]

    lines += ["## Every question", ""]
    head = ["#", "question", "reference"]
    for m in models:
        head += [md_cell(f"{m} answer"), md_cell(f"{m} {primary}")]
    body = []
    for index, example in enumerate(evaluation.get("examples", [])):
        row = [str(index + 1), md_cell(_question_text(example)), md_cell(example.get("reference"))]
        for m in models:
            row += [md_cell(_answer(example, m).get("text")), format_example_score(_score(example, m, primary))]
        body.append(row)
    lines += md_table(head, body) if body else ["none"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- html

CSS = f"""
:root {{ --base: {BASE_TINT}; --tuned: {TUNED_TINT}; --line: #d0d4da; --muted: #5f6670; }}
* {{ box-sizing: border-box; }}
body {{ margin: 0; background: #fff; color: #1d2127;
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }}
main {{ max-width: 1180px; margin: 0 auto; padding: 16px 20px 48px; }}
h1 {{ font-size: 1.5em; margin: 0 0 4px; overflow-wrap: anywhere; }}
h2 {{ font-size: 1.2em; margin: 28px 0 8px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }}
h3 {{ font-size: 1em; margin: 16px 0 6px; }}
.settings, .note, .meta {{ color: var(--muted); }}
.settings {{ margin: 0 0 14px; }}
.note {{ font-size: .9em; margin: 6px 0 0; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ border: 1px solid var(--line); padding: 5px 8px; text-align: left; vertical-align: top;
  overflow-wrap: anywhere; }}
/* Answers may hold unbroken junk that must wrap anywhere; headers are short words that must not. */
th {{ background: #f1f3f5; overflow-wrap: normal; }}
td.num {{ white-space: nowrap; }}
#headline td.num, #headline th.model {{ text-align: right; white-space: nowrap; }}
th.base, td.base {{ background: var(--base); }}
th.tuned, td.tuned {{ background: var(--tuned); }}
.better {{ color: #1b7a32; font-weight: 600; }}
.worse {{ color: #b3261e; font-weight: 600; }}
.answer {{ white-space: pre-wrap; }}
.meta {{ display: block; font-size: .8em; margin-top: 2px; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 16px; margin-top: 16px; }}
figure {{ margin: 0; max-width: 100%; }}
figure img {{ width: 100%; height: auto; border: 1px solid var(--line); }}
figcaption {{ color: var(--muted); font-size: .9em; }}
.examples td:first-child {{ white-space: nowrap; color: var(--muted); }}
"""


def _e(text: Any) -> str:
    return html.escape("" if text is None else str(text))


def _text(text: Any) -> str:
    """Model and dataset text keeps its line breaks."""
    return f'<span class="answer">{_e(text)}</span>'


def _role(evaluation: dict, model: str) -> str:
    return "base" if model == evaluation["models"][0] else "tuned"


def _answer_cell(example: dict, model: str) -> str:
    answer = _answer(example, model)
    tokens, stopped = answer.get("tokens"), answer.get("stopped")
    meta = [] if tokens is None else [f"{tokens} tokens"]
    if stopped is False:
        # The reader should know that an answer was cut by the length limit, not ended by the model.
        meta.append("hit the length limit")
    text = answer.get("text")
    body = _text(text) if text else f'<span class="meta">{MISSING}</span>'
    return body + (f'<span class="meta">{_e(", ".join(meta))}</span>' if meta else "")


def _table(header: list[tuple[str, str]], rows: list[list[Any]], table_id: str = "", css: str = "") -> str:
    """header: (text, class) pairs. A row cell is escaped HTML, or (escaped HTML, class) to tint the cell."""
    attributes = (f' id="{_e(table_id)}"' if table_id else "") + (f' class="{_e(css)}"' if css else "")
    head = "".join(f'<th class="{_e(c)}">{_e(t)}</th>' if c else f"<th>{_e(t)}</th>" for t, c in header)
    body = "".join("<tr>" + "".join(_cell(cell) for cell in row) + "</tr>" for row in rows)
    return f"<table{attributes}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(cell: Any) -> str:
    if isinstance(cell, tuple):
        content, css = cell
        return f'<td class="{_e(css)}">{content}</td>'
    return f"<td>{cell}</td>"


def _png_width(png: bytes) -> int:
    # The IHDR chunk always comes first: 8-byte signature, 4-byte length, "IHDR", then the width.
    return int.from_bytes(png[16:20], "big")


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render_html(evaluation: dict, plots: dict[str, bytes]) -> str:
    models, tuned = evaluation["models"], _tuned(evaluation)
    base, primary = models[0], evaluation["primary_metric"]
    title = str(evaluation.get("title", "Evaluation"))
    parts = [f"<h1>{_e(title)}</h1>",
             f'<p class="settings">{_e(format_settings(evaluation.get("settings", {})))}</p>']

    header = [("metric", "")] + [(m, f"model {_role(evaluation, m)}") for m in models] \
        + [(f"Δ {m} − {base}", "model") for m in tuned]
    rows = []
    for row in headline_rows(evaluation):
        cells = [_e(row["label"])]
        cells += [(_e(c), f"num {_role(evaluation, m)}") for c, m in zip(row["cells"], models)]
        cells += [(f'<span class="{_e(v)}">{_e(text)}</span>' if v else _e(text), "num") for text, v in row["deltas"]]
        rows.append(cells)
    parts.append(_table(header, rows, table_id="headline"))
    parts.append('<p class="note">Means with 95 % bootstrap intervals in brackets. Δ is tuned − base (rates in '
                 "percentage points); ▲ better / ▼ worse takes into account whether higher is better for that metric."
                 "</p>")

    captions = {METRICS_PLOT: "Rates and scores per model (0–1), with 95 % intervals",
                LENGTHS_PLOT: "Answer length in tokens, per model"}
    # Each figure as wide as its PNG (at most the page): a wide chart of many metrics gets a row of its
    # own instead of being squeezed to half a row with unreadable labels.
    figures = "".join(f'<figure style="flex: 0 1 {_png_width(png)}px">'
                      f'<img src="{_data_uri(png)}" alt="{_e(captions.get(name, name))}">'
                      f"<figcaption>{_e(captions.get(name, name))}</figcaption></figure>"
                      for name, png in plots.items())
    parts.append(f'<section class="plots">{figures}</section>')

    judge = evaluation.get("judge")
    if judge:
        parts.append("<h2>Judge</h2>")
        for table_title, head, body in _judge_tables(judge):
            parts.append(f"<h3>{_e(table_title)}</h3>")
            parts.append(_table([(h, "") for h in head], [[_e(c) for c in r] for r in body]))

    wins, regressions = wins_and_regressions(evaluation)
    model, secondary = (tuned or [""])[0], tie_break_metric(evaluation)
    for section, items in (("Largest wins", wins), ("Largest regressions", regressions)):
        parts.append(f"<h2>{_e(section)}</h2>")
        parts.append(f'<p class="note">{_e(_comparison_note(evaluation))}</p>')
        if not items:
            parts.append("<p>none</p>")
            continue
        head = [("#", ""), ("question", ""), ("reference", ""), (f"{base} answer", "base"),
                (f"{model} answer", "tuned"), (f"Δ {primary}", "")] + ([(f"Δ {secondary}", "")] if secondary else [])
        body = [[_e(item["index"] + 1), _text(_question_text(item["example"])),
                 _text(item["example"].get("reference")),
                 (_answer_cell(item["example"], base), "base"),
                 (_answer_cell(item["example"], model), "tuned"),
                 (_e(format_example_change(item["change"])), "num")]
                + ([(_e(format_example_change(item["tie_change"])), "num")] if secondary else []) for item in items]
        parts.append(_table(head, body, css="examples"))

    parts.append("<h2>Every question</h2>")
    head = [("#", ""), ("question", ""), ("reference", "")]
    for m in models:
        head += [(f"{m} answer", _role(evaluation, m)), (f"{m} {primary}", _role(evaluation, m))]
    body = []
    for index, example in enumerate(evaluation.get("examples", [])):
        row = [_e(index + 1), _text(_question_text(example)), _text(example.get("reference"))]
        for m in models:
            row += [(_answer_cell(example, m), _role(evaluation, m)),
                    (_e(format_example_score(_score(example, m, primary))), f"num {_role(evaluation, m)}")]
        body.append(row)
    parts.append(_table(head, body, css="examples") if body else "<p>none</p>")

    # The policy makes "self-contained" a property the browser enforces: nothing outside the file loads
    # and no script runs, whatever text ends up in the page.
    policy = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f'<meta http-equiv="Content-Security-Policy" content="{policy}">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            + "\n".join(parts) + "\n</main>\n</body>\n</html>\n")


# --------------------------------------------------------------------------- plots

def _colours(evaluation: dict) -> dict[str, str]:
    models = evaluation["models"]
    return {m: BASE_COLOUR if i == 0 else TUNED_COLOURS[(i - 1) % len(TUNED_COLOURS)] for i, m in enumerate(models)}


def _figure(width: float, height: float):
    # Figure + the Agg canvas directly, never pyplot: nothing global (backend, current figure, figure
    # registry) changes for the code that imported us, and no display is needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    # No timestamp/software metadata, so that the same evaluation gives byte-identical plots.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def metrics_plot(evaluation: dict) -> bytes:
    """Grouped bars: one group per rate/score metric, one bar per model, 95 % interval whiskers."""
    models, colours = evaluation["models"], _colours(evaluation)
    metrics = [m for m, info in evaluation.get("metric_info", {}).items() if info.get("kind") in ("rate", "score")]
    # Two plots of 5.5 in (550 px) sit side by side on the page; more metrics or models widen this one.
    figure = _figure(max(5.5, 1.2 + 1.1 * len(metrics) * max(1.0, len(models) / 2.5)), 4.0)
    axes = figure.add_subplot()
    if not metrics:
        axes.text(0.5, 0.5, "no rate or score metric to plot", ha="center", va="center", transform=axes.transAxes)
        axes.set_axis_off()
        return _png(figure)
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        for j, metric in enumerate(metrics):
            aggregate = _aggregate(evaluation, metric, model)
            mean = _number(aggregate.get("mean"))
            if mean is None:
                continue
            x = j - 0.4 + width * (i + 0.5)
            axes.bar(x, mean, width, color=colours[model])
            low, high = _number(aggregate.get("low")), _number(aggregate.get("high"))
            if low is not None and high is not None:
                axes.errorbar(x, mean, yerr=[[max(mean - low, 0.0)], [max(high - mean, 0.0)]], fmt="none",
                              ecolor="#222", elinewidth=1, capsize=3)
    labels = [textwrap.fill(_label(evaluation, m), 16) for m in metrics]
    axes.set_xticks(range(len(metrics)), labels, fontsize=8)
    axes.set_ylim(0, 1.08)
    axes.set_ylabel("mean (rate or score)")
    axes.grid(axis="y", alpha=0.3)
    axes.set_axisbelow(True)
    # Legend from patches rather than from the bars: a model with no value for the first metric still appears.
    from matplotlib.patches import Patch

    axes.legend(handles=[Patch(color=colours[m], label=m) for m in models], fontsize=8, loc="upper left",
                bbox_to_anchor=(1.0, 1.0))
    return _png(figure)


def lengths_plot(evaluation: dict) -> bytes:
    """Histogram of answer length in tokens, one bar per model in each shared bin."""
    models, colours = evaluation["models"], _colours(evaluation)
    lengths = {m: [t for e in evaluation.get("examples", []) if (t := _number(_answer(e, m).get("tokens"))) is not None]
               for m in models}
    figure = _figure(5.5, 4.0)
    axes = figure.add_subplot()
    values = [t for ts in lengths.values() for t in ts]
    if not values:
        axes.text(0.5, 0.5, "no answer lengths recorded", ha="center", va="center", transform=axes.transAxes)
        axes.set_axis_off()
        return _png(figure)
    limit = _number(evaluation.get("settings", {}).get("max_new_tokens"))
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
    return _png(figure)


# --------------------------------------------------------------------------- csv and json

def answers_csv(evaluation: dict) -> str:
    models, metrics = evaluation["models"], [m for m in per_example_metrics(evaluation) if m not in ANSWER_FIELDS]
    header = ["question", "input", "reference"]
    for m in models:
        header += [f"{m}_{field}" for field in ANSWER_FIELDS] + [f"{m}_{metric}" for metric in metrics]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for example in evaluation.get("examples", []):
        row = [example.get("question", ""), example.get("input", ""), example.get("reference", "")]
        for m in models:
            answer = _answer(example, m)
            stopped = answer.get("stopped")
            row += [answer.get("text", ""), "" if stopped is None else str(bool(stopped)).lower(),
                    "" if answer.get("tokens") is None else answer["tokens"]]
            row += ["" if (v := _score(example, m, metric)) is None else repr(v) for metric in metrics]
        writer.writerow(row)
    return buffer.getvalue()


def _finite(value: Any) -> Any:
    """NaN and infinities become null: they are not JSON, and other tools refuse to read them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def metrics_json(evaluation: dict) -> str:
    content = {"settings": evaluation.get("settings", {}), "models": list(evaluation["models"]),
               "metrics": evaluation.get("metrics", {}), "metric_info": evaluation.get("metric_info", {}),
               "judge": evaluation.get("judge")}
    return json.dumps(_finite(content), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
