"""Before/after evaluation: the base model and every tuned model answer the same held-out questions.

All models see prompts rendered by the run's saved template and decode with the same settings;
they differ only by the adapter. Every score is computed here, per question, and aggregated with a
bootstrap interval. The run folder gets `summary.json`, `metrics.json`, `answers.csv`, `report.md`,
a self-contained `report.html` and plots; an earlier evaluation is moved to `evaluations/N/`. Several runs
evaluated together: each run folder gets its own evaluation, linked to the comparison in the first's `comparison/`.

Answers the LLM judge could not judge (failed requests, unreadable replies) are counted, with their
reasons, in metrics.json and the reports; `require_judged` then turns them into exit code 3.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from affiner.core.card import OVERLAP, write_run_card
from affiner.core.config import JudgeConfig
from affiner.core.errors import AffinerError, Incomplete
from affiner.core.files import json_text
from affiner.core.formatting import JUDGE_INFO, METRIC_INFO
from affiner.core.runfolder import RUN_FILE, SUMMARY_FILE, RunFolder
from affiner.core.settings import GREEDY, Settings
from affiner.core.templates import Example
from affiner.core.tracking import log_evaluation
from affiner.evaluation import base_cache, metrics
from affiner.evaluation.benchmarks import Benchmarks, benchmarks_of, check_benchmarks, run_benchmarks
from affiner.evaluation.general import answer_limit as general_limit, general_examples, no_harm
from affiner.evaluation.generation import generate
from affiner.evaluation.judge import Judge, judge_answers, judge_settings
from affiner.evaluation.plan import Plan, plan_runs
from affiner.evaluation.report import REPORT_FILES, REPORT_HTML, write_report
from affiner.evaluation.report_content import unjudged_of
from affiner.evaluation.scoring import (correct, has_answer, headline, held_out_losses, key_of, over_context,
                                        score_answers)

COMPARISON_FOLDER = "comparison"  # in the first run's folder: several runs side by side
REFERENCE_LENGTH = "reference length (tokens)"  # the settings' line, and the answer length's label
TEXT_METRICS = ("contains", "contains_key", "exact_match", "rouge_l", "bleu", "chrf", "embedding", "stopped", "new_turn",
                "tokens", "repetition", "empty", "echo")


@dataclass
class Answered:
    """What every model gave: answers, held-out losses and generation seconds by model; the same on the general set."""

    answers: dict = field(default_factory=dict)
    losses: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    general: dict = field(default_factory=dict)  # model -> (answers, losses) on the general set
    general_scores: dict = field(default_factory=dict)  # model -> scores of its answers on the general set
    benchmarks: dict | None = None  # lm-eval's results of every model, paired with the base
    base_from_cache: bool = False  # the base's answers and losses came from an earlier evaluation (base_cache)
    past_context: int = 0  # references running past the model's context (scored on the part that fits)


def judge_settings_over(recorded: JudgeConfig | None, given: dict) -> JudgeConfig | None:
    """The judge an evaluation asks: each key given (a --judge-* flag) over the run's own eval.judge, the others
    kept (its model, concurrency...); None when that leaves no endpoint."""
    if not given:
        return recorded
    judge = JudgeConfig.model_validate({**(recorded.model_dump() if recorded else {}), **given})
    return judge if judge.url else None


REPEATED = ("questions asked more than once (each copy counts as a question of its own: the intervals are "
            "narrower than the questions warrant)")


GROUPED = ("intervals resample whole groups (one group's questions, such as one acronym's paraphrases, rise or fall "
           "together)")


def resampled_groups(examples: list[Example]) -> int | None:
    """How many groups the intervals resample, when the test file groups some of its questions; else None."""
    units = len(metrics.group_members([e.group for e in examples], len(examples)))
    return units if units < len(examples) else None


def repeated_questions(examples: list[Example]) -> int:
    """How many held-out rows repeat an earlier row's question and input, word for word."""
    return len(examples) - len({(e.instruction.strip(), e.input.strip()) for e in examples})


