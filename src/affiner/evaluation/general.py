"""The no-harm check: did fine-tuning cost the model general ability the task did not teach?

Besides the task's held-out questions, base and tuned answer affiner's general set (`embedded:general.json`: 80
everyday questions and instructions, English and French, written for affiner, with short reference answers),
scored as the task is. The verdict rests on the teacher-forced loss of those references, the figure that moves
first when a model forgets (a base model's free answers are too poor to compare): each item's loss per token is
paired between base and tuned, and the mean change has a bootstrap interval. Harm is measurable when that
interval lies above zero; the items whose loss rose the most are shown side by side.
"""

from __future__ import annotations

import numpy as np

from affiner.core.formatting import METRIC_INFO, format_aggregate, general_verdict
from affiner.core.templates import Example
from affiner.data.formats import to_examples
from affiner.data.read import read_rows
from affiner.evaluation import metrics
from affiner.evaluation.generation import Answer

GENERAL_SET = "embedded:general.json"
HARMED_ITEM = 0.5  # nats per token: the reference became 1.65x less likely per token for the tuned model
TEXT_METRICS = ("contains", "rouge_l", "chrf", "stopped", "repetition")
SHOWN_ITEMS = 5
# The general set's own answer limit: its references are 4-31 words (at most ~45 tokens), so a task's longer
# limit (the instruct recipe's 256) would only let a base model that never stops ramble on: 4x the decoding.
MAX_NEW_TOKENS = 64
GENERAL_NOTE = ("Everyday questions the fine-tune was not about (affiner's general set), answered by each model "
                f"with the same settings (answers up to {MAX_NEW_TOKENS} tokens, or the task's limit if lower). "
                "The verdict rests on the loss of the reference answers, paired item by "
                "item (mean change with a 95 % bootstrap interval): harm is measurable when the whole interval "
                "is above zero.")


def general_examples() -> list[Example]:
    return to_examples(read_rows(GENERAL_SET))


def answer_limit(task_limit: int) -> int:
    """The general set's answer limit under a task whose answers may run to `task_limit` tokens."""
    return min(task_limit, MAX_NEW_TOKENS)


def no_harm(examples: list[Example], answers: dict[str, list[Answer]], scores: dict[str, list[dict]],
            losses: dict[str, tuple[list[float], list[int]]]) -> dict:
    """The general section of an evaluation: per model its figures, per tuned model its change from the base
    (the first model), the verdict and the items that suffered most."""
    models = list(answers)
    base = models[0]
    per_token = {m: np.asarray(losses[m][0], dtype=float) / np.maximum(np.asarray(losses[m][1], dtype=float), 1)
                 for m in models}
    groups = [e.group for e in examples]
    figures = {m: {"loss": metrics.aggregate_loss(*losses[m], groups)["loss"],
                   **{k: metrics.aggregate([s[k] for s in scores[m]], groups) for k in TEXT_METRICS}} for m in models}
    changes = {m: _change(examples, answers, per_token, base, m) for m in models[1:]}
    return {"set": GENERAL_SET, "items": len(examples), "models": models, "figures": figures, "changes": changes,
            "harmed_item": HARMED_ITEM}


def _change(examples: list[Example], answers: dict[str, list[Answer]], per_token: dict[str, np.ndarray],
            base: str, model: str) -> dict:
    difference = per_token[model] - per_token[base]
    low, high = metrics.bootstrap_interval(difference, groups=[e.group for e in examples])
    harmed = [int(i) for i in np.argsort(-difference) if difference[i] > HARMED_ITEM]
    verdict = ("measurable harm" if low > 0 else "better" if high < 0 else "no measurable harm")
    shown = [{"question": examples[i].instruction, "input": examples[i].input, "reference": examples[i].expected,
              base: answers[base][i].text, model: answers[model][i].text,
              "loss": [round(float(per_token[base][i]), 3), round(float(per_token[model][i]), 3)]}
             for i in harmed[:SHOWN_ITEMS]]
    return {"loss_change": {"mean": float(difference.mean()), "low": low, "high": high}, "verdict": verdict,
            "harmed": len(harmed), "shown": shown}


def general_tables(section: dict) -> tuple[list[str], list[tuple[str, list[str], list[list[str]]]]]:
    """The verdict lines, and (title, header, rows) tables: the figures per model, the items harmed most."""
    models = section["models"]
    lines = [general_verdict(section, m) for m in models[1:]]
    # The table's loss weighs every token alike; the verdict weighs every item alike (a long reference must not
    # outvote the short ones): both are said, so that they are never read as the same figure.
    labels = {"loss": "loss of the general references (token-weighted)"}
    figures = [[labels.get(key, METRIC_INFO[key]["label"])] + [format_aggregate(section["figures"][m][key],
                                                                                METRIC_INFO[key]["kind"])
                                                               for m in models] for key in ("loss", *TEXT_METRICS)]
    tables = [(f"Figures on the {section['items']} general items", ["figure", *models], figures)]
    for model in models[1:]:
        shown = section["changes"][model]["shown"]
        if shown:
            rows = [[s["question"] + (f" [{s['input']}]" if s["input"] else ""), s["reference"], s[models[0]],
                     s[model], f"{s['loss'][0]:.2f} -> {s['loss'][1]:.2f}"] for s in shown]
            tables.append((f"Items harmed most ({model})", ["question", "reference", models[0], model, "loss"],
                           rows))
    return lines, tables
