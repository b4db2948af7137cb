"""report.md: the evaluation report as markdown tables, readable as plain text and on a forge."""

from __future__ import annotations

from typing import Any, Iterable

from affiner.evaluation.benchmarks import benchmarks_tables
from affiner.evaluation.general import GENERAL_NOTE, general_tables
from affiner.evaluation.report_content import (EMPTY_TEXT, HEADLINE_NOTE, answer_of, comparison_note,
                                               correctness_lines, figures_of, format_example_change,
                                               format_settings, headline_rows, judge_tables, question_text, tie_break_metric,
                                               tuned_models, unjudged_notes, wins_and_regressions)


def md_cell(text: Any) -> str:
    """Text safe inside a markdown table cell: pipes and line breaks would end the cell or the row,
    and raw '<' would let an answer inject HTML into a rendered page."""
    text = "" if text is None else str(text)
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")
    return "<br>".join(text.splitlines()) if text.strip() else EMPTY_TEXT


def md_table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def render_markdown(evaluation: dict) -> str:
    # A line break in the title would end the heading early.
    lines = [f"# {' '.join(str(evaluation.get('title', 'Evaluation')).split())}", "",
             f"Settings: {format_settings(evaluation.get('settings', {}))}", ""]
    lines += headline_section(evaluation)
    lines += general_section(evaluation.get("general"))
    lines += not_evaluated_section(evaluation.get("not_evaluated"))
    lines += benchmarks_section(evaluation.get("benchmarks"))
    lines += judge_section(evaluation.get("judge"))
    lines += examples_sections(evaluation)
    lines += every_question_section(evaluation)
    return "\n".join(lines) + "\n"


def headline_section(evaluation: dict) -> list[str]:
    models = evaluation["models"]
    header = ["metric"] + [md_cell(m) for m in models] + \
        [md_cell(f"Δ {m} − {models[0]}") for m in tuned_models(evaluation)]
    rows = [[md_cell(r["label"])] + [md_cell(c) for c in r["cells"]] + [md_cell(text) for text, _ in r["deltas"]]
            for r in headline_rows(evaluation)]
    # Right under the headline, where the judge's means are: they are over the judged answers only.
    warnings = [f"**Judge:** {md_cell(note)}" for note in unjudged_notes(evaluation.get("judge"))]
    figures = ["**Which figure says right or wrong:**", ""] + [f"- {md_cell(line)}" for line in
                                                               correctness_lines(evaluation)] + [""]
    return ["## Headline", ""] + md_table(header, rows) + ["", HEADLINE_NOTE, ""] + \
        [line for note in warnings for line in (note, "")] + figures


def general_section(general: dict | None) -> list[str]:
    if not general:
        return []
    verdicts, tables = general_tables(general)
    lines = ["## General ability (no-harm check)", "", *[f"**{md_cell(v)}**" for v in verdicts], "", GENERAL_NOTE, ""]
    for title, head, body in tables:
        lines += [f"### {title}", ""] + md_table(head, [[md_cell(c) for c in r] for r in body]) + [""]
    return lines


def benchmarks_section(benchmarks: dict | None) -> list[str]:
    if not benchmarks:
        return []
    notes, tables = benchmarks_tables(benchmarks)
    lines = ["## Benchmarks (lm-evaluation-harness)", "", notes[0], ""]
    for _, head, body in tables:
        lines += md_table([md_cell(h) for h in head], [[md_cell(c) for c in r] for r in body]) + [""]
    return lines + notes[1:] + [""]


def not_evaluated_section(dropped: dict | None) -> list[str]:
    if not dropped:
        return []
    rows = [[md_cell(r["question"]), md_cell(r["reason"])] for r in dropped["rows"]]
    more = dropped["count"] - len(rows)
    return ["## Held-out rows not evaluated", ""] + md_table(["question", "why"], rows) + \
        ([""] + [f"... and {more} more."] if more > 0 else []) + [""]


def judge_section(judge: dict | None) -> list[str]:
    if not judge:
        return []
    lines = ["## Judge", ""]
    for title, head, body in judge_tables(judge):
        lines += [f"### {title}", ""] + md_table(head, [[md_cell(c) for c in r] for r in body]) + [""]
    return lines


def examples_sections(evaluation: dict) -> list[str]:
    """Largest wins, then largest regressions: question, reference, both answers and the changes."""
    base, primary = evaluation["models"][0], evaluation["primary_metric"]
    model, secondary = (tuned_models(evaluation) or [""])[0], tie_break_metric(evaluation)
    head = ["#", "question", "reference", md_cell(f"{base} answer"), md_cell(f"{model} answer"),
            md_cell(f"Δ {primary}")] + ([md_cell(f"Δ {secondary}")] if secondary else [])
    lines = []
    wins, regressions = wins_and_regressions(evaluation)
    for title, items in (("Largest wins", wins), ("Largest regressions", regressions)):
        lines += [f"## {title}", "", md_cell(comparison_note(evaluation)), ""]
        if not items:
            lines += ["none", ""]
            continue
        body = [[str(item["index"] + 1), md_cell(question_text(item["example"])),
                 md_cell(item["example"].get("reference")), md_cell(answer_of(item["example"], base).get("text")),
                 md_cell(answer_of(item["example"], model).get("text")), format_example_change(item["change"])]
                + ([format_example_change(item["tie_change"])] if secondary else []) for item in items]
        lines += md_table(head, body) + [""]
    return lines


def every_question_section(evaluation: dict) -> list[str]:
    models = evaluation["models"]
    head = ["#", "question", "reference"]
    for m in models:
        head += [md_cell(f"{m} answer"), md_cell(f"{m}: right or wrong")]
    body = []
    for index, example in enumerate(evaluation.get("examples", [])):
        row = [str(index + 1), md_cell(question_text(example)), md_cell(example.get("reference"))]
        for m in models:
            row += [md_cell(answer_of(example, m).get("text")), md_cell(figures_of(example, m, evaluation))]
        body.append(row)
    return ["## Every question", ""] + (md_table(head, body) if body else ["none"])
