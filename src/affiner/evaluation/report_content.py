"""What the evaluation report says, before it is drawn as markdown, HTML or plots: each tuned model's
difference from the base with a better/worse verdict, the largest per-question wins and regressions,
the judge tables with the answers the judge left unjudged (and why), and the report's own cell formats.

Aggregates read as every other affiner output does (`affiner.core.formatting`); only what exists in
the report alone (verdict marks, per-question scores and changes) is formatted here.
"""

from __future__ import annotations

from typing import Any

from affiner.core.formatting import MISSING, as_number, format_aggregate, format_delta, format_value
from affiner.core.templates import asked_text

TOP_EXAMPLES = 5
EMPTY_TEXT = "—"  # an empty answer or cell; "-" (formatting.MISSING) is a missing number
# Breaks ties between examples with the same primary-metric change; a graded score separates them
# where a 0/1 metric such as "contains" cannot.
PREFERRED_TIE_BREAK = "rouge_l"
VERDICT_MARKS = {"better": "▲ better", "worse": "▼ worse", "same": "= same", "noise": "≈ within noise"}
HEADLINE_NOTE = ("Means with 95 % bootstrap intervals in brackets. Δ is tuned − base (rates in percentage "
                 "points), with its paired 95 % interval (the same questions resampled for both models, a group of "
                 "questions as one); ▲ better / ▼ worse takes into account whether higher is better for that metric, "
                 "and needs that interval to exclude 0: otherwise ≈ within noise. Fewer than 10 questions (or groups) "
                 "get no interval, so no verdict. The test loss and perplexity weigh every reference token alike: a "
                 "long reference counts for more.")

# One colour per role everywhere (table cells, answer boxes, plot bars), so that the reader learns
# "blue is base, green is tuned" once.
BASE_COLOUR = "#3b6fb6"
TUNED_COLOURS = ("#2e8b3e", "#7cb342", "#00897b", "#558b2f", "#26a69a", "#9ccc65")
BASE_TINT = "#dce8fa"
TUNED_TINT = "#daf1de"


# --------------------------------------------------------------------------- reading the evaluation

def tuned_models(evaluation: dict) -> list[str]:
    """Every model but the base, which always comes first."""
    return list(evaluation["models"][1:])


def role(evaluation: dict, model: str) -> str:
    return "base" if model == evaluation["models"][0] else "tuned"


def model_colours(evaluation: dict) -> dict[str, str]:
    return {m: BASE_COLOUR if i == 0 else TUNED_COLOURS[(i - 1) % len(TUNED_COLOURS)]
            for i, m in enumerate(evaluation["models"])}


def aggregate_of(evaluation: dict, metric: str, model: str) -> dict:
    """{"mean", "low", "high"} of one metric for one model; {} when it was not measured."""
    return (evaluation.get("metrics", {}).get(metric) or {}).get(model) or {}


def metric_label(evaluation: dict, metric: str | None) -> str:
    if metric is None:
        return ""
    return evaluation.get("metric_info", {}).get(metric, {}).get("label", metric)


def answer_of(example: dict, model: str) -> dict:
    return (example.get("answers") or {}).get(model) or {}


def example_score(example: dict, model: str, metric: str) -> float | None:
    return as_number((answer_of(example, model).get("scores") or {}).get(metric))


def question_text(example: dict) -> str:
    return asked_text(str(example.get("question", "")), example.get("input") or "")


def per_example_metrics(evaluation: dict) -> list[str]:
    """Per-example score names in metric_info order, then any others alphabetically."""
    seen: set[str] = set()
    for example in evaluation.get("examples", []):
        for answer in (example.get("answers") or {}).values():
            seen.update((answer or {}).get("scores") or {})
    ordered = [m for m in evaluation.get("metric_info", {}) if m in seen]
    return ordered + sorted(seen - set(ordered))


# --------------------------------------------------------------------------- differences and verdicts

def delta(evaluation: dict, metric: str, model: str) -> float | None:
    """The change from the base to `model`: the paired change's mean where there is one (the judge's is over the
    questions both models got a verdict on, as its interval is), else mean of `model` minus mean of the base (None if
    either is missing)."""
    paired = as_number(evaluation.get("changes", {}).get(metric, {}).get(model, {}).get("mean"))
    if paired is not None:
        return paired
    tuned = as_number(aggregate_of(evaluation, metric, model).get("mean"))
    base = as_number(aggregate_of(evaluation, metric, evaluation["models"][0]).get("mean"))
    return None if tuned is None or base is None else tuned - base


