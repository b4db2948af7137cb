"""Sweep a grid of config values: one run per point, resumable, ending with a comparison table and a plot.

    affiner sweep quickstart --grid train.learning_rate=3e-4,1e-3 --grid train.epochs=1,2
    affiner sweep quickstart --grid train.learning_rate=1e-4,3e-4,1e-3 --grid lora.r=4,16 --set train.max_steps=20
    affiner sweep quickstart --grid 'lora.target_modules=[q_proj,v_proj],[q_proj,k_proj,v_proj,o_proj]' --metric rouge_l
    affiner sweep --resume sweeps/quickstart-20261122-183000

Each --grid KEY=V1,V2,... lists values parsed as YAML like --set (1e-4, true, [a, b]); a list value is
written in brackets. The points are every combination, first key outermost. Every point's config is
validated before the first run starts. Each point is one run (named after its values, e.g.
quickstart-lr3e-4-ep2) trained and evaluated like `affiner run`, under the sweep folder's runs/.

The sweep folder (default sweeps/<name>-<timestamp>) gets `sweep.json` (the plan and each point's
status, run folder and metrics, updated after every step), and at the end `sweep.md` and `sweep.csv`
(one row per point: swept values, --metric for base and tuned, held-out loss, final train loss, steps,
duration, run folder; best point marked) and `sweep.png` (the metric against the first swept key).
After Ctrl-C, `--resume` skips finished points, continues an interrupted run from its last checkpoint
and retries failed points. A point that fails is recorded and the sweep goes on; the exit code is 2
if any point failed.
"""

from __future__ import annotations

import argparse
import copy
import csv
import difflib
import io
import itertools
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from affiner.evaluation.evaluate import TEXT_METRICS, evaluate
from affiner.experiments import workflow
from affiner.core.config import (
    RunConfig,
    apply_overrides,
    parse_yaml,
    resolve_config_path,
    validate_config,
)
from affiner.core.errors import AffinerError
from affiner.core.files import read_json, write_json
from affiner.core.formatting import METRIC_INFO
from affiner.core.runfolder import RUN_FILE, RunFolder
from affiner.core.files import write_atomic

SWEEP_FILE = "sweep.json"
TABLE_MD = "sweep.md"
TABLE_CSV = "sweep.csv"
PLOT_FILE = "sweep.png"
RUNS = "runs"
DEFAULT_METRIC = "contains"
# The headline metrics an evaluation reports for the base and the tuned model (metrics.json).
METRICS = (*TEXT_METRICS, "loss", "perplexity", "judge")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Short forms of common keys in point names: quickstart-lr1e-4-ep2.
ABBREVIATIONS = {"learning_rate": "lr", "epochs": "ep", "max_steps": "steps", "batch_size": "bs",
                 "gradient_accumulation": "ga", "warmup_ratio": "wu", "weight_decay": "wd", "target_modules": "tm",
                 "dropout": "do", "max_length": "len", "scheduler": "", "method": "", "optimizer": "", "base": ""}
RESERVED = ("name", "output_dir")  # the sweep sets these for every point
# Points that do not fit in memory (a large batch size, say) fail alone; the sweep goes on with the others.
_OUT_OF_MEMORY = (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML file or recipe name (default: quickstart)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="a swept config key and its values, e.g. --grid train.learning_rate=1e-4,3e-4 "
                             "(repeatable: every combination is one run; list values in brackets)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value for every point, e.g. --set train.max_steps=20 (repeatable)")
    parser.add_argument("--metric", help=f"metric compared in the table and plot (default: {DEFAULT_METRIC}; "
                                         f"one of {', '.join(METRICS)})")
    parser.add_argument("--output", metavar="DIR", help="the new sweep folder (default: sweeps/<name>-<timestamp>)")
    parser.add_argument("--resume", metavar="SWEEP", help="continue an interrupted sweep folder")


def main(args: argparse.Namespace) -> None:
    if args.resume:
        given = [flag for flag, value in (("CONFIG", args.config), ("--grid", args.grid), ("--set", args.overrides),
                                          ("--metric", args.metric), ("--output", args.output)) if value]
        if given:
            raise AffinerError(f"--resume continues a sweep as it was planned; drop {', '.join(given)} "
                               "(or start a new sweep).")
        folder = Path(args.resume)
        state = load_sweep(folder)
    else:
        folder, state = plan_sweep(args.config, args.grid, args.overrides, args.metric or DEFAULT_METRIC,
                                   Path(args.output) if args.output else None)
    run_sweep(folder, state)


