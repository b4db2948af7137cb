"""What each metric means and how its value reads: one formatter for the terminal, `affiner runs`,
the sweep table, the report and the model card, so that a rate reads the same everywhere.

Units: a rate (0..1) reads as a percentage with one decimal, the decimal dropped when it is zero
("100 %", "96.7 %"); a score (0..1) and a loss with three decimals; a count with one.
"""

from __future__ import annotations

import math
from typing import Any

MISSING = "-"

# Every metric an evaluation reports, in display order. kind: rate, score, count or loss.
# higher_is_better None: neither direction is better in general (answer length).
METRIC_INFO: dict[str, dict] = {
    "contains": {"label": "contains the reference", "higher_is_better": True, "kind": "rate"},
    "contains_key": {"label": "contains the key", "higher_is_better": True, "kind": "rate"},
    "exact_match": {"label": "exact match", "higher_is_better": True, "kind": "rate"},
    "rouge_l": {"label": "ROUGE-L F1", "higher_is_better": True, "kind": "score"},
    "bleu": {"label": "BLEU", "higher_is_better": True, "kind": "score"},
    "chrf": {"label": "chrF", "higher_is_better": True, "kind": "score"},
    "embedding": {"label": "embedding similarity (MiniLM)", "higher_is_better": True, "kind": "score"},
    "stopped": {"label": "stops with EOS before the limit", "higher_is_better": True, "kind": "rate"},
    "new_turn": {"label": "runs into a new turn (cut there)", "higher_is_better": False, "kind": "rate"},
    "tokens": {"label": "answer length (tokens)", "higher_is_better": None, "kind": "count"},
    "repetition": {"label": "repeated 3-grams", "higher_is_better": False, "kind": "rate"},
    "empty": {"label": "empty answers", "higher_is_better": False, "kind": "rate"},
    "echo": {"label": "echoes the question or input", "higher_is_better": False, "kind": "rate"},
    "loss": {"label": "test loss (held-out answers)", "higher_is_better": False, "kind": "loss"},
    "perplexity": {"label": "perplexity (held-out answers)", "higher_is_better": False, "kind": "loss"},
}
JUDGE_INFO = {"label": "LLM judge: correct", "higher_is_better": True, "kind": "rate"}


def metric_kind(metric: str) -> str:
    return (JUDGE_INFO if metric == "judge" else METRIC_INFO.get(metric, {})).get("kind", "score")


def as_number(value: Any) -> float | None:
    """A finite number, or None (missing, NaN, text): what can be shown and compared."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _percent(fraction: float, sign: str = "") -> str:
    text = f"{round(100 * fraction, 1) + 0.0:{sign}.1f}"  # + 0.0: a rounded -0.0 reads "0", not "-0"
    return text[:-2] if text.endswith(".0") else text


def _in_unit(number: float, kind: str, sign: str = "") -> str:
    if kind == "rate":
        return f"{_percent(number, sign)} {'pp' if sign else '%'}"
    return f"{number:{sign}.1f}" if kind == "count" else f"{number:{sign}.3f}"


def format_value(value: Any, kind: str) -> str:
    """One value in its metric's unit: '96.7 %', '0.832', '12.3'."""
    number = as_number(value)
    return MISSING if number is None else _in_unit(number, kind)


def format_interval(low: Any, high: Any, kind: str) -> str:
    if as_number(low) is None or as_number(high) is None:
        return ""
    return f"[{format_value(low, kind)}, {format_value(high, kind)}]"


def format_aggregate(aggregate: dict, kind: str) -> str:
    """'95 % [88.3 %, 100 %]', or the mean alone when there is no interval."""
    value = format_value(aggregate.get("mean"), kind)
    interval = format_interval(aggregate.get("low"), aggregate.get("high"), kind)
    return f"{value} {interval}" if interval and value != MISSING else value


def has_intervals(evaluation: dict) -> bool:
    """Whether any figure of an evaluation has an interval: none has below 10 questions (or groups), and then no
    text may announce one."""
    return any(value.get("low") is not None for by_model in evaluation.get("metrics", {}).values()
               for value in by_model.values())


def format_delta(change: Any, kind: str) -> str:
    """A signed difference; a difference of rates is in percentage points, not per cent: '+12.5 pp'."""
    number = as_number(change)
    return MISSING if number is None else _in_unit(number, kind, "+")


def format_count(count: int, total: int) -> str:
    """'58/60 (96.7 %)'."""
    return f"{count}/{total} ({format_value(count / total if total else None, 'rate')})"


def text_table(rows: list[list[str]]) -> str:
    """Left-aligned columns for the terminal; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def shorten(text: str, width: int = 100, ellipsis: str = "...") -> str:
    """One line of at most `width` characters: white space folded, the end cut with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - len(ellipsis)] + ellipsis


def general_verdict(section: dict, model: str) -> str:
    """The no-harm check's verdict on `model` (an evaluation's "general" section): one sentence a reader can act on,
    with the numbers; the same in the terminal, the report and the model card."""
    change, items = section["changes"][model], section["items"]
    loss = change["loss_change"]
    figures = (f"loss of the references, mean change per item {loss['mean']:+.3f} nats per token "
               f"[{loss['low']:+.3f}, {loss['high']:+.3f}]"
               f", {change['harmed']} of {items} items harmed (loss up more than {section['harmed_item']})")
    if change["verdict"] == "measurable harm":
        return (f"{model}: measurable harm on general ability ({figures}): what the task gained (above) came at "
                "this cost; fewer steps, a lower learning rate or a lower LoRA rank would cost less.")
    if change["verdict"] == "better":
        return f"{model}: no harm, general ability measurably better ({figures})."
    return f"{model}: no measurable harm on general ability ({figures})."