def nothing_to_answer(plan: Plan) -> str:
    """Why an evaluation has no question: every row left out, with the reasons counted, and for rows without a
    reference where prompts without one can be compared."""
    reasons = (plan.dropped or {}).get("reasons") or {}
    text = f"no held-out question to answer ({plan.test})"
    if reasons:
        text += f": every row was left out ({'; '.join(f'{n} row(s): {why}' for why, n in reasons.items())})"
    if any("no answer or reference" in why for why in reasons):
        text += (". Each question needs a reference answer to be scored against; to compare base and tuned on "
                 "prompts of your own without one, use affiner app (side by side) or affiner chat --base / chat RUN "
                 "--prompt TEXT")
    return text + "."


def evaluate(folders: Path | list[Path] | None = None, test: str | None = None, max_new_tokens: int | None = None,
             max_questions: int | None = None, batch_size: int | None = None, sampling: Settings = GREEDY,
             judge: dict | None = None, plan: Plan | None = None, benchmarks: Benchmarks | None = None,
             keep_overlap: bool = False, key_before: str | None = None, general: bool | None = None,
             reuse_base: bool = True, repetition_penalty: float | None = None,
             headline: str | None = None) -> dict:
    """Evaluate the runs in `folders` (or a prepared `plan`) and write the report next to the first run;
    `keep_overlap`: score the --test questions the run trained on too; `key_before`, `general`, `headline`:
    eval.key_before's, eval.general's and eval.headline's values (None: the run's); `reuse_base`: the base's answers
    may come from an earlier evaluation with the same base weights, questions, template and decoding;
    `repetition_penalty`: replaces the run's eval.repetition_penalty in `sampling` (None: the run's); `judge`:
    eval.judge keys given for this evaluation (the --judge-* flags), each over the run's own."""
    if plan is None:
        plan = plan_runs(folders if isinstance(folders, list) else [folders], test, max_questions, keep_overlap,
                         key_before)
    judge = judge_settings_over(plan.judge, judge or {})
    sampling = replace(sampling, repetition_penalty=plan.repetition_penalty if repetition_penalty is None
                       else repetition_penalty)
    if general is not None:
        plan.general = general
    if headline is not None:
        plan.headline = headline
    plan.base_cache = plan.base_cache and reuse_base
    # Fail on a bad judge setting or benchmark task before hours of generation.
    judge_client = Judge(judge_settings(judge)) if judge else None
    tasks = check_benchmarks(benchmarks.tasks, benchmarks.include) if benchmarks else None
    if not plan.examples:
        raise AffinerError(nothing_to_answer(plan))
    if plan.headline == "contains_key" and not any(key_of(e, plan.key_before) for e in plan.examples):
        raise AffinerError(f"eval.headline is contains_key, but no question of {plan.test} has a key: give the rows a "
                           "`key` field, set eval.key_before (--key-before SEP), or choose another eval.headline.")
    limit, size = max_new_tokens or plan.max_new_tokens, batch_size or plan.batch_size
    examples, template, general = plan.examples, plan.template, general_examples() if plan.general else []
    done = answer_all(plan, general, limit, size, sampling)
    scores = {name: score_answers(examples, done.answers[name], plan.key_before) for name in done.answers}
    verdicts = judge_answers(judge_client, judge, examples, done.answers, scores) if judge_client else None
    done.general_scores = {n: score_answers(general, a) for n, (a, _) in done.general.items()}
    settings = {
        "decoding": sampling.describe(), "max_new_tokens": limit, "template": template.name, "test": plan.test,
        "questions": len(examples), REFERENCE_LENGTH: reference_length(plan.tokenizer, examples),
        **_left_out(plan.dropped, done.past_context),
        **({"questions without an answer to take the loss of (a reference only)": without}
           if (without := sum(not has_answer(e) for e in examples)) else {}),
        **({OVERLAP: plan.overlap} if plan.overlap else {}),
        **({REPEATED: repeated} if (repeated := repeated_questions(examples)) else {}),
        **({GROUPED: f"{units} group{'s' * (units > 1)} of the {len(examples)} questions"}
           if (units := resampled_groups(examples)) else {}),
        "generation time": ", ".join(f"{name} {value:.0f} s" for name, value in done.seconds.items())
                           + (f" (with the {len(general)} general questions)" if general else ""),
        **({"base answers and losses": "from an earlier evaluation with the same base weights, questions, template "
            "and decoding (--no-base-cache answers again)"} if done.base_from_cache else {})}
    if tasks:  # last: lm-eval resets the random seeds
        done.benchmarks = run_benchmarks(plan.loaders, plan.tokenizer, tasks, benchmarks.include, benchmarks.limit,
                                         size)
    return _write_all(plan, done, scores, verdicts, settings, general)


