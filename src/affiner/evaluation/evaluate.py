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
from collections import Counter
from dataclasses import dataclass, field
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
from affiner.evaluation.benchmarks import Benchmarks, check_benchmarks, run_benchmarks
from affiner.evaluation.general import general_examples, no_harm
from affiner.evaluation.generation import generate
from affiner.evaluation.judge import Judge, judge_answers, judge_settings
from affiner.evaluation.plan import Plan, plan_runs
from affiner.evaluation.report import REPORT_FILES, write_report
from affiner.evaluation.report_content import unjudged_of
from affiner.evaluation.scoring import headline, held_out_losses, over_context, score_answers

TEXT_METRICS = ("contains", "exact_match", "rouge_l", "bleu", "chrf", "embedding", "stopped", "new_turn",
                "tokens", "repetition", "empty", "echo")


@dataclass
class Answered:
    """What every model gave: answers, held-out losses and generation seconds by model; the same on the general set."""

    answers: dict = field(default_factory=dict)
    losses: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    general: dict = field(default_factory=dict)  # model -> (answers, losses) on the general set
    past_context: int = 0  # references running past the model's context (scored on the part that fits)


def evaluate(folders: Path | list[Path] | None = None, test: str | None = None, max_new_tokens: int | None = None,
             max_questions: int | None = None, batch_size: int | None = None, sampling: Settings = GREEDY,
             judge: JudgeConfig | None = None, plan: Plan | None = None, benchmarks: Benchmarks | None = None) -> dict:
    """Evaluate the runs in `folders` (or a prepared `plan`) and write the report next to the first run."""
    if plan is None:
        plan = plan_runs(folders if isinstance(folders, list) else [folders], test, max_questions)
    judge = judge or plan.judge
    # Fail on a bad judge setting or benchmark task before hours of generation.
    judge_client = Judge(judge_settings(judge)) if judge else None
    tasks = check_benchmarks(benchmarks.tasks, benchmarks.include) if benchmarks else None
    if not plan.examples:
        raise AffinerError(f"no held-out question to answer ({plan.test}).")
    limit, size = max_new_tokens or plan.max_new_tokens, batch_size or plan.batch_size
    examples, template, general = plan.examples, plan.template, general_examples() if plan.general else []
    done = answer_all(plan, general, limit, size, sampling)
    answers = done.answers
    scores = {name: score_answers(examples, answers[name]) for name in answers}
    verdicts = judge_answers(judge_client, judge, examples, answers, scores) if judge_client else None
    evaluation = build_evaluation(plan.output.name, examples, answers, scores, done.losses, verdicts, {
        "decoding": sampling.describe(), "max_new_tokens": limit, "template": template.name, "test": plan.test,
        "questions": len(examples), **_left_out(plan.dropped, done.past_context),
        "generation time": ", ".join(f"{name} {value:.0f} s" for name, value in done.seconds.items())})
    if plan.dropped and plan.dropped.get("count"):
        evaluation["not_evaluated"] = plan.dropped
    if general:
        evaluation["general"] = no_harm(general, {n: a for n, (a, _) in done.general.items()},
                                        {n: score_answers(general, a) for n, (a, _) in done.general.items()},
                                        {n: loss for n, (_, loss) in done.general.items()})
    if tasks:  # last: lm-eval resets the random seeds
        evaluation["benchmarks"] = run_benchmarks(plan.loaders, plan.tokenizer, tasks, benchmarks.include,
                                                  benchmarks.limit, size)
    _write(plan.output, evaluation, _summary(plan, evaluation, done, scores))
    return evaluation


def answer_all(plan: Plan, general: list[Example], limit: int, size: int, sampling: Settings) -> Answered:
    """Each model in turn, loaded once: its answers and held-out losses, on the task and the general set."""
    done, tokenizer, template, examples = Answered(), plan.tokenizer, plan.template, plan.examples
    for name, load in plan.loaders.items():
        model = load()
        if name == next(iter(plan.loaders)):
            done.past_context = over_context(model, tokenizer, template, examples)
        started = time.time()
        done.answers[name] = generate(model, tokenizer, template, examples, limit, size, sampling,
                                      desc=f"{name} answers")
        done.seconds[name] = round(time.time() - started, 1)
        done.losses[name] = held_out_losses(model, tokenizer, template, examples, size)
        if general:  # the no-harm check: the same model, settings and template on everyday questions
            done.general[name] = (generate(model, tokenizer, template, general, limit, size, sampling,
                                           desc=f"{name} general"),
                                  held_out_losses(model, tokenizer, template, general, size))
        del model
    return done


def _summary(plan: Plan, evaluation: dict, done: Answered, scores: dict) -> dict:
    answers = done.answers
    return {"run": str(plan.output), **evaluation["settings"], "generation_seconds": done.seconds,
            **{name: headline(scores[name]) for name in answers},
            **({"general": {m: c["verdict"] for m, c in evaluation["general"]["changes"].items()}}
               if evaluation.get("general") else {}),
            "answers": [{"question": e.instruction, "input": e.input, "reference": e.expected,
                         **{name: answers[name][i].__dict__ | {"correct": bool(scores[name][i]["contains"])}
                            for name in answers}} for i, e in enumerate(plan.examples)]}


def _write(folder: Path, evaluation: dict, summary: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with RunFolder(folder).writing("evaluate"):  # two evaluations of one run never interleave their files
        _archive_previous(folder)
        write_json(folder / SUMMARY_FILE, summary)
        write_report(folder, evaluation)
        _track(folder, evaluation)
        write_run_card(folder)  # the run's README.md gains its evaluation (model-index)


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


def _left_out(dropped: dict | None, past_context: int | None) -> dict:
    """What the settings line says of held-out rows not evaluated, and of references scored in part."""
    said = {}
    if dropped and dropped.get("count"):
        reasons = Counter(row["reason"] for row in dropped["rows"])
        said["held-out rows not evaluated"] = f"{dropped['count']} ({'; '.join(f'{n} {r}' for r, n in reasons.items())})"
    if past_context:
        said["references past the context (loss on the part that fits)"] = past_context
    return said


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