def verdict(change: float | None, higher_is_better: bool | None) -> str:
    """'better', 'worse', 'same', or '' when the metric has no good direction or no value."""
    if change is None or higher_is_better is None:
        return ""
    if change == 0:
        return "same"
    return "better" if (change > 0) == bool(higher_is_better) else "worse"


FLOAT_NOISE = 1e-12  # a difference this small is arithmetic's, not the models': it reads "same"


def displayed_delta(change: float | None, kind: str) -> float | None:
    """The difference rounded as it is shown; float noise such as 1e-17 reads 0."""
    if change is None:
        return None
    if abs(change) < FLOAT_NOISE:
        return 0.0
    return round(change, 3 if kind in ("rate", "score", "loss") else 1) + 0.0  # + 0.0: no "-0" for a change


def bound_text(value: float, kind: str) -> str:
    """An interval's end as shown, its sign kept: an upper end just below 0 reads "-0.000" or "-0 pp", never "+0",
    which would say the interval holds 0."""
    text = format_delta(displayed_delta(value, kind), kind)
    return "-" + text[1:] if value < -FLOAT_NOISE and text.startswith("+") else text


def format_delta_cell(change: float | None, kind: str, higher_is_better: bool | None,
                      interval: dict | None = None) -> tuple[str, str]:
    """(text, verdict) of one Δ cell, e.g. ("+12.5 pp ▲ better", "better"). With the change's paired `interval`
    ({"low", "high"}), shown after it, the verdict is the interval's, read before any rounding: better or worse when
    it excludes 0, "same" when every paired difference is 0, else "≈ within noise"; no verdict when the interval
    could not be had (too few questions)."""
    shown = displayed_delta(change, kind)
    text = format_delta(shown, kind)
    judged = verdict(shown, higher_is_better)
    low, high = (as_number((interval or {}).get(end)) for end in ("low", "high"))
    if low is not None and high is not None and change is not None:
        text += f" [{bound_text(low, kind)}, {bound_text(high, kind)}]"
        if max(abs(low), abs(high), abs(change)) < FLOAT_NOISE:
            judged = verdict(0.0, higher_is_better)
        elif low > FLOAT_NOISE or high < -FLOAT_NOISE:
            judged = verdict(change, higher_is_better)
        elif judged:
            judged = "noise"
    elif interval is not None and judged in ("better", "worse"):  # an interval that could not be had (too few
        judged = ""  # questions): a difference, but no evidence of a change
    mark = VERDICT_MARKS.get(judged, "")
    return (f"{text} {mark}" if mark else text), judged


def headline_rows(evaluation: dict) -> list[dict]:
    """One row per metric in metric_info order: label, formatted cells, (Δ text, verdict) per tuned model."""
    rows = []
    for metric, info in evaluation.get("metric_info", {}).items():
        kind, better = info.get("kind", "score"), info.get("higher_is_better")
        rows.append({
            "metric": metric, "label": info.get("label", metric),
            "cells": [format_aggregate(aggregate_of(evaluation, metric, m), kind) for m in evaluation["models"]],
            "deltas": [format_delta_cell(delta(evaluation, metric, m), kind, better,
                                         evaluation.get("changes", {}).get(metric, {}).get(m))
                       for m in tuned_models(evaluation)],
        })
    return rows


# --------------------------------------------------------------------------- which correctness figure to trust

# What each figure that says "right or wrong" measures, in one line each.
CORRECTNESS = {
    "contains_key": "the answer holds the reference's key part (its own `key`, or the text before eval.key_before), "
                    "whatever it says around it",
    "contains": "the answer holds the whole reference, word for word (case, accents and punctuation aside): a "
                "reworded reference counts as wrong",
    "embedding": "closeness of meaning to the reference (cosine, at most 1; unrelated texts score near 0): rewards "
                 "paraphrase, but extra words around a right answer (\"X stands for ...\") lower it; its model "
                 "(all-MiniLM-L6-v2) learnt English, so texts in other languages read closer than they are (two "
                 "unrelated French sentences score about 0.5, their English translations about 0.1): compare base "
                 "with tuned rather than read the level",
    "judge": "an LLM judge's verdict against the reference",
}
SIMILAR, DISSIMILAR = 0.8, 0.4  # similarity above: "reads as right"; below: "reads as wrong"


def correctness_lines(evaluation: dict) -> list[str]:
    """One line per correctness figure measured: what it means, the headline first and named so; then any
    pair of models two figures rank in opposite orders (plain text, escaped by the renderer)."""
    info, primary = evaluation.get("metric_info", {}), evaluation["primary_metric"]
    present = sorted((m for m in CORRECTNESS if m in info), key=lambda m: m != primary)
    lines = [f"{metric_label(evaluation, m)}{' (the headline)' if m == primary else ''}: {CORRECTNESS[m]}."
             for m in present]
    if primary not in CORRECTNESS:  # a graded figure chosen by eval.headline
        lines.insert(0, f"{metric_label(evaluation, primary)} (the headline, eval.headline): graded closeness of the "
                        "answers to the references, not a verdict of right or wrong; the largest wins and regressions "
                        "are ranked by it.")
    return lines + rank_disagreements(evaluation, present)


