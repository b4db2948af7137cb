"""Run folders, and `affiner runs`: list them, or compare several side by side.

    affiner runs                                  # every run under runs/: model, data, method, time, scores
    affiner runs --dir sweeps/quickstart-20261122-210000/runs
    affiner runs compare runs/quickstart-20261122-183000 runs/quickstart-20261122-191348
    affiner runs compare runs/a runs/b --json     # the same, for scripts

A run folder `runs/<name>-<timestamp>/` is created once, never overwritten, and describes itself:
config.yaml, run.json (status, timings), data.json (sources and fingerprints), metrics.jsonl, and
after `affiner evaluate`, metrics.json (every metric for base and tuned, with intervals).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from affiner.config import RunConfig, dump_config, parse_yaml, validate_config
from affiner.errors import AffinerError

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"


def create_run_folder(config: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = Path(config.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for attempt in range(100):
        folder = root / (f"{config.name}-{stamp}" + (f"-{attempt}" if attempt else ""))
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise AffinerError(f"could not create a new run folder under {root}.")


def write_json(path: Path, data: Any) -> None:
    """Write atomically, so an interrupted command never leaves half a file behind."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(partial, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def save_config(config: RunConfig, folder: Path) -> None:
    (folder / CONFIG_FILE).write_text(dump_config(config), encoding="utf-8")


def load_run_config(folder: Path) -> RunConfig:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AffinerError(f"{folder} is not an affiner run folder (no {CONFIG_FILE}).")
    return validate_config(parse_yaml(str(path), path.read_text(encoding="utf-8")), str(path))


def require_run(folder: str | Path) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise AffinerError(f"run folder {folder} does not exist.")
    if not (path / RUN_FILE).is_file():
        raise AffinerError(f"{folder} is not an affiner run folder (no {RUN_FILE}).")
    return path


def read_log(folder: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, in order; a line cut by an interrupted write is skipped."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def replace_folder(staging: Path, output: Path) -> None:
    """Move a completely written folder into place; an earlier one is removed only once the new one is there."""
    if not output.exists():
        staging.rename(output)
        return
    retired = output.with_name(f".{output.name}-old-{os.getpid()}")
    output.rename(retired)
    try:
        staging.rename(output)
    except OSError:
        retired.rename(output)  # the earlier folder stays as it was
        raise
    shutil.rmtree(retired)


def latest_run(output_dir: str = "runs") -> Path | None:
    runs = [p for p in Path(output_dir).glob("*/") if (p / RUN_FILE).is_file()]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None



# ---------------------------------------------------------------------------------------- affiner runs

HEADLINE = ("contains", "stopped", "loss")  # the columns of the list: correct, stops, held-out loss


def find_runs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise AffinerError(f"{root} does not exist: no run has been written there yet (see --dir).")
    folders = [p for p in root.iterdir() if (p / RUN_FILE).is_file()]
    # Runs started in the same second share a stamp; create_run_folder suffixes the later ones (-1, -2, ...).
    return sorted(folders, key=lambda p: (read_json(p / RUN_FILE).get("started", ""), len(p.name), p.name))


def describe_run(folder: Path) -> dict[str, Any]:
    """One run as the list and the comparison show it, from the files the run wrote."""
    info = read_json(folder / RUN_FILE)
    config = load_run_config(folder)
    data = read_json(folder / "data.json") if (folder / "data.json").is_file() else {}
    evaluation = read_json(folder / "metrics.json") if (folder / "metrics.json").is_file() else None
    scores = {metric: {model: value["mean"] for model, value in by_model.items()}
              for metric, by_model in (evaluation or {}).get("metrics", {}).items()}
    return {"run": str(folder), "status": info.get("status", "?"), "model": config.model.base,
            "method": config.method, "data": config.data.train,
            "train_rows": data.get("train", {}).get("examples"), "steps": info.get("steps", info.get("step")),
            "minutes": round(info["train_seconds"] / 60, 1) if "train_seconds" in info else None,
            "started": info.get("started"), "scores": scores,
            "config": flat_config(config.model_dump(mode="json"))}


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"lora": {"r": 16}} -> {"lora.r": 16}: what MLflow parameters and run comparisons use."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat |= flat_config(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return flat