# ---------------------------------------------------------------------------------------- the grid


def split_values(text: str) -> list[str]:
    """Split `a,[b,c],{d: e}` at top-level commas only; quotes and brackets protect their commas."""
    values, current, depth, quote = [], [], 0, None
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth < 0:
                raise AffinerError(f"closes a bracket it never opened: {text!r}")
        elif char == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    if depth or quote:
        raise AffinerError(f"has an unclosed {'quote' if quote else 'bracket'}: {text!r}")
    values.append("".join(current).strip())
    return values


def parse_value(text: str) -> Any:
    """A grid value, parsed as YAML like --set (a string when it is not valid YAML)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_grid(items: list[str], overrides: list[str] | None = None) -> list[tuple[str, list[str]]]:
    """`--grid KEY=V1,V2` strings as [(key, [value texts])], checked: keys once, values distinct, no --set clash."""
    if not items:
        raise AffinerError("give at least one --grid KEY=V1,V2,..., for example "
                           "--grid train.learning_rate=1e-4,3e-4 (or --resume SWEEP to continue a sweep).")
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise AffinerError(f"--grid {item!r} must look like section.key=value1,value2, for example "
                               "--grid train.learning_rate=1e-4,3e-4.")
        if key in RESERVED:
            raise AffinerError(f"--grid {key}: the sweep sets {key} for every point (use --output for the sweep "
                               "folder, --set name=NAME for the runs' name).")
        try:
            values = split_values(text)
        except AffinerError as exc:
            raise AffinerError(f"--grid {key} {exc}") from None
        if any(not v for v in values):
            raise AffinerError(f"--grid {item!r} has an empty value; separate values with single commas, "
                               "and write a list value in brackets: [a,b].")
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise AffinerError(f"--grid {key} lists {', '.join(repeated)} more than once.")
        clash = next((k for k, _ in grid if _overlaps(k, key)), None)
        if clash:
            raise AffinerError(f"--grid {key} is given twice" if clash == key else
                               f"--grid {key} and --grid {clash} overlap (one is inside the other)")
        grid.append((key, values))
    for item in overrides or []:
        set_key = item.partition("=")[0].strip()
        clash = next((k for k, _ in grid if _overlaps(k, set_key)), None)
        if clash:
            raise AffinerError(f"{set_key} is both set (--set {item}) and swept (--grid {clash}=...); "
                               "drop one of them.")
        if set_key == "output_dir":
            raise AffinerError("--set output_dir: the runs of a sweep go under its folder's runs/; "
                               "choose the sweep folder with --output DIR.")
    return grid


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def expand(grid: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """Every combination of the grid's values, first key outermost, as {key: value text}."""
    keys = [key for key, _ in grid]
    return [dict(zip(keys, combination)) for combination in itertools.product(*(values for _, values in grid))]