def _write_all(plan: Plan, done: Answered, scores: dict, verdicts: dict | None, settings: dict,
               general: list[Example]) -> dict:
    """One tuned model: its evaluation in its folder. Several runs: each run folder gets its own evaluation
    (base against that run, so that every later command sees it evaluated), linked to the side-by-side
    comparison written in the first run's comparison/ folder. Returns the evaluation printed (the comparison)."""
    models = list(done.answers)
    if len(models) == 2 or not plan.folders:
        evaluation = _assemble(plan, done, scores, verdicts, settings, general, models, plan.output.name)
        _write(plan.output, evaluation, _summary(plan.output, plan, evaluation, done, scores, models))
        return evaluation
    comparison = plan.output / COMPARISON_FOLDER
    for name, folder in plan.folders.items():
        others = ", ".join(m for m in plan.folders if m != name)
        own = {**settings, "compared with": f"{others}, side by side in {comparison / REPORT_HTML}"}
        evaluation = _assemble(plan, done, scores, verdicts, own, general, ["base", name], folder.name)
        _write(folder, evaluation, _summary(folder, plan, evaluation, done, scores, ["base", name]))
    evaluation = _assemble(plan, done, scores, verdicts, {
        **settings, "each run's own report": ", ".join(str(f / REPORT_HTML) for f in plan.folders.values())},
        general, models, f"{plan.output.name} and {len(models) - 2} other run(s)")
    _write(comparison, evaluation, _summary(comparison, plan, evaluation, done, scores, models))
    return evaluation


def _assemble(plan: Plan, done: Answered, scores: dict, verdicts: dict | None, settings: dict,
              general: list[Example], models: list[str], title: str) -> dict:
    """The evaluation of `models` (the base first); a run's own evaluation (base and one run) names its model
    "tuned", as a single run's does."""
    names = dict(zip(models, models)) if len(models) > 2 or not plan.folders else {"base": "base", models[1]: "tuned"}

    def pick(by_model: dict) -> dict:
        return {names[m]: by_model[m] for m in models}

    evaluation = build_evaluation(title, plan.examples, pick(done.answers), pick(scores), pick(done.losses),
                                  judged_by(verdicts, names), settings, plan.headline)
    if plan.dropped and plan.dropped.get("count"):
        evaluation["not_evaluated"] = plan.dropped
    if general:
        evaluation["general"] = no_harm(general, {names[m]: done.general[m][0] for m in models},
                                        pick(done.general_scores), {names[m]: done.general[m][1] for m in models})
    if done.benchmarks:
        evaluation["benchmarks"] = benchmarks_of(done.benchmarks, names)
    return evaluation


def judged_by(verdicts: dict | None, names: dict[str, str]) -> dict | None:
    """The judge's summaries of the models in `names`, under their names there."""
    if not verdicts:
        return verdicts
    return {**verdicts, **{mode: {names[m]: summary for m, summary in (verdicts.get(mode) or {}).items() if m in names}
                           for mode in ("absolute", "pairwise")}}