def _score(run: dict[str, Any], metric: str, model: str = "tuned") -> str:
    from affiner.metrics import METRIC_INFO

    value = run["scores"].get(metric, {}).get(model)
    if value is None:
        return "-"
    return f"{100 * value:.0f} %" if METRIC_INFO[metric]["kind"] == "rate" else f"{value:.3f}"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def list_runs(root: Path) -> str:
    runs = [describe_run(folder) for folder in find_runs(root)]
    if not runs:
        return f"no run under {root} yet: affiner run"
    header = ["run", "status", "model", "method", "data", "rows", "steps", "min",
              "correct base→tuned", "stops tuned", "loss tuned"]
    rows = [header] + [[Path(r["run"]).name, r["status"], r["model"], r["method"], r["data"],
                        str(r["train_rows"] or "-"), str(r["steps"] or "-"), str(r["minutes"] or "-"),
                        f"{_score(r, 'contains', 'base')} → {_score(r, 'contains')}" if r["scores"] else "not evaluated",
                        _score(r, "stopped"), _score(r, "loss")] for r in runs]
    return table(rows)


def compare_runs(folders: list[Path]) -> dict[str, Any]:
    runs = [describe_run(require_run(folder)) for folder in folders]
    keys = list(dict.fromkeys(k for r in runs for k in r["config"]))
    differences = {k: [r["config"].get(k) for r in runs] for k in keys
                   if len({json.dumps(r["config"].get(k)) for r in runs}) > 1 and k != "name"}
    metrics = list(dict.fromkeys(m for r in runs for m in r["scores"]))
    scores = {m: [{model: r["scores"].get(m, {}).get(model) for model in ("base", "tuned")} for r in runs]
              for m in metrics}
    return {"runs": [r["run"] for r in runs], "differences": differences, "scores": scores,
            "status": [r["status"] for r in runs], "minutes": [r["minutes"] for r in runs],
            "train_rows": [r["train_rows"] for r in runs]}


def format_comparison(comparison: dict[str, Any]) -> str:
    from affiner.metrics import METRIC_INFO

    names = [Path(r).name for r in comparison["runs"]]
    lines = ["Config differences:"]
    if comparison["differences"]:
        lines.append(table([["key", *names]] + [[k, *(json.dumps(v) if not isinstance(v, str) else v for v in values)]
                                                for k, values in comparison["differences"].items()]))
    else:
        lines.append("  none: the same config")
    rows = [["metric (base → tuned)", *names],
            ["status", *comparison["status"]], ["training minutes", *(str(m or "-") for m in comparison["minutes"])]]
    for metric, per_run in comparison["scores"].items():
        label = METRIC_INFO.get(metric, {"label": metric})["label"]
        rows.append([label, *(" → ".join(_score({"scores": {metric: s}}, metric, model) for model in ("base", "tuned"))
                              for s in per_run)])
    lines += ["", table(rows)]
    if not comparison["scores"]:
        lines.append("(no run is evaluated yet: affiner evaluate RUN)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=["list", "compare"], default="list",
                        help="list (default) or compare the RUN folders given")
    parser.add_argument("runs", nargs="*", type=Path, metavar="RUN", help="run folders to compare")
    parser.add_argument("--dir", type=Path, default=Path("runs"), help="where to look for runs (default: runs)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def main(args: argparse.Namespace) -> None:
    if args.action == "list":
        if args.runs:
            raise AffinerError("affiner runs lists the runs under --dir; to compare folders: "
                               "affiner runs compare RUN RUN ...")
        if args.json:
            print(json.dumps([describe_run(f) for f in find_runs(args.dir)], indent=2, ensure_ascii=False))
        else:
            print(list_runs(args.dir))
        return
    if len(args.runs) < 2:
        raise AffinerError("affiner runs compare needs at least two run folders, e.g. "
                           "affiner runs compare runs/a runs/b.")
    comparison = compare_runs(args.runs)
    print(json.dumps(comparison, indent=2, ensure_ascii=False) if args.json else format_comparison(comparison))
