"""`affiner runs`: every run under a folder with its scores, or several runs compared side by side."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from affiner.core.config import flatten
from affiner.core.errors import AffinerError
from affiner.core.formatting import METRIC_INFO, format_value, metric_kind, text_table
from affiner.core.card import RUN_SPLIT
from affiner.core.runfolder import RunFolder


STOPPED = "stopped"  # recorded as training, but no process is writing it


def find_runs(root: Path) -> list[Path]:
    return [run.path for run in RunFolder.all_under(root)]


def describe_runs(root: Path) -> list[dict[str, Any]]:
    """Every readable run under `root`; one that cannot be read (a damaged run.json or config.yaml) is named
    on stderr and left out, so that it does not hide all the others."""
    described = []
    for folder in find_runs(root):
        try:
            described.append(describe_run(folder))
        except (AffinerError, OSError) as error:
            print(f"note: skipping {folder}: {error}", file=sys.stderr)
    return described


def describe_run(folder: Path) -> dict[str, Any]:
    """One run as the list and the comparison show it, from the files the run wrote."""
    run = RunFolder(folder)
    info, config, data, evaluation = run.info(), run.config(), run.data_info(), run.evaluation()
    scores = {metric: {model: value["mean"] for model, value in by_model.items()}
              for metric, by_model in (evaluation or {}).get("metrics", {}).items()}
    status = info.get("status", "?")
    if status == "training" and not run.has_writer():
        status = STOPPED  # its process ended before the run did
    return {"run": str(folder), "status": status, "model": config.model.base,
            "method": config.method, "data": config.data.train,
            "train_rows": data.get("train", {}).get("examples"), "steps": info.get("steps", info.get("step")),
            "minutes": round(info["train_seconds"] / 60, 1) if "train_seconds" in info else None,
            "started": info.get("started"), "scores": scores,
            "primary": (evaluation or {}).get("primary_metric") or "contains",
            "questions": _questions(evaluation, config.data.train),
            "config": flatten(config.model_dump(mode="json"))}


def _questions(evaluation: dict | None, train: str) -> str | None:
    """What the run's evaluation answered: '60 of embedded:glossary-test.json', '24 held out of data.jsonl'
    (None: not evaluated)."""
    settings = (evaluation or {}).get("settings") or {}
    test = settings.get("test", "?")
    source = f"held out of {train}" if test == RUN_SPLIT else f"of {test}"
    return f"{settings.get('questions', '?')} {source}" if evaluation else None


def _score(run: dict[str, Any], metric: str, model: str = "tuned") -> str:
    return format_value(run["scores"].get(metric, {}).get(model), metric_kind(metric))


def list_runs(root: Path) -> str:
    runs = describe_runs(root)
    if not runs and (root / "runs").is_dir():  # a sweep's folder, or a project's: its runs are in runs/
        return list_runs(root / "runs")
    if not runs:
        return f"no run under {root} yet: affiner run"
    header = ["run", "status", "model", "method", "data", "rows", "steps", "min",
              "headline base→tuned", "stops tuned", "loss tuned"]
    rows = [header] + [[Path(r["run"]).name, r["status"], r["model"], r["method"], r["data"],
                        _shown(r["train_rows"]), _shown(r["steps"]), _minutes(r["minutes"]),
                        f"{r['primary']} {_score(r, r['primary'], 'base')} → {_score(r, r['primary'])}"
                        if r["scores"] else "not evaluated",
                        _score(r, "stopped"), _score(r, "loss")] for r in runs]
    stopped = [Path(r["run"]) for r in runs if r["status"] == STOPPED]
    note = (f"\n{STOPPED}: its training ended before the run did (killed, crashed, the machine restarted); "
            f"{RunFolder(stopped[-1]).how_to_finish()}") if stopped else ""
    return text_table(rows) + note


def _shown(value) -> str:
    """A recorded figure, or "-" when there is none (0 is a figure)."""
    return "-" if value is None else str(value)


def _minutes(minutes: float | None) -> str:
    """Training minutes to one decimal; a run of a few seconds is "<0.1", not taken for one without a time."""
    return "-" if minutes is None else "<0.1" if minutes < 0.1 else f"{minutes:g}"


def compare_runs(folders: list[Path]) -> dict[str, Any]:
    runs = [describe_run(RunFolder.open(folder).path) for folder in folders]
    keys = list(dict.fromkeys(k for r in runs for k in r["config"]))
    differences = {k: [r["config"].get(k) for r in runs] for k in keys
                   if len({json.dumps(r["config"].get(k)) for r in runs}) > 1 and k != "name"}
    metrics = list(dict.fromkeys(m for r in runs for m in r["scores"]))
    scores = {m: [{model: r["scores"].get(m, {}).get(model) for model in ("base", "tuned")} for r in runs]
              for m in metrics}
    return {"runs": [r["run"] for r in runs], "differences": differences, "scores": scores,
            "status": [r["status"] for r in runs], "minutes": [r["minutes"] for r in runs],
            "train_rows": [r["train_rows"] for r in runs], "questions": [r["questions"] for r in runs],
            "caveats": _caveats(runs)}


def _caveats(runs: list[dict[str, Any]]) -> list[str]:
    """What makes the figures side by side not comparable: other questions, other tokenizers."""
    caveats = []
    asked = {r["questions"] for r in runs if r["questions"]}
    if len(asked) > 1:
        caveats.append(f"the runs were scored on different questions ({'; '.join(sorted(asked))}): their figures "
                       "do not compare question for question; evaluate them on one --test file to compare")
    if len({r["model"] for r in runs}) > 1:
        caveats.append("the runs tune different base models: held-out loss and perplexity are per token of each "
                       "model's own tokenizer, so they do not compare across them (the answer scores do)")
    return caveats


def format_comparison(comparison: dict[str, Any]) -> str:
    names = [Path(r).name for r in comparison["runs"]]
    lines = ["Config differences:"]
    if comparison["differences"]:
        lines.append(text_table([["key", *names]] + [[k, *(json.dumps(v) if not isinstance(v, str) else v for v in values)]
                                                for k, values in comparison["differences"].items()]))
    else:
        lines.append("  none: the same config")
    rows = [["metric (base → tuned)", *names],
            ["status", *comparison["status"]], ["training minutes", *map(_minutes, comparison["minutes"])],
            ["questions answered", *(q or "-" for q in comparison["questions"])]]
    for metric, per_run in comparison["scores"].items():
        label = METRIC_INFO.get(metric, {"label": metric})["label"]
        rows.append([label, *(" → ".join(_score({"scores": {metric: s}}, metric, model) for model in ("base", "tuned"))
                              for s in per_run)])
    lines += ["", text_table(rows)]
    if not comparison["scores"]:
        lines.append("(no run is evaluated yet: affiner evaluate RUN)")
    lines += [f"note: {caveat}." for caveat in comparison["caveats"]]
    return "\n".join(lines)
