"""report.html: the evaluation report as one self-contained page (inline CSS, plots as data: URIs, no
scripts, no external resources), base answers tinted blue and tuned answers green."""

from __future__ import annotations

import base64
import html
from typing import Any

from affiner.evaluation.benchmarks import benchmarks_tables
from affiner.evaluation.general import GENERAL_NOTE, general_tables
from affiner.evaluation.report_content import (BASE_TINT, EMPTY_TEXT, HEADLINE_NOTE, TUNED_TINT, answer_of, comparison_note,
                                               correctness_lines, figures_of, format_example_change,
                                               format_settings, headline_rows, judge_tables, question_text, role,
                                               tie_break_metric, tuned_models, unjudged_notes,
                                               wins_and_regressions)

# The policy makes "self-contained" a property the browser enforces: nothing outside the file loads
# and no script runs, whatever text ends up in the page.
CONTENT_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

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
.warning {{ color: #b3261e; margin: 6px 0 0; }}
.answer {{ white-space: pre-wrap; }}
.meta {{ display: block; font-size: .8em; margin-top: 2px; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 16px; margin-top: 16px; }}
figure {{ margin: 0; max-width: 100%; }}
figure img {{ width: 100%; height: auto; border: 1px solid var(--line); }}
figcaption {{ color: var(--muted); font-size: .9em; }}
.examples td:first-child {{ white-space: nowrap; color: var(--muted); }}
"""


# --------------------------------------------------------------------------- building blocks

def escape(text: Any) -> str:
    return html.escape("" if text is None else str(text))


def text_span(text: Any) -> str:
    """Model and dataset text keeps its line breaks."""
    return f'<span class="answer">{escape(text)}</span>'


def answer_cell(example: dict, model: str) -> str:
    answer = answer_of(example, model)
    tokens, stopped = answer.get("tokens"), answer.get("stopped")
    meta = [] if tokens is None else [f"{tokens} tokens"]
    if answer.get("new_turn"):
        meta.append("ran into a new turn (cut there)")
    elif stopped is False:
        # The reader should know that an answer was cut by the length limit, not ended by the model.
        meta.append("hit the length limit")
    text = answer.get("text")
    body = text_span(text) if text else f'<span class="meta">{EMPTY_TEXT}</span>'
    return body + (f'<span class="meta">{escape(", ".join(meta))}</span>' if meta else "")


def table(header: list[tuple[str, str]], rows: list[list[Any]], table_id: str = "", css: str = "") -> str:
    """header: (text, class) pairs. A row cell is escaped HTML, or (escaped HTML, class) to tint the cell."""
    attributes = (f' id="{escape(table_id)}"' if table_id else "") + (f' class="{escape(css)}"' if css else "")
    head = "".join(f'<th class="{escape(c)}">{escape(t)}</th>' if c else f"<th>{escape(t)}</th>" for t, c in header)
    body = "".join("<tr>" + "".join(table_cell(cell) for cell in row) + "</tr>" for row in rows)
    return f"<table{attributes}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def table_cell(cell: Any) -> str:
    if isinstance(cell, tuple):
        content, css = cell
        return f'<td class="{escape(css)}">{content}</td>'
    return f"<td>{cell}</td>"


def png_width(png: bytes) -> int:
    # The IHDR chunk always comes first: 8-byte signature, 4-byte length, "IHDR", then the width.
    return int.from_bytes(png[16:20], "big")


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# --------------------------------------------------------------------------- the page

def render_html(evaluation: dict, plots: dict[str, bytes], captions: dict[str, str] | None = None) -> str:
    """The whole page; `plots` are PNGs by file name, `captions` their captions by the same names."""
    title = str(evaluation.get("title", "Evaluation"))
    parts = [f"<h1>{escape(title)}</h1>",
             f'<p class="settings">{escape(format_settings(evaluation.get("settings", {})))}</p>',
             headline_section(evaluation), figures_section(plots, captions or {}),
             general_section(evaluation.get("general")), not_evaluated_section(evaluation.get("not_evaluated")),
             benchmarks_section(evaluation.get("benchmarks")),
             judge_section(evaluation.get("judge")),
             examples_sections(evaluation),
             every_question_section(evaluation)]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_POLICY}">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            + "\n".join(part for part in parts if part) + "\n</main>\n</body>\n</html>\n")


def headline_section(evaluation: dict) -> str:
    models = evaluation["models"]
    header = [("metric", "")] + [(m, f"model {role(evaluation, m)}") for m in models] \
        + [(f"Δ {m} − {models[0]}", "model") for m in tuned_models(evaluation)]
    rows = []
    for row in headline_rows(evaluation):
        cells = [escape(row["label"])]
        cells += [(escape(c), f"num {role(evaluation, m)}") for c, m in zip(row["cells"], models)]
        cells += [(f'<span class="{escape(v)}">{escape(text)}</span>' if v else escape(text), "num")
                  for text, v in row["deltas"]]
        rows.append(cells)
    # Right under the headline, where the judge's means are: they are over the judged answers only.
    warnings = "".join(f'\n<p class="warning"><strong>Judge:</strong> {escape(note)}</p>'
                       for note in unjudged_notes(evaluation.get("judge")))
    figures = "".join(f"<li>{escape(line)}</li>" for line in correctness_lines(evaluation))
    return (table(header, rows, table_id="headline") + f'\n<p class="note">{escape(HEADLINE_NOTE)}</p>' + warnings
            + f'\n<p class="note"><strong>Which figure says right or wrong:</strong></p>\n<ul class="note">{figures}</ul>')


def figures_section(plots: dict[str, bytes], captions: dict[str, str]) -> str:
    # Each figure as wide as its PNG (at most the page): a wide chart of many metrics gets a row of its
    # own instead of being squeezed to half a row with unreadable labels.
    figures = "".join(f'<figure style="flex: 0 1 {png_width(png)}px">'
                      f'<img src="{data_uri(png)}" alt="{escape(captions.get(name, name))}">'
                      f"<figcaption>{escape(captions.get(name, name))}</figcaption></figure>"
                      for name, png in plots.items())
    return f'<section class="plots">{figures}</section>'


def general_section(general: dict | None) -> str:
    if not general:
        return ""
    verdicts, tables = general_tables(general)
    parts = ["<h2>General ability (no-harm check)</h2>"]
    parts += [f'<p class="verdict"><strong>{escape(v)}</strong></p>' for v in verdicts]
    parts.append(f'<p class="note">{escape(GENERAL_NOTE)}</p>')
    for table_title, head, body in tables:
        parts.append(f"<h3>{escape(table_title)}</h3>")
        parts.append(table([(h, "") for h in head], [[escape(c) for c in r] for r in body]))
    return "\n".join(parts)


def benchmarks_section(benchmarks: dict | None) -> str:
    if not benchmarks:
        return ""
    notes, tables = benchmarks_tables(benchmarks)
    parts = ["<h2>Benchmarks (lm-evaluation-harness)</h2>", f"<p>{escape(notes[0])}</p>"]
    parts += [table([(h, "") for h in head], [[escape(c) for c in r] for r in body]) for _, head, body in tables]
    return "\n".join(parts + [f'<p class="note">{escape(note)}</p>' for note in notes[1:]])


def not_evaluated_section(dropped: dict | None) -> str:
    if not dropped:
        return ""
    more = dropped["count"] - len(dropped["rows"])
    return ("<h2>Held-out rows not evaluated</h2>\n" +
            table([("question", ""), ("why", "")], [[escape(r["question"]), escape(r["reason"])] for r in dropped["rows"]])
            + (f"\n<p class=\"note\">... and {more} more.</p>" if more > 0 else ""))


def judge_section(judge: dict | None) -> str:
    if not judge:
        return ""
    parts = ["<h2>Judge</h2>"]
    for table_title, head, body in judge_tables(judge):
        parts.append(f"<h3>{escape(table_title)}</h3>")
        parts.append(table([(h, "") for h in head], [[escape(c) for c in r] for r in body]))
    return "\n".join(parts)


def examples_sections(evaluation: dict) -> str:
    """Largest wins, then largest regressions: question, reference, both answers and the changes."""
    base, primary = evaluation["models"][0], evaluation["primary_metric"]
    model, secondary = (tuned_models(evaluation) or [""])[0], tie_break_metric(evaluation)
    head = [("#", ""), ("question", ""), ("reference", ""), (f"{base} answer", "base"),
            (f"{model} answer", "tuned"), (f"Δ {primary}", "")] + ([(f"Δ {secondary}", "")] if secondary else [])
    parts = []
    wins, regressions = wins_and_regressions(evaluation)
    for section, items in (("Largest wins", wins), ("Largest regressions", regressions)):
        parts.append(f"<h2>{escape(section)}</h2>")
        parts.append(f'<p class="note">{escape(comparison_note(evaluation))}</p>')
        if not items:
            parts.append("<p>none</p>")
            continue
        body = [[escape(item["index"] + 1), text_span(question_text(item["example"])),
                 text_span(item["example"].get("reference")),
                 (answer_cell(item["example"], base), "base"),
                 (answer_cell(item["example"], model), "tuned"),
                 (escape(format_example_change(item["change"])), "num")]
                + ([(escape(format_example_change(item["tie_change"])), "num")] if secondary else [])
                for item in items]
        parts.append(table(head, body, css="examples"))
    return "\n".join(parts)


def every_question_section(evaluation: dict) -> str:
    models = evaluation["models"]
    head = [("#", ""), ("question", ""), ("reference", "")]
    for m in models:
        head += [(f"{m} answer", role(evaluation, m)), (f"{m}: right or wrong", role(evaluation, m))]
    body = []
    for index, example in enumerate(evaluation.get("examples", [])):
        row = [escape(index + 1), text_span(question_text(example)), text_span(example.get("reference"))]
        for m in models:
            row += [(answer_cell(example, m), role(evaluation, m)),
                    (escape(figures_of(example, m, evaluation)), role(evaluation, m))]
        body.append(row)
    return "<h2>Every question</h2>\n" + (table(head, body, css="examples") if body else "<p>none</p>")
