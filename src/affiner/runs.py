"""Run folders: `runs/<name>-<timestamp>/`, created once, never overwritten, describing themselves."""

from __future__ import annotations

import json
import os
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


def latest_run(output_dir: str = "runs") -> Path | None:
    runs = [p for p in Path(output_dir).glob("*/") if (p / RUN_FILE).is_file()]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None

