"""A sweep: one run per point of a grid of config values, trained and evaluated like `affiner run`,
resumable after Ctrl-C, its state kept in the sweep folder's sweep.json after every step.

The grid is parsed in `grid`; the table and the plot the sweep ends with are drawn in `sweep_table`.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from affiner.core.config import RunConfig, resolve_config_path, validate_config
from affiner.core.yaml_input import apply_overrides, parse_yaml
from affiner.core.errors import AffinerError, Incomplete
from affiner.core.files import read_json, sole_writer, write_json
from affiner.core.runfolder import RUN_FILE, RunFolder
from affiner.evaluation.evaluate import evaluate, require_judged
from affiner.evaluation.report import REPORT_HTML
from affiner.experiments import workflow
from affiner.experiments.grid import (METRICS, Grid, describe_point, expand, get_value, parse_grid, parse_value,
                                      point_name, set_value)
from affiner.experiments.sweep_table import PLOT_FILE, TABLE_MD, point_summary, write_results
from affiner.training.run import check_before_writing
from affiner.training.stops import Interrupted
from affiner.training.processes import Processes

SWEEP_FILE = "sweep.json"
# What resuming a sweep reads of its plan (sweep.json) and of each point.
STATE_KEYS = {"config", "overrides", "grid", "metric", "status", "points"}
POINT_KEYS = {"index", "name", "overrides", "values", "config", "status", "run", "abandoned", "attempts", "metrics"}
RUNS = "runs"
# Points that do not fit in memory (a large batch size, say) fail alone; the sweep goes on with the others.
OUT_OF_MEMORY = (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))

# ---------------------------------------------------------------------------------------- planning

def build_points(raw: dict, label: str, grid: Grid, runs_dir: Path) -> list[dict]:
    """Each grid point with its validated config; the first bad point is an error naming the key and the point."""
    base_name = str(raw.get("name") or RunConfig.model_fields["name"].default)
    combos = expand(grid)
    names = [point_name(base_name, overrides) for overrides in combos]
    if len(set(names)) != len(names):
        names = [f"{name}-p{i}" for i, name in enumerate(names, 1)]
    points = []
    for index, (overrides, name) in enumerate(zip(combos, names), 1):
        point_raw = copy.deepcopy(raw)
        for key, text in overrides.items():
            set_value(point_raw, key, parse_value(text))
        point_raw["name"], point_raw["output_dir"] = name, str(runs_dir)
        where = f"grid point {index} of {len(combos)} ({describe_point(overrides)})"
        config = validate_config(point_raw, f"{label} at {where}")
        dumped = config.model_dump(mode="json")
        points.append({"index": index, "name": name, "overrides": overrides,
                       "values": {key: get_value(dumped, key) for key in overrides},
                       "config": dumped, "status": "pending", "run": None, "abandoned": [], "attempts": 0,
                       "metrics": None, "duration": 0.0, "error": None})
    for key, _ in grid:
        seen: dict[str, str] = {}
        for point in points:
            value = json.dumps(point["values"][key], sort_keys=True)
            text = point["overrides"][key]
            if seen.setdefault(value, text) != text:
                raise AffinerError(f"--grid {key}: {seen[value]} and {text} are the same value.")
    first = points[0]["config"]["train"]
    swept = {key for key, _ in grid}
    if "train.epochs" in swept and "train.max_steps" not in swept and first["max_steps"]:
        raise AffinerError(f"--grid train.epochs has no effect while train.max_steps={first['max_steps']} is set: "
                           "every point would train the same number of steps. Drop the max_steps setting, or "
                           "sweep train.max_steps instead.")
    return points


def check_metric(metric: str, points: list[dict]) -> None:
    """--metric names a metric the evaluation reports, and one every point will measure."""
    if metric not in METRICS:
        close = difflib.get_close_matches(metric, METRICS, n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise AffinerError(f"--metric {metric} is not a metric the evaluation reports.{hint} "
                           f"Choose one of: {', '.join(METRICS)}.")
    if metric == "judge":
        unjudged = [p["index"] for p in points if not p["config"]["eval"]["judge"]["url"]]
        if unjudged:
            raise AffinerError("--metric judge needs an LLM judge for every point: --set eval.judge.url=URL "
                               "--set eval.judge.model=NAME.")


def check_architectures(points: list[dict], label: str) -> None:
    """What `affiner train` checks before it writes a run (layer names, the context, the extras a point needs),
    for every point before the first trains: a bad point must not fail after hours of good ones."""
    for point in points:
        try:
            check_before_writing(validate_config(point["config"], label))
        except AffinerError as error:
            raise AffinerError(f"grid point {point['index']} of {len(points)} "
                               f"({describe_point(point['overrides'])}): {error}") from None


def plan_sweep(config: str | None, grid_items: list[str], overrides: list[str], metric: str,
               output: Path | None) -> tuple[Path, dict]:
    """Validate everything, then create the sweep folder and its sweep.json; nothing is written on an error."""
    grid = parse_grid(grid_items, overrides)
    label, text = resolve_config_path(config)
    raw = apply_overrides(parse_yaml(label, text), overrides)
    base_name = str(raw.get("name") or RunConfig.model_fields["name"].default)
    folder = output or default_folder(base_name)
    if folder.exists():
        hint = f", or continue it with: affiner sweep --resume {folder}" if (folder / SWEEP_FILE).is_file() else ""
        raise AffinerError(f"sweep folder {folder} already exists; choose a new --output{hint}.")
    points = build_points(raw, label, grid, folder / RUNS)
    check_metric(metric, points)
    check_architectures(points, label)
    folder.mkdir(parents=True)
    state = {"version": 1, "name": base_name, "config": label, "overrides": list(overrides),
             "grid": [{"key": key, "values": values} for key, values in grid], "metric": metric,
             "created": time.strftime("%Y-%m-%d %H:%M:%S"), "status": "planned", "points": points}
    write_json(folder / SWEEP_FILE, state)
    print(f"Sweep of {len(points)} point(s) over {', '.join(key for key, _ in grid)}; folder {folder}")
    return folder, state


def default_folder(name: str) -> Path:
    """sweeps/<name>-<timestamp>, one that does not exist yet."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name) or "sweep"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(100):
        folder = Path("sweeps") / (f"{safe}-{stamp}" + (f"-{attempt}" if attempt else ""))
        if not folder.exists():
            return folder
    raise AffinerError("could not choose a new sweep folder under sweeps/; pass --output DIR.")


