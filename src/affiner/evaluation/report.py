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

Every file is made first, written in full under a temporary name in the same folder, and only then are
they renamed over their targets, so an interrupted run (a kill, a full disk) leaves the previous files, never
half of one nor a new one beside old ones, short of a kill between the renames. Other files in the folder are
left alone.

What the report says is worked out in `report_content`; `report_markdown`, `report_html` and `plots`
draw it.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from affiner.core.files import json_text, write_together
from affiner.core.formatting import has_intervals
from affiner.evaluation.plots import lengths_plot, metrics_plot
from affiner.evaluation.report_content import answer_of, example_score, per_example_metrics
from affiner.evaluation.report_html import render_html
from affiner.evaluation.report_markdown import render_markdown
from affiner.core.runfolder import EVALUATION_FILE

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
ANSWERS_CSV = "answers.csv"
METRICS_JSON = EVALUATION_FILE  # what `affiner runs`, the sweep and the model card read back
METRICS_PLOT = "metrics.png"
LENGTHS_PLOT = "lengths.png"
REPORT_FILES = (REPORT_MD, REPORT_HTML, ANSWERS_CSV, METRICS_JSON, METRICS_PLOT, LENGTHS_PLOT)
CAPTIONS = {METRICS_PLOT: "Rates and scores per model (0–1), with 95 % intervals",
            LENGTHS_PLOT: "Answer length in tokens, per model"}
# Columns of answers.csv that come from the answer itself; a per-example score with the same name
# would duplicate (and clash with) them.
ANSWER_FIELDS = ("answer", "stopped", "tokens")


def write_report(folder: Path, evaluation: dict, beside: dict[str, str | bytes] | None = None) -> dict[str, Path]:
    """Write report.md, report.html (self-contained), answers.csv, metrics.json and plot PNGs into folder, with
    the other files of the same evaluation `beside` them (summary.json), all made first, then written together;
    return {name: path}, keyed by file name (e.g. "report.html").
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    contents = {**_contents(evaluation), **(beside or {})}
    write_together({folder / name: content for name, content in contents.items()})
    return {name: folder / name for name in contents}


def _contents(evaluation: dict) -> dict[str, str | bytes]:
    """The content of each of REPORT_FILES, by file name."""
    if not evaluation["models"]:
        raise ValueError("evaluation['models'] is empty: there is no model to report on.")
    plots = {METRICS_PLOT: metrics_plot(evaluation), LENGTHS_PLOT: lengths_plot(evaluation)}
    captions = dict(CAPTIONS)
    if not has_intervals(evaluation):
        captions[METRICS_PLOT] = "Rates and scores per model (0–1); too few questions for intervals"
    return {**plots, ANSWERS_CSV: answers_csv(evaluation), METRICS_JSON: metrics_json(evaluation),
            REPORT_MD: render_markdown(evaluation), REPORT_HTML: render_html(evaluation, plots, captions)}


def answers_csv(evaluation: dict) -> str:
    """One row per question: each model's answer, stop flag, length and per-example scores."""
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
            answer = answer_of(example, m)
            stopped = answer.get("stopped")
            row += [answer.get("text", ""), "" if stopped is None else str(bool(stopped)).lower(),
                    "" if answer.get("tokens") is None else answer["tokens"]]
            row += ["" if (v := example_score(example, m, metric)) is None else repr(v) for metric in metrics]
        writer.writerow(row)
    return buffer.getvalue()


def metrics_json(evaluation: dict) -> str:
    content = {"settings": evaluation.get("settings", {}), "models": list(evaluation["models"]),
               "primary_metric": evaluation.get("primary_metric"),
               "metrics": evaluation.get("metrics", {}), "metric_info": evaluation.get("metric_info", {}),
               "judge": evaluation.get("judge"),
               **{key: evaluation[key] for key in ("changes", "general", "not_evaluated", "benchmarks")
                  if evaluation.get(key)}}
    return json_text(content)