def rank_disagreements(evaluation: dict, figures: list[str]) -> list[str]:
    """'embedding similarity ranks tuned below base, contains the key above': the reader must not pick one."""
    primary, notes = evaluation["primary_metric"], []
    for model in tuned_models(evaluation):
        by_primary = clear_change(evaluation, primary, model)
        for other in figures:
            by_other = clear_change(evaluation, other, model)
            if other != primary and by_primary and by_other and (by_primary > 0) != (by_other > 0):
                notes.append(f"The figures disagree on {model}: {metric_label(evaluation, other)} ranks it "
                             f"{'above' if by_other > 0 else 'below'} {evaluation['models'][0]}, "
                             f"{metric_label(evaluation, primary)} {'above' if by_primary > 0 else 'below'}; "
                             "the answers where they part are marked under Every question.")
    return notes


def clear_change(evaluation: dict, metric: str, model: str) -> float | None:
    """`model`'s change from the base when its paired interval excludes 0 (or none was recorded), else None: a
    change the table calls "within noise" ranks the models in no order."""
    change = delta(evaluation, metric, model)
    interval = evaluation.get("changes", {}).get(metric, {}).get(model)
    if change is None or interval is None:
        return change
    low, high = as_number(interval.get("low")), as_number(interval.get("high"))
    return None if low is None or high is None or low <= 0 <= high else change


def figures_of(example: dict, model: str, evaluation: dict) -> str:
    """The correctness figures of one answer, and where they disagree: 'key 1 · reference 0 · similarity 0.62 ·
    ⚠ right key, reworded reference'."""
    info = evaluation.get("metric_info", {})
    names = {"contains_key": "key", "contains": "reference", "embedding": "similarity", "judge": "judge"}
    scores = {m: example_score(example, model, m) for m in CORRECTNESS if m in info}
    parts = [f"{names[m]} {format_example_score(v)}" for m, v in scores.items()]
    clash = disagreement(scores)
    return " · ".join(parts + ([f"⚠ {clash}"] if clash else []))


def disagreement(scores: dict[str, float | None]) -> str:
    """Why the figures of one answer disagree, or "" when they agree."""
    key, whole, similarity, judge = (scores.get(m) for m in ("contains_key", "contains", "embedding", "judge"))
    verdict = key if key is not None else whole
    if key and not whole:
        return "right key, reworded reference"
    if verdict is not None and judge is not None and bool(verdict) != bool(judge):
        return f"the judge says {'right' if judge else 'wrong'}"
    if similarity is not None and verdict is not None:
        if verdict and similarity < DISSIMILAR:
            return "right by the text, far by meaning"
        if not verdict and similarity >= SIMILAR:
            return "close by meaning, wrong by the text"
    return ""


# --------------------------------------------------------------------------- wins and regressions

def tie_break_metric(evaluation: dict) -> str | None:
    """ROUGE-L when examples carry it, else the first other per-example metric with a good direction."""
    primary, info = evaluation["primary_metric"], evaluation.get("metric_info", {})
    candidates = [m for m in per_example_metrics(evaluation)
                  if m != primary and info.get(m, {}).get("higher_is_better") is not None]
    if PREFERRED_TIE_BREAK in candidates:
        return PREFERRED_TIE_BREAK
    return candidates[0] if candidates else None


def example_change(example: dict, metric: str | None, model: str, base: str) -> float | None:
    """Per-example score of `model` minus that of `base` (None if either is missing)."""
    if metric is None:
        return None
    after, before = example_score(example, model, metric), example_score(example, base, metric)
    return None if after is None or before is None else after - before