def set_value(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise AffinerError(f"--grid {key}: '{part}' is a value, not a section.")
        node = child
    node[parts[-1]] = value


def get_value(data: dict, key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


def point_name(base: str, overrides: dict[str, str]) -> str:
    """`quickstart` + {train.learning_rate: 1e-4, train.epochs: 2} -> `quickstart-lr1e-4-ep2`."""
    parts = [base]
    for key, text in overrides.items():
        last = key.rsplit(".", 1)[-1]
        short = ABBREVIATIONS.get(last, last)
        if "/" in text and not text.startswith("["):
            text = text.rstrip("/").rsplit("/", 1)[-1]  # a path: its last part
        value = re.sub(r"[\[\]{}'\"\s]", "", text).replace(",", ".").replace(":", "=")
        value = re.sub(r"[^A-Za-z0-9._-]", "_", value)[:40]
        parts.append(f"{short}{value}")
    return "-".join(p for p in parts if p)


def describe_point(overrides: dict[str, str]) -> str:
    return ", ".join(f"{key}={text}" for key, text in overrides.items())


# ---------------------------------------------------------------------------------------- planning


def build_points(raw: dict, label: str, grid: list[tuple[str, list[str]]], runs_dir: Path) -> list[dict]:
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
    for key, texts in grid:
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
    folder.mkdir(parents=True)
    state = {"version": 1, "config": label, "overrides": list(overrides),
             "grid": [{"key": key, "values": values} for key, values in grid], "metric": metric,
             "created": time.strftime("%Y-%m-%d %H:%M:%S"), "status": "planned", "points": points}
    write_json(folder / SWEEP_FILE, state)
    print(f"Sweep of {len(points)} point(s) over {', '.join(key for key, _ in grid)}; folder {folder}")
    return folder, state


def default_folder(name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name) or "sweep"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(100):
        folder = Path("sweeps") / (f"{safe}-{stamp}" + (f"-{attempt}" if attempt else ""))
        if not folder.exists():
            return folder
    raise AffinerError("could not choose a new sweep folder under sweeps/; pass --output DIR.")


def load_sweep(folder: Path) -> dict:
    path = folder / SWEEP_FILE
    if not folder.is_dir():
        raise AffinerError(f"sweep folder {folder} does not exist.")
    if not path.is_file():
        raise AffinerError(f"{folder} is not an affiner sweep folder (no {SWEEP_FILE}).")
    try:
        state = read_json(path)
    except json.JSONDecodeError as exc:
        raise AffinerError(f"{path} is not valid JSON ({exc}).") from None
    return state


# ---------------------------------------------------------------------------------------- running


def next_action(point: dict, folder: Path) -> str:
    """What resuming a point means: "skip", "evaluate" (trained), "resume" (checkpoint) or "fresh"."""
    if point["status"] == "finished":
        return "skip"
    if point["status"] != "running" or not point.get("run"):
        return "fresh"  # pending, or failed: retried from the start
    run = folder / point["run"]
    if not (run / RUN_FILE).is_file():
        return "fresh"
    if RunFolder(run).is_finished:
        return "evaluate"
    return "resume" if RunFolder(run).last_checkpoint() is not None else "fresh"


def run_sweep(folder: Path, state: dict) -> None:
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
        raise AffinerError(f"{len(failed)} of {len(state['points'])} point(s) failed (point {first['index']}, "
                           f"{first['name']}: {first['error']}). The table compares the others; retry the failed "
                           f"point(s) with: affiner sweep --resume {folder}")


def run_point(folder: Path, state: dict, point: dict, config: RunConfig) -> None:
    total = len(state["points"])
    action = next_action(point, folder)
    if action == "fresh" and point.get("run"):
        point["abandoned"].append(point["run"])  # kept on disk, never deleted
        point["run"] = None
    point.update(status="running", attempts=point["attempts"] + 1, error=None)
    save(folder, state)
    verb = {"fresh": "training", "resume": "resuming", "evaluate": "evaluating"}[action]
    print(f"\n[{point['index']}/{total}] {verb} {point['name']} ({describe_point(point['overrides'])})")
    started = time.time()
    runs_dir = folder / RUNS
    try:
        if action == "fresh":
            before = _folders(runs_dir)
            try:
                run = workflow.train(config)
            finally:
                created = sorted(_folders(runs_dir) - before)
                if created:
                    point["run"] = created[-1].relative_to(folder).as_posix()
            point["run"] = run.relative_to(folder).as_posix() if run.is_relative_to(folder) else str(run)
        elif action == "resume":
            workflow.train(resume=folder / point["run"])
        evaluate(folder / point["run"])
        point["metrics"] = read_metrics(folder / point["run"])
        point["status"] = "finished"
    except KeyboardInterrupt:
        _interrupted(folder, state, point, started)
    except (AffinerError, *_OUT_OF_MEMORY) as exc:
        if isinstance(exc.__context__, KeyboardInterrupt):  # train turns Ctrl-C into "interrupted, resume with..."
            _interrupted(folder, state, point, started)
        message = str(exc) if isinstance(exc, AffinerError) else f"out of memory: {exc}".strip()
        point.update(status="failed", error=message)
        print(f"Point {point['index']} failed: {message}", file=sys.stderr)
    except BaseException as exc:  # a bug or the machine: recorded, then shown with its traceback
        point.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        _add_duration(point, started)
        save(folder, state)
        raise
    _add_duration(point, started)
    save(folder, state)
    if point["status"] == "finished":
        print(f"[{point['index']}/{total}] {point['name']}: {_headline(state, point)}")


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


def read_metrics(run: Path) -> dict:
    """The run's own figures: every headline metric of base and tuned (metrics.json), last train loss, steps."""
    report = RunFolder(run).evaluation()
    models = report["models"]
    tuned = models[1] if len(models) > 1 else models[0]
    means = {role: {key: values.get(model, {}).get("mean") for key, values in report["metrics"].items()}
             for role, model in (("base", models[0]), ("tuned", tuned))}
    train_loss = next((r["loss"] for r in reversed(RunFolder(run).log()) if "loss" in r), None)
    return {**means, "train_loss": train_loss, "steps": RunFolder(run).info().get("steps")}


# ---------------------------------------------------------------------------------------- the table


def metric_values(point: dict, metric: str) -> tuple[float | None, float | None, float | None]:
    figures = point.get("metrics") or {}
    base = (figures.get("base") or {}).get(metric)
    tuned = (figures.get("tuned") or {}).get(metric)
    return base, tuned, (tuned - base if base is not None and tuned is not None else None)


def best_point(state: dict) -> dict | None:
    """The finished point with the best tuned value of the metric (none for a metric without a better side)."""
    metric = state["metric"]
    better = METRIC_INFO.get(metric, {"higher_is_better": True}).get("higher_is_better")
    scored = [p for p in state["points"] if p["status"] == "finished" and metric_values(p, metric)[1] is not None]
    if better is None or not scored:
        return None

    def rank(point: dict) -> tuple[float, float]:  # ties broken by the held-out loss, lower is better
        loss = ((point.get("metrics") or {}).get("tuned") or {}).get("loss")
        value = metric_values(point, metric)[1]
        return (-value if better else value, math.inf if loss is None else loss)

    return min(scored, key=rank)


def table_rows(folder: Path, state: dict) -> tuple[list[str], list[list[Any]]]:
    """Header and raw rows (numbers as numbers) of the comparison table."""
    metric, keys = state["metric"], [g["key"] for g in state["grid"]]
    best = best_point(state)
    header = ["best", "point", *keys, f"{metric}_base", f"{metric}_tuned", f"{metric}_delta", "loss_tuned",
              "train_loss", "steps", "duration_s", "status", "run"]
    rows = []
    for point in state["points"]:
        figures = point.get("metrics") or {}
        base, tuned, delta = metric_values(point, metric)
        rows.append(["*" if point is best else "", point["index"], *(point["overrides"][k] for k in keys),
                     base, tuned, delta, (figures.get("tuned") or {}).get("loss"), figures.get("train_loss"),
                     figures.get("steps"), point.get("duration"), point["status"],
                     str(folder / point["run"]) if point.get("run") else None])
    return header, rows


def _format(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "rate":
        return f"{100 * value:.0f} %"
    if kind == "rate_delta":
        return f"{100 * value:+.0f} pts"
    if kind == "delta":
        return f"{value:+.3f}"
    if kind == "count":
        return f"{value:.1f}"
    if kind == "duration":
        return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min" if value < 7200 else f"{value / 3600:.1f} h"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def display_table(folder: Path, state: dict) -> tuple[list[str], list[list[str]]]:
    _, rows = table_rows(folder, state)
    metric, n_keys = state["metric"], len(state["grid"])
    kind = METRIC_INFO.get(metric, {}).get("kind", "score")
    kinds = ["text", "text", *["text"] * n_keys, kind, kind, "rate_delta" if kind == "rate" else "delta",
             "loss", "loss", "text", "duration", "text", "text"]
    labels = ["", "#", *[g["key"] for g in state["grid"]], f"{metric} base", f"{metric} tuned", "delta",
              "held-out loss (tuned)", "final train loss", "steps", "duration", "status", "run"]
    return labels, [[_format(v, k) for v, k in zip(row, kinds)] for row in rows]


def format_table(folder: Path, state: dict) -> str:
    labels, rows = display_table(folder, state)
    widths = [max(len(r[i]) for r in [labels, *rows]) for i in range(len(labels))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [labels, *rows]]
    best = best_point(state)
    if best is not None:
        lines.append(f"\n* best {state['metric']} after tuning: point {best['index']}, {best['name']} "
                     f"({describe_point(best['overrides'])})")
    return "\n".join(lines)


def format_markdown(folder: Path, state: dict) -> str:
    labels, rows = display_table(folder, state)
    labels = ["best" if not label else label for label in labels]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    best = best_point(state)
    info = METRIC_INFO.get(state["metric"], {})
    lines = [f"# Sweep {folder.name}", "",
             f"Config: {state['config']}" + (f", with {' '.join(state['overrides'])}" if state["overrides"] else ""),
             f"Metric: {state['metric']} ({info.get('label', state['metric'])})", "",
             line(labels), line(["---"] * len(labels)), *(line(r) for r in rows)]
    if best is not None:
        lines += ["", f"Best: point {best['index']}, {best['name']} ({describe_point(best['overrides'])})."]
    failed = [p for p in state["points"] if p["status"] == "failed"]
    if failed:
        lines += ["", "Failed points:", *(f"- point {p['index']} ({p['name']}): {p['error']}" for p in failed)]
    return "\n".join(lines) + "\n"


def format_csv(folder: Path, state: dict) -> str:
    header, rows = table_rows(folder, state)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else repr(v) if isinstance(v, float) else v for v in row] for row in rows])
    return buffer.getvalue()


