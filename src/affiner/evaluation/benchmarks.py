"""Standard benchmarks (ARC, HellaSwag, MMLU, a user's own YAML tasks) through EleutherAI's lm-evaluation-harness,
paired: the base model and each tuned model answer the same items with the same settings, and each score comes
with lm-eval's standard error and the tuned - base difference with a 95 % interval.

lm-eval is an optional extra (`pip install 'affiner[benchmarks]'`); every check that needs no model (lm-eval
installed, task names known, their datasets loadable) runs before any model is loaded.
"""

from __future__ import annotations

import copy
import difflib
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from affiner.core.errors import AffinerError, first_line
from affiner.core.formatting import MISSING, format_delta, format_interval, format_value

INSTALL_HINT = "pip install 'affiner[benchmarks]'"
Z_95 = 1.959963984540054  # the two-sided 95 % quantile of the normal distribution
NO_FILTER = "none"  # lm-eval's name for a metric computed on the raw answers, without a filter


@dataclass
class Harness:
    """lm-eval's entry points, imported once it is known to be installed, and the task index to use."""

    version: str
    task_manager: Any
    model_class: Any  # lm_eval.models.huggingface.HFLM
    simple_evaluate: Callable[..., dict]


@dataclass(frozen=True)
class Benchmarks:
    """What `affiner evaluate --benchmarks` asks: lm-eval task names, a folder of the user's own task YAML files,
    and at most `limit` items per task."""

    tasks: list[str]
    include: Path | None = None
    limit: int | None = None


def run_benchmarks(models: Mapping[str, Any], tokenizer, tasks: list[str], include: Path | None,
                   limit: int | None, batch_size: int) -> dict:
    """Run lm-eval `tasks` on every model of `models` (name -> model, or a function loading it: base first)
    and pair the scores: per task, per metric, each model's value and standard error, and each tuned model's
    difference from the base with a 95 % interval. Tasks are checked before any model is loaded."""
    import torch  # here, so that the report can import benchmarks_tables without torch

    harness, tasks = checked(tasks, include)
    raw = {}
    for name, model in models.items():
        loaded = model if isinstance(model, torch.nn.Module) else model()
        # lm-eval sets a pad token on the tokenizer it is given: a copy keeps the caller's prompts unchanged.
        wrapped = harness.model_class(pretrained=loaded, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        raw[name] = harness.simple_evaluate(model=wrapped, tasks=tasks, limit=limit, log_samples=False,
                                            task_manager=harness.task_manager)
        del loaded, wrapped
    return paired_results(raw, harness.version, limit)


def check_benchmarks(tasks: list[str], include: Path | None) -> list[str]:
    """Everything about --benchmarks that needs no model: lm-eval installed, every task known, every task's
    dataset loadable. Call it before hours of generation; returns the task names, stripped and deduplicated."""
    return checked(tasks, include)[1]


def checked(tasks: list[str], include: Path | None) -> tuple[Harness, list[str]]:
    harness = load_harness(include)
    if include is not None:
        check_task_files(include)
    names = check_tasks(harness, tasks)
    check_datasets(harness, names)
    return harness, names


def load_harness(include: Path | None) -> Harness:
    """lm-eval's API, or the error that says how to install it; `include` adds a folder of the user's YAML tasks."""
    try:
        import lm_eval
        from lm_eval.evaluator import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise AffinerError(
            f"--benchmarks needs EleutherAI's lm-evaluation-harness, which is not installed ({first_line(exc)}). "
            f"Install the optional extra with `{INSTALL_HINT}` (lm_eval 0.4.13 or later 0.4 releases), then run "
            "the same command again.") from None
    if include is not None and not Path(include).is_dir():
        raise AffinerError(f"--benchmarks-include {include} is not a folder: give the folder that holds your "
                           "lm-eval task YAML files.")
    return Harness(version=getattr(lm_eval, "__version__", "unknown"),
                   task_manager=task_index(str(Path(include).resolve()) if include is not None else None),
                   model_class=HFLM, simple_evaluate=simple_evaluate)


@functools.cache
def task_index(include: str | None):
    """lm-eval's index of its task YAML files and of the `include` folder: built once per process (seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include)


class _TaskFileLoader(yaml.SafeLoader):
    """YAML as lm-eval's task files write it: `!function module.name` tags are read as text, not refused."""


_TaskFileLoader.add_multi_constructor("!", lambda loader, tag, node: None)


def check_task_files(include: Path) -> None:
    """Every task file of --benchmarks-include parses: lm-eval skips one that does not without a word, and its task
    was then reported unknown, with other tasks' names as suggestions."""
    for path in sorted(Path(include).rglob("*.yaml")):
        try:
            yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskFileLoader)  # noqa: S506 (a safe loader)
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise AffinerError(f"--benchmarks-include: the task file {path} does not parse as YAML "
                               f"({first_line(exc)}); fix it, then run the same command again.") from None


