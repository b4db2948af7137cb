"""Before/after evaluation: the base model and every tuned model answer the same held-out questions.

All models see prompts rendered by the run's saved template and decode with the same settings;
they differ only by the adapter. Every score is computed here, per question, and aggregated with a
bootstrap interval. The run folder gets `summary.json`, `metrics.json`, `answers.csv`, `report.md`,
a self-contained `report.html` and plots; an earlier evaluation is moved to `evaluations/N/`.

Answers the LLM judge could not judge (failed requests, unreadable replies) are counted, with their
reasons, in metrics.json and the reports; `require_judged` then turns them into exit code 3.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from affiner.core.card import write_run_card
from affiner.core.config import JudgeConfig
from affiner.core.errors import AffinerError, Incomplete
from affiner.core.files import write_json
from affiner.core.formatting import JUDGE_INFO, METRIC_INFO
from affiner.core.runfolder import RUN_FILE, SUMMARY_FILE, RunFolder
from affiner.core.settings import GREEDY, Settings
from affiner.core.templates import Example
from affiner.core.tracking import log_evaluation
from affiner.evaluation import metrics
from affiner.evaluation.generation import generate
from affiner.evaluation.judge import Judge, judge_answers, judge_settings
from affiner.evaluation.plan import Plan, plan_runs
from affiner.evaluation.report import REPORT_FILES, write_report
from affiner.evaluation.report_content import unjudged_of
from affiner.evaluation.scoring import headline, held_out_losses, score_answers

TEXT_METRICS = ("contains", "exact_match", "rouge_l", "bleu", "chrf", "embedding", "stopped", "new_turn",
                "tokens", "repetition", "empty", "echo")


def evaluate(folders: Path | list[Path] | None = None, test: str | None = None, max_new_tokens: int | None = None,
             max_questions: int | None = None, batch_size: int | None = None, sampling: Settings = GREEDY,
             judge: JudgeConfig | None = None, plan: Plan | None = None) -> dict:
    """Evaluate the runs in `folders` (or a prepared `plan`) and write the report next to the first run."""
    if plan is None:
        plan = plan_runs(folders if isinstance(folders, list) else [folders], test, max_questions)
    judge = judge or plan.judge
    judge_client = Judge(judge_settings(judge)) if judge else None  # fail on a bad judge setting before hours of generation
    if not plan.examples:
        raise AffinerError(f"no held-out question to answer ({plan.test}).")
    limit = max_new_tokens or plan.max_new_tokens
    size = batch_size or plan.batch_size
    examples, tokenizer, template = plan.examples, plan.tokenizer, plan.template
    answers, losses, seconds = {}, {}, {}
    for name, load in plan.loaders.items():
        model = load()
        started = time.time()
        answers[name] = generate(model, tokenizer, template, examples, limit, size, sampling, desc=f"{name} answers")
        seconds[name] = round(time.time() - started, 1)
        losses[name] = held_out_losses(model, tokenizer, template, examples, size)
        del model
    scores = {name: score_answers(examples, answers[name]) for name in answers}
    verdicts = judge_answers(judge_client, judge, examples, answers, scores) if judge_client else None
    evaluation = build_evaluation(plan.output.name, examples, answers, scores, losses, verdicts, {
        "decoding": sampling.describe(), "max_new_tokens": limit, "template": template.name, "test": plan.test,
        "questions": len(examples),
        "generation time": ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())})
    summary = {"run": str(plan.output), **evaluation["settings"], "generation_seconds": seconds,
               **{name: headline(scores[name]) for name in answers},
               "answers": [{"question": e.instruction, "input": e.input, "reference": e.expected,
                            **{name: answers[name][i].__dict__ | {"correct": bool(scores[name][i]["contains"])}
                               for name in answers}} for i, e in enumerate(examples)]}
    plan.output.mkdir(parents=True, exist_ok=True)
    with RunFolder(plan.output).writing("evaluate"):  # two evaluations of one run never interleave their files
        _archive_previous(plan.output)
        write_json(plan.output / SUMMARY_FILE, summary)
        write_report(plan.output, evaluation)
        _track(plan.output, evaluation)
        write_run_card(plan.output)  # the run's README.md gains its evaluation (model-index)
    return evaluation


def require_judged(evaluation: dict, report: Path, rerun: str) -> None:
    """Raise Incomplete when the judge left answers without a verdict; call it once everything is written.

    `report` is the report to point to, `rerun` the command that evaluates again."""
    judge = evaluation.get("judge") or {}
    missing, asked, by_reason = [], 0, {}
    for mode, unit in (("absolute", "answers"), ("pairwise", "answer pairs")):
        for model, summary in (judge.get(mode) or {}).items():
            count, reasons = unjudged_of(summary)
            asked += int(summary.get("judged") or 0)
            if count:
                missing.append((f"{mode} {model}: {count} of {summary.get('judged')} {unit}", count))
            for reason in reasons:
                by_reason[reason["reason"]] = by_reason.get(reason["reason"], 0) + reason["count"]
    if not missing:
        return
    total = sum(count for _, count in missing)
    main = max(by_reason, key=lambda r: by_reason[r]) if by_reason else "reason not recorded"
    raise Incomplete(
        f"the LLM judge could not judge {total} of {asked} ({'; '.join(text for text, _ in missing)}), "
        f"{by_reason.get(main, total)} of them because: {main}. Everything else is written; {report} says how "
        "many and why, and the judge's scores there are over the judged answers only. Fix the judge endpoint "
        f"(eval.judge, or the --judge-* flags) and run `{rerun}` again: verdicts already given come from the "
        "judge's cache, so only the missing ones are asked again.")


def _track(folder: Path, evaluation: dict) -> None:
    """A run tracked in MLflow gets its evaluation there too: headline numbers and the report."""
    if not (folder / RUN_FILE).is_file():
        return
    run = RunFolder(folder)
    scores = {f"{model}_{metric}": value["mean"] for metric, by_model in evaluation["metrics"].items()
              for model, value in by_model.items() if value.get("mean") is not None}
    log_evaluation(folder, run.config(), run.info(), scores)


def build_evaluation(title: str, examples: list[Example], answers: dict, scores: dict, losses: dict,
                     verdicts: dict | None, settings: dict) -> dict:
    """The evaluation as the report reads it: aggregates with intervals, and every answer with its scores."""
    models = list(answers)
    info = {k: METRIC_INFO[k] for k in TEXT_METRICS}
    aggregates = {k: {m: metrics.aggregate([s[k] for s in scores[m]]) for m in models} for k in TEXT_METRICS}
    if all(losses[m][0] for m in models):
        per_model = {m: metrics.aggregate_loss(*losses[m]) for m in models}
        for key in ("loss", "perplexity"):
            info[key] = METRIC_INFO[key]
            aggregates[key] = {m: per_model[m][key] for m in models}
    if verdicts:
        info["judge"] = JUDGE_INFO
        aggregates["judge"] = {m: metrics.aggregate([s["judge"] for s in scores[m] if "judge" in s]) for m in models}
    return {
        "title": title, "models": models, "primary_metric": "contains", "settings": settings,
        "metric_info": info, "metrics": aggregates, "judge": verdicts,
        "examples": [{"question": e.instruction, "input": e.input, "reference": e.expected,
                      "answers": {m: {**answers[m][i].__dict__, "scores": scores[m][i]} for m in models}}
                     for i, e in enumerate(examples)],
    }


def _archive_previous(folder: Path) -> None:
    """Move an earlier evaluation to evaluations/N/ so that a new one never overwrites it."""
    existing = [folder / name for name in (SUMMARY_FILE, *REPORT_FILES) if (folder / name).exists()]
    if not existing:
        return
    n = 1
    while (folder / "evaluations" / str(n)).exists():
        n += 1
    target = folder / "evaluations" / str(n)
    target.mkdir(parents=True)
    for path in existing:
        shutil.move(str(path), target / path.name)
