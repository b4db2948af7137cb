"""The before/after table printed at the end of `affiner run` and `affiner evaluate`; the report has the rest."""

from __future__ import annotations

from affiner.core.formatting import format_value, general_verdict, shorten, text_table
from affiner.evaluation.report_content import unjudged_notes, wins_and_regressions


def format_table(evaluation: dict) -> str:
    """Every metric's mean per model, what the judge left unjudged (if anything), then the question whose
    answer the fine-tune improved most by the headline figure (else the first question)."""
    models = evaluation["models"]
    rows = [["", *models]]
    for key, info in evaluation["metric_info"].items():
        rows.append([info["label"], *(format_value(evaluation["metrics"][key][m]["mean"], info["kind"])
                                      for m in models)])
    example = most_improved(evaluation)
    # The judge's means are over the answers it judged: the reader must see how many it did not.
    notes = [f"Judge: {note}" for note in unjudged_notes(evaluation.get("judge"))]
    general = evaluation.get("general")
    notes += [f"General ability: {general_verdict(general, m)}" for m in models[1:]] if general else []
    lines = [text_table(rows), *notes, "", f"Q: {example['question']}"]
    lines += [f"  {m:5s}: {shorten(example['answers'][m]['text'])}" for m in models]
    return "\n".join(lines)


def most_improved(evaluation: dict) -> dict:
    """The example the report lists first among the largest wins, or the first one when there is none."""
    wins, _ = wins_and_regressions(evaluation, top=1)
    return wins[0]["example"] if wins else evaluation["examples"][0]