def wins_and_regressions(evaluation: dict, top: int = TOP_EXAMPLES) -> tuple[list[dict], list[dict]]:
    """Largest per-example changes of the primary metric, first tuned model against the base.

    Each item: {"index", "example", "change", "tie_change"}, changes being tuned − base. A win is a
    change in the metric's good direction (a drop, for a lower-is-better metric). Equal changes are
    ordered by the tie-break metric's change (best first for wins, worst first for regressions), then
    by question order so that the result is deterministic.
    """
    tuned = tuned_models(evaluation)
    if not tuned:
        return [], []
    base, model, info = evaluation["models"][0], tuned[0], evaluation.get("metric_info", {})
    primary, secondary = evaluation["primary_metric"], tie_break_metric(evaluation)
    # Orientation makes "positive = better" so one sort serves both directions of metric.
    sign = -1.0 if info.get(primary, {}).get("higher_is_better") is False else 1.0
    tie_sign = -1.0 if info.get(secondary, {}).get("higher_is_better") is False else 1.0
    rows = []
    for index, example in enumerate(evaluation.get("examples", [])):
        change = example_change(example, primary, model, base)
        if change is None or change == 0:
            continue
        tie_change = example_change(example, secondary, model, base)
        rows.append({"index": index, "example": example, "change": change, "tie_change": tie_change,
                     "gain": sign * change, "tie_gain": tie_sign * (tie_change or 0.0)})
    wins = sorted((r for r in rows if r["gain"] > 0), key=lambda r: (-r["gain"], -r["tie_gain"], r["index"]))
    regressions = sorted((r for r in rows if r["gain"] < 0), key=lambda r: (r["gain"], r["tie_gain"], r["index"]))
    return wins[:top], regressions[:top]


def comparison_note(evaluation: dict) -> str:
    """What the wins and regressions compare, in words (plain text, escaped by the renderer)."""
    tuned, secondary = tuned_models(evaluation), tie_break_metric(evaluation)
    if not tuned:
        return "There is no tuned model to compare with the base."
    note = (f"{tuned[0]} against {evaluation['models'][0]}, by the change in "
            f"{metric_label(evaluation, evaluation['primary_metric'])}")
    return note + (f", ties broken by {metric_label(evaluation, secondary)}." if secondary else ".")


# --------------------------------------------------------------------------- the report's own formats

def format_example_score(value: Any) -> str:
    """Per-example scores and tallies: whole numbers as such (0/1 for yes/no metrics), others with 3 decimals."""
    number = as_number(value)
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


def judge_tables(judge: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) per judge mode present, cells already formatted (not yet escaped)."""
    tables = []
    absolute = judge.get("absolute") or {}
    if absolute:
        tables.append(("Absolute: the judge marks each answer right or wrong",
                       ["model", "accuracy", "answers", "unparseable", "failed"],
                       [[model, format_value(r.get("accuracy"), "rate"),
                         *(format_example_score(r.get(k)) for k in ("judged", "unparseable", "failed"))]
                        for model, r in absolute.items()]))
    pairwise = judge.get("pairwise") or {}
    if pairwise:
        tables.append(("Pairwise: the judge picks the better answer, tuned against base",
                       ["model", "win rate", "wins", "losses", "ties", "unparseable", "failed"],
                       [[model, format_value(r.get("win_rate"), "rate"),
                         *(format_example_score(r.get(k)) for k in ("wins", "losses", "ties", "unparseable", "failed"))]
                        for model, r in pairwise.items()]))
    return tables


# --------------------------------------------------------------------------- answers the judge left unjudged

def unjudged_of(summary: dict) -> tuple[int, list[dict]]:
    """(count, [{"reason", "count"}, ...]) of one judge summary. A metrics.json written before reasons were
    recorded still has its failed and unparseable counts, which say as much."""
    if "unjudged" in summary:
        return int(summary.get("unjudged") or 0), list(summary.get("reasons") or [])
    counts = {"request failed": int(summary.get("failed") or 0),
              "no verdict in the judge's reply": int(summary.get("unparseable") or 0)}
    return sum(counts.values()), [{"reason": k, "count": n} for k, n in counts.items() if n]


def describe_reasons(count: int, reasons: list[dict]) -> str:
    """'REASON' when one reason covers all, else 'REASON (n); OTHER (m); k for other reasons'."""
    if not reasons:
        return "reason not recorded"
    parts = [r["reason"] if r["count"] == count else f"{r['reason']} ({r['count']})" for r in reasons]
    rest = count - sum(r["count"] for r in reasons)
    return "; ".join(parts + ([f"{rest} for other reasons"] if rest > 0 else []))


def unjudged_notes(judge: dict | None) -> list[str]:
    """One line per judged model with answers left without a verdict, e.g.
    "2 of 5 tuned answers unjudged: HTTP 500 ..." (plain text, escaped by the renderer)."""
    notes = []
    for mode, what in (("absolute", "{} answers"), ("pairwise", "{} vs base answer pairs")):
        for model, summary in ((judge or {}).get(mode) or {}).items():
            count, reasons = unjudged_of(summary)
            if count:
                total = format_example_score(summary.get("judged"))
                notes.append(f"{count} of {total} {what.format(model)} unjudged: {describe_reasons(count, reasons)}")
    return notes