def check_tasks(harness: Harness, tasks: list[str]) -> list[str]:
    """The task names, each known to lm-eval (its own tasks, groups and tags, and those of --benchmarks-include)."""
    names = [name.strip() for item in tasks for name in item.split(",") if name.strip()]
    if not names:
        raise AffinerError("--benchmarks names no task: give lm-eval task names separated by commas, e.g. "
                           "--benchmarks arc_easy,hellaswag.")
    known = harness.task_manager.all_tasks
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
            hint = f"Did you mean {', '.join(close)}? " if close else ""
            raise AffinerError(
                f"--benchmarks: lm-eval has no task called '{name}'. {hint}`lm-eval ls tasks` lists the "
                f"{len(known)} tasks, groups and tags it knows; a task of your own is a YAML file in the folder "
                "given with --benchmarks-include DIR.")
    return list(dict.fromkeys(names))


def check_datasets(harness: Harness, tasks: list[str]) -> None:
    """Load each task's dataset now, so that an unreachable Hub or a broken task file is reported before any
    model is loaded (lm-eval downloads a task's dataset from the Hugging Face Hub the first time)."""
    import datasets

    from affiner.core.hub import hub_reachable

    reachable = hub_reachable()
    if not reachable:
        datasets.config.HF_HUB_OFFLINE = True  # read the local cache instead of retrying for a minute
    for name in tasks:
        try:
            harness.task_manager.load([name])  # builds the task, which loads its dataset
        except Exception as exc:  # datasets and lm-eval wrap network, missing-file and YAML failures in many types
            raise AffinerError(f"--benchmarks: cannot load the dataset of task '{name}': {_why(exc, reachable)}. "
                               f"({type(exc).__name__}: {first_line(exc)})") from None


def _why(error: Exception, reachable: bool) -> str:
    """What most likely stopped a task's dataset from loading, from the error itself: a file, the task, the Hub."""
    import jinja2

    if isinstance(error, FileNotFoundError) or type(error).__name__ == "DataFilesNotFoundError":
        return ("a data file it names is not there; a relative data_files path is read from the folder affiner runs "
                "in, not the task's: give an absolute path, or run from the folder the path is relative to")
    if isinstance(error, jinja2.TemplateError):
        return "its prompt template (doc_to_text, doc_to_target or doc_to_choice) is broken"
    if not reachable:
        return ("the Hugging Face Hub is unreachable from this machine and the dataset is not in the local cache; "
                "run it once with the network, or use a local task (--benchmarks-include DIR)")
    return "check the task's dataset_path and data files, and the network"


def paired_results(raw: dict[str, dict], version: str, limit: int | None) -> dict:
    """lm-eval's results of each model as one JSON-able dict: per task, per metric, every model's value and
    standard error, and every tuned model's difference from the first model (the base)."""
    models = list(raw)
    base = raw[models[0]]
    tasks = {}
    for task, scores in base["results"].items():
        tasks[task] = {
            "version": _plain(base.get("versions", {}).get(task)),
            "items": (base.get("n-samples", {}).get(task) or {}).get("effective", scores.get("sample_len")),
            "shots": base.get("n-shot", {}).get(task),
            "metrics": {label: paired_metric({m: raw[m]["results"][task] for m in models}, key,
                                             base.get("higher_is_better", {}).get(task, {}).get(key.split(",")[0]))
                        for label, key in metric_keys(scores).items()},
        }
    return {"lm_eval_version": version, "models": models, "baseline": models[0], "limit": limit, "tasks": tasks}


def benchmarks_of(results: dict, names: dict[str, str]) -> dict:
    """paired_results' output for the models in `names` only, under their names there (a run's own evaluation
    out of several runs evaluated together)."""
    def keep(by_model: dict) -> dict:
        return {names[m]: value for m, value in by_model.items() if m in names}

    tasks = {task: {**info, "metrics": {label: {**metric, "models": keep(metric["models"]),
                                                   "differences": keep(metric["differences"])}
                                        for label, metric in info["metrics"].items()}}
             for task, info in results["tasks"].items()}
    return {**results, "models": [names[m] for m in results["models"] if m in names],
            "baseline": names.get(results["baseline"], results["baseline"]), "tasks": tasks}