def load_sweep(folder: Path) -> dict:
    """The state of a sweep planned earlier, to resume it."""
    path = folder / SWEEP_FILE
    if folder.is_file():
        raise AffinerError(f"{folder} is a file; --resume takes the sweep's folder"
                           f"{f' ({folder.parent})' if folder.name == SWEEP_FILE else ''}.")
    if not folder.is_dir():
        raise AffinerError(f"sweep folder {folder} does not exist.")
    if not path.is_file():
        raise AffinerError(f"{folder} is not an affiner sweep folder (no {SWEEP_FILE}).")
    try:
        state = read_json(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AffinerError(f"{path} is not valid JSON ({exc}).") from None
    if not (isinstance(state, dict) and STATE_KEYS <= state.keys() and isinstance(state["points"], list)
            and state["points"] and all(isinstance(p, dict) and POINT_KEYS <= p.keys() for p in state["points"])):
        raise AffinerError(f"{path} is damaged (not the plan affiner sweep writes: an object with "
                           f"{', '.join(sorted(STATE_KEYS))}, whose points each have {', '.join(sorted(POINT_KEYS))}); "
                           "restore it, or start a new sweep.")
    return state

# ---------------------------------------------------------------------------------------- running

def next_action(point: dict, folder: Path) -> str:
    """What resuming a point means: "skip", "evaluate" (trained), "resume" (checkpoint) or "fresh"."""
    if point["status"] == "finished":
        return "skip"
    if point["status"] == "failed" and point.get("run") and RunFolder(folder / point["run"]).is_finished:
        return "evaluate"  # trained: only its evaluation failed (a judge that left answers without a verdict)
    if point["status"] != "running" or not point.get("run"):
        return "fresh"  # pending, or failed: retried from the start
    run = RunFolder(folder / point["run"])
    if not (run / RUN_FILE).is_file():
        return "fresh"
    if run.is_finished:
        return "evaluate"
    return "resume" if run.last_checkpoint() is not None else "fresh"


def run_sweep(folder: Path) -> None:
    """Every point not finished yet, in order; then the table and the plot. Failed points end it with an error.
    One process at a time runs a sweep: a second (`--resume` in another terminal) is refused with the first's PID."""
    if Processes().several:
        raise AffinerError("affiner sweep runs its points one after another in one process; to train on several "
                           "devices, launch affiner run (or train) under torchrun with the settings of one point.")
    with sole_writer(folder, "sweep"):
        state = load_sweep(folder)  # under the lock: as the last writer left it
        with trackers_grouped(state.get("name")):
            _run_points(folder, state)


# Each point's config is named after its point (lr1e-3...), which would give each its own MLflow experiment and
# W&B project: the points are logged together, under the sweep's name, unless the user named one.
TRACKER_GROUPS = ("MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT")


@contextlib.contextmanager
def trackers_grouped(name: str | None) -> Iterator[None]:
    """The trackers' experiment (MLflow) and project (W&B) named `name` while the points run (unless set)."""
    grouped = [key for key in TRACKER_GROUPS if name and not os.environ.get(key)]
    os.environ.update({key: str(name) for key in grouped})
    try:
        yield
    finally:
        for key in grouped:
            os.environ.pop(key, None)


def _run_points(folder: Path, state: dict) -> None:
    runs_dir = folder / RUNS
    configs = {}
    for point in state["points"]:  # the recorded configs, re-checked before anything runs
        config = validate_config({**point["config"], "output_dir": str(runs_dir)},
                                 f"{folder / SWEEP_FILE} point {point['index']}")
        configs[point["index"]] = config
    todo = [p for p in state["points"] if p["status"] != "finished"]
    if len(todo) < len(state["points"]):
        print(f"Resuming sweep {folder}: {len(state['points']) - len(todo)} point(s) finished, {len(todo)} to go.")
    state["status"] = "running"
    save(folder, state)
    for point in todo:
        run_point(folder, state, point, configs[point["index"]])
    state["status"] = "finished"
    state["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save(folder, state)
    table = write_results(folder, state)
    print()
    print(table)
    print(f"\nSweep folder: {folder}  (table: {folder / TABLE_MD}, plot: {folder / PLOT_FILE})")
    failed = [p for p in state["points"] if p["status"] == "failed"]
    if failed:
        first = failed[0]
        # Exit 3, as `affiner run`'s, when every failure is a judge's missing verdicts: trained, evaluated, incomplete.
        error = Incomplete if all(p.get("unjudged") for p in failed) else AffinerError
        raise error(f"{len(failed)} of {len(state['points'])} point(s) failed (point {first['index']}, "
                    f"{first['name']}: {first['error']}). The table compares the others; retry the failed "
                    f"point(s) with: affiner sweep --resume {folder}")


def run_point(folder: Path, state: dict, point: dict, config: RunConfig) -> None:
    """One point trained (or continued) and evaluated; a failure is recorded in the point, Ctrl-C stops the sweep."""
    total = len(state["points"])
    if point["status"] == "running" and not point.get("run") and (found := unrecorded_run(folder, state, config)):
        point["run"] = found  # killed before it could record its run: continued, not trained again beside it
        print(f"Point {point['index']} ({point['name']}): continuing {found}, which the interrupted sweep left.")
    action = next_action(point, folder)
    if action == "fresh" and point.get("run"):
        point["abandoned"].append(point["run"])  # kept on disk, never deleted
        point["run"] = None
    point.update(status="running", attempts=point["attempts"] + 1, error=None, unjudged=False)
    save(folder, state)
    verb = {"fresh": "training", "resume": "resuming", "evaluate": "evaluating"}[action]
    print(f"\n[{point['index']}/{total}] {verb} {point['name']} ({describe_point(point['overrides'])})")
    started = time.time()
    try:
        train_and_evaluate_point(folder, point, config, action)
    except KeyboardInterrupt:
        _interrupted(folder, state, point, started)
    except (AffinerError, *OUT_OF_MEMORY) as exc:
        if isinstance(exc, Interrupted):  # train turns Ctrl-C into "interrupted, resume with..."
            _interrupted(folder, state, point, started)
        message = str(exc) if isinstance(exc, AffinerError) else f"out of memory: {exc}".strip()
        point.update(status="failed", error=message, unjudged=isinstance(exc, Incomplete))
        print(f"Point {point['index']} failed: {message}", file=sys.stderr)
    except BaseException as exc:  # a bug or the machine: recorded, then shown with its traceback
        point.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        _add_duration(point, started)
        save(folder, state)
        raise
    _add_duration(point, started)
    save(folder, state)
    if point["status"] == "finished":
        print(f"[{point['index']}/{total}] {point['name']}: {point_summary(state, point)}")
        warn_if_unmeasured(state["metric"], point)


def warn_if_unmeasured(metric: str, point: dict) -> None:
    """Say at once, not after the last point, that the metric the sweep ranks by was not measured."""
    if (point.get("metrics") or {}).get("tuned", {}).get(metric) is None:
        why = (" (its held-out rows have no key: set eval.key_before, or give the rows a \"key\" field)"
               if metric == "contains_key" else "")
        print(f"note: point {point['index']}'s evaluation did not measure {metric}{why}, so the sweep cannot rank "
              "by it; stop it (Ctrl-C) and start one with another --metric.", file=sys.stderr)


def train_and_evaluate_point(folder: Path, point: dict, config: RunConfig, action: str) -> None:
    """A new run trained, or the point's run continued (or only evaluated); then its figures read back."""
    runs_dir = folder / RUNS
    if action == "fresh":
        before = _folders(runs_dir)
        try:
            run = workflow.train(config)
        finally:
            # Recorded even when training fails or is interrupted, so that --resume finds the checkpoint.
            created = sorted(_folders(runs_dir) - before)
            if created:
                point["run"] = created[-1].relative_to(folder).as_posix()
        point["run"] = run.relative_to(folder).as_posix() if run.is_relative_to(folder) else str(run)
    elif action == "resume":
        workflow.train(resume=folder / point["run"])
    evaluation = evaluate(folder / point["run"])
    point["metrics"] = read_metrics(folder / point["run"])
    # A judge that left answers without a verdict would rank the points on whatever it judged: the point fails,
    # and --resume evaluates it again (the verdicts given come from the judge's cache).
    require_judged(evaluation, folder / point["run"] / REPORT_HTML, f"affiner sweep --resume {folder}")
    point["status"] = "finished"


def unrecorded_run(folder: Path, state: dict, config: RunConfig) -> str | None:
    """The run a point's killed process started but could not record in sweep.json (a kill -9 leaves no time):
    the newest folder of runs/ that no point names, trained with this point's very config."""
    named = {p.get("run") for p in state["points"]} | {a for p in state["points"] for a in p.get("abandoned", [])}
    for run in sorted(_folders(folder / RUNS), reverse=True):
        relative = run.relative_to(folder).as_posix()
        if relative in named or not (run / RUN_FILE).is_file():
            continue
        try:
            # output_dir is the sweep folder as typed (`sw`, `/tmp/sw`, from another directory): not the run's own
            if not RunFolder(run).has_writer() and RunFolder(run).config().model_copy(
                    update={"output_dir": config.output_dir}) == config:
                return relative
        except (AffinerError, OSError):  # a damaged folder is nobody's run
            continue
    return None


def _interrupted(folder: Path, state: dict, point: dict, started: float) -> None:
    point["status"] = "running"  # so that --resume picks it up (from its checkpoint when there is one)
    state["status"] = "interrupted"
    _add_duration(point, started)
    save(folder, state)
    print(f"\nSweep interrupted during point {point['index']} ({point['name']}); continue with:\n"
          f"  affiner sweep --resume {folder}", file=sys.stderr)
    raise KeyboardInterrupt


def _add_duration(point: dict, started: float) -> None:
    point["duration"] = round(point.get("duration", 0.0) + time.time() - started, 1)


def _folders(root: Path) -> set[Path]:
    return {p for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()


def save(folder: Path, state: dict) -> None:
    write_json(folder / SWEEP_FILE, state)


def read_metrics(folder: Path) -> dict:
    """The run's own figures: every headline metric of base and tuned (metrics.json), last train loss, steps."""
    run = RunFolder(folder)
    report = run.evaluation()
    models = report["models"]
    tuned = models[1] if len(models) > 1 else models[0]
    means = {role: {key: values.get(model, {}).get("mean") for key, values in report["metrics"].items()}
             for role, model in (("base", models[0]), ("tuned", tuned))}
    train_loss = next((r["loss"] for r in reversed(run.log()) if "loss" in r), None)
    return {**means, "train_loss": train_loss, "steps": run.info().get("steps")}