def write_results(folder: Path, state: dict) -> str:
    write_atomic(folder / TABLE_MD, format_markdown(folder, state).encode("utf-8"))
    write_atomic(folder / TABLE_CSV, format_csv(folder, state).encode("utf-8"))
    write_atomic(folder / PLOT_FILE, plot(state))
    return format_table(folder, state)


# ---------------------------------------------------------------------------------------- the plot


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot(state: dict) -> bytes:
    """The metric after tuning against the first swept key; one line per value of the other keys; base dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric, grid = state["metric"], state["grid"]
    first, others = grid[0]["key"], [g["key"] for g in grid[1:]]
    figure = Figure(figsize=(6.5, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    points = state["points"]
    xs = [p["values"][first] for p in points]
    numeric = all(_is_number(x) for x in xs)
    if numeric:
        position = {p["index"]: float(p["values"][first]) for p in points}
        if min(xs) > 0 and max(xs) / min(xs) > 10:
            axes.set_xscale("log")
        ticks = {float(p["values"][first]): p["overrides"][first] for p in points}
        axes.set_xticks(sorted(ticks), [ticks[t] for t in sorted(ticks)])
        axes.minorticks_off()
    else:
        order = grid[0]["values"]
        position = {p["index"]: float(order.index(p["overrides"][first])) for p in points}
        axes.set_xticks(range(len(order)), order)
    finished = [p for p in points if p["status"] == "finished" and metric_values(p, metric)[1] is not None]
    groups: dict[tuple, list[dict]] = {}
    for point in finished:
        groups.setdefault(tuple(point["overrides"][k] for k in others), []).append(point)
    bases = {metric_values(p, metric)[0] for p in finished} - {None}
    colours = [f"C{i % 10}" for i in range(len(groups))]
    for colour, (combo, members) in zip(colours, groups.items()):
        members.sort(key=lambda p: position[p["index"]])
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(others, combo)) or "tuned"
        axes.plot([position[p["index"]] for p in members], [metric_values(p, metric)[1] for p in members],
                  marker="o", color=colour, label=label)
        if len(bases) > 1:  # the base itself varies with the grid (e.g. model.base): one reference per line
            axes.plot([position[p["index"]] for p in members], [metric_values(p, metric)[0] for p in members],
                      linestyle="--", color=colour, alpha=0.7, label=f"base ({label})")
    if len(bases) == 1:
        axes.axhline(next(iter(bases)), color="#555", linestyle="--", linewidth=1.2, label="base")
    if not finished:
        axes.text(0.5, 0.5, "no finished point to plot", ha="center", va="center", transform=axes.transAxes)
    info = METRIC_INFO.get(metric, {"label": metric})
    if info.get("kind") == "rate":
        from matplotlib.ticker import PercentFormatter

        axes.set_ylim(-0.03, 1.03)
        axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    axes.set_xlabel(first)
    axes.set_ylabel(f"{info['label']} (tuned)")
    axes.set_title(f"{metric} against {first}", fontsize=10)
    axes.grid(alpha=0.3)
    if finished:
        axes.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _headline(state: dict, point: dict) -> str:
    metric = state["metric"]
    base, tuned, _ = metric_values(point, metric)
    kind = METRIC_INFO.get(metric, {}).get("kind", "score")
    return f"{metric} base {_format(base, kind)} -> tuned {_format(tuned, kind)}  ({_format(point['duration'], 'duration')})"