def answer_all(plan: Plan, general: list[Example], limit: int, size: int, sampling: Settings) -> Answered:
    """Each model in turn, loaded once: its answers and held-out losses, on the task and the general set. The
    base's come from an earlier evaluation with the same weights, questions, template and decoding when one
    left them (`base_cache`), unless `plan.base_cache` is off."""
    done, tokenizer, template, examples = Answered(), plan.tokenizer, plan.template, plan.examples
    for name, load in plan.loaders.items():
        model = load()
        key, kept = None, None
        if name == "base":
            done.past_context = over_context(model, tokenizer, template, examples)
            key = base_cache.cache_key(model, tokenizer, template, examples, general, limit, size, sampling)
            kept = base_cache.load(key, len(examples), len(general)) if plan.base_cache else None
        if kept is not None:  # the key holds the general set too: kept["general"] is there exactly when asked
            done.answers[name], done.losses[name], done.seconds[name] = kept["answers"], kept["losses"], 0.0
            if general:
                done.general[name] = kept["general"]
            done.base_from_cache = True
        else:
            _answer(done, name, model, plan, general, limit, size, sampling)
        if key is not None and not done.base_from_cache:
            base_cache.save(key, done.answers[name], done.losses[name], done.seconds[name], done.general.get(name))
        del model
    return done


def _answer(done: Answered, name: str, model, plan: Plan, general: list[Example], limit: int, size: int,
            sampling: Settings) -> None:
    tokenizer, template, examples = plan.tokenizer, plan.template, plan.examples
    started = time.time()
    # One queue for both sets: the general set's short answers fill the batch while the task's longest run on.
    limits = [limit] * len(examples) + [general_limit(limit)] * len(general)
    answers = generate(model, tokenizer, template, examples + general, limits, size, sampling,
                       desc=f"{name} answers" + (f" (+{len(general)} general)" if general else ""))
    done.seconds[name] = round(time.time() - started, 1)
    done.answers[name] = answers[:len(examples)]
    done.losses[name] = held_out_losses(model, tokenizer, template, examples, size)
    if general:  # the no-harm check: the same model, settings and template on everyday questions
        done.general[name] = (answers[len(examples):], held_out_losses(model, tokenizer, template, general, size))


def _summary(folder: Path, plan: Plan, evaluation: dict, done: Answered, scores: dict, models: list[str]) -> dict:
    names = evaluation["models"]  # the models' names in this evaluation, in the order of `models`
    answers = {name: done.answers[m] for name, m in zip(names, models)}
    scores = {name: scores[m] for name, m in zip(names, models)}
    return {"run": str(folder), **evaluation["settings"],
            "generation_seconds": {name: done.seconds[m] for name, m in zip(names, models)},
            **{name: headline(scores[name]) for name in answers},
            **({"general": {m: c["verdict"] for m, c in evaluation["general"]["changes"].items()}}
               if evaluation.get("general") else {}),
            "answers": [{"question": e.instruction, "input": e.input, "reference": e.expected,
                         **{name: answers[name][i].__dict__ | {"correct": bool(correct(scores[name][i]))}
                            for name in answers}} for i, e in enumerate(plan.examples)]}