def metric_keys(scores: dict) -> dict[str, str]:
    """lm-eval's 'metric,filter' result keys, labelled 'metric' (no filter) or 'metric (filter)'."""
    keys = {}
    for key, value in scores.items():
        if "," not in key or "_stderr," in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metric, filter_name = key.split(",", 1)
        keys[metric if filter_name == NO_FILTER else f"{metric} ({filter_name})"] = key
    return keys


def paired_metric(by_model: dict[str, dict], key: str, higher_is_better: bool | None) -> dict:
    metric, filter_name = key.split(",", 1)
    stderr_key = f"{metric}_stderr,{filter_name}"
    values = {m: {"value": _number(s.get(key)), "stderr": _number(s.get(stderr_key))} for m, s in by_model.items()}
    base_name, *tuned = list(values)
    return {"higher_is_better": higher_is_better, "models": values,
            "differences": {m: difference(values[base_name], values[m]) for m in tuned}}


def difference(base: dict, tuned: dict) -> dict:
    """tuned - base with a 95 % normal interval. The two standard errors are combined as if the scores were
    independent: both models answer the same items, whose positive correlation would shrink the error of the
    difference, so this interval is conservative (wider than a paired one); lm-eval gives no per-item pairing."""
    if base["value"] is None or tuned["value"] is None:
        return {"value": None, "low": None, "high": None}
    change = tuned["value"] - base["value"]
    if base["stderr"] is None or tuned["stderr"] is None:
        return {"value": change, "low": None, "high": None}
    half = Z_95 * math.hypot(base["stderr"], tuned["stderr"])
    return {"value": change, "low": change - half, "high": change + half}


def verdict(change: dict, higher_is_better: bool | None) -> str:
    """'better' or 'worse' when the interval excludes 0, 'no measurable change' when it holds 0."""
    if change["low"] is None or change["high"] is None:
        return "no interval"
    if change["low"] <= 0 <= change["high"]:
        return "no measurable change"
    if higher_is_better is None:
        return "higher" if change["low"] > 0 else "lower"
    return "better" if (change["low"] > 0) == higher_is_better else "worse"


BENCHMARKS_NOTE = ("The interval treats the two standard errors as independent, which is conservative for two "
                   "models answering the same items: a difference whose interval holds 0 is no measurable change.")


def benchmarks_tables(result: dict) -> tuple[list[str], list[tuple[str, list[str], list[list[str]]]]]:
    """The benchmarks for a report: the lines above the table (versions, limit, what the interval means), and one
    (title, header, rows) table, a row per task and metric: each model's value +- standard error, each tuned
    model's difference from the base with its 95 % interval and a verdict."""
    models, base = result["models"], result["baseline"]
    tuned = [m for m in models if m != base]
    header = ["task", "items", "metric"] + [f"{m} ± stderr" for m in models]
    for m in tuned:
        header += [f"{m} − {base} [95 % interval]", f"{m}: verdict"]
    rows = []
    for task, entry in result["tasks"].items():
        for label, metric in entry["metrics"].items():
            row = [task, _text(entry.get("items")), label] + [_value_and_error(metric["models"][m]) for m in models]
            for m in tuned:
                change = metric["differences"][m]
                row += [_change_text(change), verdict(change, metric.get("higher_is_better"))]
            rows.append(row)
    limit = f", at most {result['limit']} items per task (--benchmarks-limit)" if result.get("limit") else ""
    versions = ", ".join(f"{task} v{_text(entry.get('version'))} ({_text(entry.get('shots'))}-shot)"
                         for task, entry in result["tasks"].items())
    return [f"lm-eval {result['lm_eval_version']}{limit}; tasks: {versions}.", BENCHMARKS_NOTE], \
        [("Paired scores", header, rows)]


def _value_and_error(score: dict) -> str:
    value = format_value(score["value"], "score")
    return value if score["stderr"] is None or value == MISSING else f"{value} ± {format_value(score['stderr'], 'score')}"


def _change_text(change: dict) -> str:
    interval = format_interval(change["low"], change["high"], "score")
    return f"{format_delta(change['value'], 'score')} {interval}".strip()


def _number(value: Any) -> float | None:
    """A finite float, or None for lm-eval's 'N/A' (no standard error) and NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _plain(value: Any) -> Any:
    """A task version as JSON holds it (lm-eval gives floats, strings or None)."""
    return value if value is None or isinstance(value, (int, float, str)) else str(value)


def _text(value: Any) -> str:
    return MISSING if value is None else str(value)