def _write(folder: Path, evaluation: dict, summary: dict) -> None:
    evaluation["report"] = str(folder / REPORT_HTML)  # where the reader is sent
    folder.mkdir(parents=True, exist_ok=True)
    with RunFolder(folder).writing("evaluate"):  # two evaluations of one run never interleave their files
        _archive_previous(folder)
        # Written together: killed or failing (a full disk) before the end, the earlier evaluation stays the run's,
        # whole (its copy in evaluations/ aside).
        write_report(folder, evaluation, {SUMMARY_FILE: json_text(summary)})
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
                     verdicts: dict | None, settings: dict, headline: str = "auto") -> dict:
    """The evaluation as the report reads it: aggregates with intervals, and every answer with its scores; the
    headline (`primary_metric`) is eval.headline's figure, or by default whether answers contain the key (when
    rows have one) or the reference."""
    models = list(answers)
    measured = [k for k in TEXT_METRICS if all(k in s for m in models for s in scores[m])]
    info = {k: METRIC_INFO[k] for k in measured}
    if "tokens" in info and (reference := settings.get(REFERENCE_LENGTH)) is not None:  # what lengths to compare
        label = f"{info['tokens']['label'].removesuffix(')')}; references {reference:.1f})"  # "(tokens; refer..."
        info["tokens"] = {**info["tokens"], "label": label}
    groups = [e.group for e in examples]  # one acronym's paraphrases resampled together (metrics.bootstrap_interval)
    aggregates = {k: {m: metrics.aggregate([s[k] for s in scores[m]], groups) for m in models} for k in measured}
    if all(losses[m][0] for m in models):
        per_model = {m: metrics.aggregate_loss(*losses[m], groups) for m in models}
        for key in ("loss", "perplexity"):
            info[key] = METRIC_INFO[key]
            aggregates[key] = {m: per_model[m][key] for m in models}
    base, paired = models[0], {}
    for key in measured:  # each tuned model's change on the same questions, with a paired interval
        paired[key] = {m: metrics.aggregate([t[key] - b[key] for t, b in zip(scores[m], scores[base])], groups)
                       for m in models[1:]}
    if "loss" in aggregates:
        paired["loss"] = {m: metrics.paired_loss_change(losses[base], losses[m], groups=groups) for m in models[1:]}
        paired["perplexity"] = {m: metrics.paired_loss_change(losses[base], losses[m], True, groups)
                                for m in models[1:]}
    if verdicts:
        info["judge"] = JUDGE_INFO
        aggregates["judge"] = {m: metrics.aggregate(*_columns([(s["judge"], g) for s, g in zip(scores[m], groups)
                                                               if "judge" in s])) for m in models}
        # Paired over the questions both models got a verdict on: a verdict missing for one is no evidence either way.
        paired["judge"] = {m: metrics.aggregate(*_columns([(t["judge"] - b["judge"], g) for t, b, g in
                                                           zip(scores[m], scores[base], groups)
                                                           if "judge" in t and "judge" in b])) for m in models[1:]}
    return {
        "title": title, "models": models, "settings": settings,
        "primary_metric": headline if headline != "auto" else "contains_key" if "contains_key" in measured else "contains",
        "metric_info": info, "metrics": aggregates, "changes": paired, "judge": verdicts,
        "examples": [{"question": e.instruction, "input": e.input, "reference": e.expected,
                      "answers": {m: {**answers[m][i].__dict__, "scores": scores[m][i]} for m in models}}
                     for i, e in enumerate(examples)],
    }


def _columns(pairs: list[tuple[float, str]]) -> tuple[list[float], list[str]]:
    """(value, group) pairs as the values and their groups, which `metrics.aggregate` takes."""
    return [value for value, _ in pairs], [group for _, group in pairs]


def reference_length(tokenizer, examples: list[Example]) -> float:
    """The references' mean length in tokens, counted as answers are: an answer is as long as a reader expects
    when it is about as long as the reference."""
    lengths = [len(tokenizer(e.expected, add_special_tokens=False)["input_ids"]) for e in examples]
    return round(sum(lengths) / len(lengths), 1) if lengths else 0.0


def _left_out(dropped: dict | None, past_context: int | None) -> dict:
    """What the settings line says of held-out rows not evaluated, and of references scored in part."""
    said = {}
    if dropped and dropped.get("count"):
        reasons = dropped.get("reasons") or Counter(row["reason"] for row in dropped["rows"])  # runs of before
        said["held-out rows not evaluated"] = f"{dropped['count']} ({'; '.join(f'{n} {r}' for r, n in reasons.items())})"
    if past_context:
        said["references past the context (loss on the part that fits)"] = past_context
    return said


def _archive_previous(folder: Path) -> None:
    """Copy an earlier evaluation to evaluations/N/ (whole, or not at all) before a new one replaces it."""
    existing = [folder / name for name in (SUMMARY_FILE, *REPORT_FILES) if (folder / name).exists()]
    if not existing:
        return
    n = 1
    while (folder / "evaluations" / str(n)).exists():
        n += 1
    target = folder / "evaluations" / str(n)
    partial = target.with_name(f".{n}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a copy killed halfway
    partial.mkdir(parents=True)
    for path in existing:
        shutil.copy2(path, partial / path.name)
    partial.rename(target)
