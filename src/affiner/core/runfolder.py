"""The run folder: where one training run and its evaluations live, and the one type that reads it.

A run folder `runs/<name>-<timestamp>/` is created once, never overwritten, and describes itself:

    config.yaml          the resolved config (every default written out)
    run.json             status (training, interrupted, finished), method, base, timings
    template.json        the prompt template, so training and inference render prompts alike
    data.json            data sources, fingerprints and what the cleaning dropped
    test_examples.json   the held-out questions, as the run split them
    metrics.jsonl        one line per logged training step
    checkpoints/step-N/  adapter + optimizer state, every train.save_steps steps (auto: every 10 minutes)
    adapter_*            the adapter once training finished (or the full model's weights)
    metrics.json, summary.json, report.*   after `affiner evaluate`

Every command reads runs through `RunFolder`, so "is it finished", "does it have an adapter" and
"can these runs share one base" have one answer each.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from affiner.core.config import RunConfig, dump_config, validate_config
from affiner.core.yaml_input import parse_yaml
from affiner.core.errors import AffinerError, damaged
from affiner.core.files import (append_jsonl, being_written, has_writer, read_json, read_jsonl, sole_writer,
                                write_atomic, write_json, write_jsonl)
from affiner.core.templates import Example, Template, load_template, one_template, save_template

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
DATA_FILE = "data.json"
HELD_OUT_FILE = "test_examples.json"
LOG_FILE = "metrics.jsonl"
EVALUATION_FILE = "metrics.json"
SUMMARY_FILE = "summary.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # what peft writes (older versions: adapter_model.bin)
CHECKPOINTS = "checkpoints"
FINISHED = "finished"
FAILED = "failed"  # stopped by an error it explains (run.json "error"); resumable from its checkpoint


@dataclass(frozen=True)
class RunFolder:
    path: Path

    # ------------------------------------------------------------------------------------ finding runs

    @classmethod
    def create(cls, config: RunConfig) -> "RunFolder":
        """A new, empty run folder named after the config and the time; never an existing one."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        root = Path(config.output_dir)
        root.mkdir(parents=True, exist_ok=True)
        for attempt in range(100):
            folder = root / (f"{config.name}-{stamp}" + (f"-{attempt}" if attempt else ""))
            try:
                folder.mkdir()
                return cls(folder)
            except FileExistsError:
                continue
        raise AffinerError(f"could not create a new run folder under {root}.")

    @classmethod
    def open(cls, folder: str | Path) -> "RunFolder":
        """An existing run folder, or an error saying why the path is not one."""
        path = Path(folder)
        if not path.is_dir():
            raise AffinerError(f"run folder {folder} does not exist.")
        if not (path / RUN_FILE).is_file():
            raise AffinerError(f"{folder} is not an affiner run folder (no {RUN_FILE}).")
        return cls(path)

    @classmethod
    def latest(cls, output_dir: str | Path = "runs", say=print) -> "RunFolder | None":
        """The newest run that finished training; newer ones still training, stopped or failed are named
        and skipped (a command that picks "the latest run" must not pick a half-written one)."""
        # Newest by when training started, as `affiner runs` orders them: a folder's time changes with every
        # evaluation or export written into it, which would make an older run "the latest".
        runs = [cls(p) for p in Path(output_dir).glob("*/") if (p / RUN_FILE).is_file()]
        for run in sorted(runs, key=lambda r: (r.started, len(r.name), r.name), reverse=True):
            if run.is_finished:
                return run
            say(f"note: skipping {run.path} (status: {run.status}); name a run to use another one.")
        return None

    @classmethod
    def all_under(cls, root: Path) -> list["RunFolder"]:
        """Every run under `root`, oldest first (runs started in the same second in creation order)."""
        if not root.is_dir():
            raise AffinerError(f"{root} does not exist: no run has been written there yet (see --dir).")
        runs = [cls(p) for p in root.iterdir() if (p / RUN_FILE).is_file()]
        # create() suffixes later runs of the same second (-1, -2, ...), so shorter names came first.
        return sorted(runs, key=lambda r: (r.started, len(r.name), r.name))

    @property
    def name(self) -> str:
        return self.path.name

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------------------------ run.json

    def info(self) -> dict[str, Any]:
        return self._read(RUN_FILE)

    def _read(self, name: str, kind: type = dict) -> Any:
        """One of the run's JSON files, a `kind` (an object, or for the held-out rows a list); a damaged one (a
        crash of another tool, an edit) is named, not a traceback."""
        path = self.path / name
        try:
            data = read_json(path)
        except (ValueError, UnicodeDecodeError) as error:
            data, problem = None, f"not valid JSON: {error}"
        else:
            problem = None if isinstance(data, kind) else f"{_json_kind(data)} where {_json_kind(kind())} belongs"
        if problem:
            raise AffinerError(f"{path} is damaged ({problem}); restore it from a backup, or set this run aside "
                               f"(move {self.path} out of its folder).")
        return data

    def update(self, **fields: Any) -> None:
        current = self.info() if (self.path / RUN_FILE).is_file() else {}
        write_json(self.path / RUN_FILE, {**current, **fields})

    @property
    def started(self) -> str:
        """When training started ("" if run.json cannot be read: one broken run must not hide the others)."""
        try:
            return str(self.info().get("started", ""))
        except (OSError, AffinerError):
            return ""

    @property
    def status(self) -> str:
        try:
            return self.info().get("status", "unknown")
        except (OSError, AffinerError):
            return "unreadable"

    @property
    def is_finished(self) -> bool:
        return self.status == FINISHED

    def require_finished(self, then: str) -> "RunFolder":
        """This run, if it finished training; else an error that says how to finish it, then `then`."""
        self.info()  # a damaged run.json is named as such, not taken for an unfinished run
        if not self.is_finished:
            raise AffinerError(f"{self.path} has not finished training (status: {self.status}); "
                               f"{self.how_to_finish()}, then {then}.")
        return self

    def how_to_finish(self) -> str:
        """How to finish an unfinished run: from its last checkpoint, or, stopped before its first, from the start."""
        if self.last_checkpoint() is not None:
            return f"continue it from its last checkpoint with: affiner train --resume {self.path}"
        return (f"it stopped before its first checkpoint, so train it again (a new run): affiner train "
                f"{self.path / CONFIG_FILE}")

    @contextmanager
    def writing(self, command: str) -> Iterator[None]:
        """This process is the run folder's one writer while the block runs (training, an evaluation): see
        `core.files.sole_writer`."""
        with sole_writer(self.path, command):
            yield

    def require_writable(self, then: str) -> "RunFolder":
        """This run, if `then` could write into it now: checked before a long job (an evaluation), so that a
        read-only folder or another writer is said at once, not after the job. `writing` still takes the lock."""
        if not os.access(self.path, os.W_OK):
            raise AffinerError(f"{self.path} is read-only here, so {then} could not be written into it; make it "
                               "writable, or copy the run folder somewhere writable.")
        if self.has_writer():
            raise being_written(self.path)
        return self

    def has_writer(self) -> bool:
        """Whether a process is writing this run now; a run left "training" by a process that died has none."""
        return has_writer(self.path)

    # ------------------------------------------------------------------------------------ what the run used

    def config(self) -> RunConfig:
        path = self.path / CONFIG_FILE
        if not path.is_file():
            raise AffinerError(f"{self.path} is not an affiner run folder (no {CONFIG_FILE}).")
        return validate_config(parse_yaml(str(path), path.read_text(encoding="utf-8")), str(path))

    def save_config(self, config: RunConfig) -> None:
        write_atomic(self.path / CONFIG_FILE, dump_config(config))

    def template(self) -> Template:
        return load_template(self.path)

    def save_template(self, template: Template) -> None:
        save_template(template, self.path)

    def data_info(self) -> dict[str, Any]:
        return self._read(DATA_FILE) if (self.path / DATA_FILE).is_file() else {}

    def save_data_info(self, info: dict[str, Any]) -> None:
        write_json(self.path / DATA_FILE, info)

    def held_out(self) -> list[Example]:
        """The held-out questions the run split off (empty if it recorded none)."""
        path = self.path / HELD_OUT_FILE
        if not path.is_file():
            return []
        return [Example(**{**row, "history": tuple(tuple(turn) for turn in row.get("history", []))})
                for row in self._read(HELD_OUT_FILE, list)]

    def save_held_out(self, examples: Iterable[Example]) -> None:
        write_json(self.path / HELD_OUT_FILE, [e.__dict__ | {"history": list(e.history)} for e in examples])

    @property
    def has_held_out(self) -> bool:
        return (self.path / HELD_OUT_FILE).is_file()

    # ------------------------------------------------------------------------------------ what the run made

    def log(self) -> list[dict[str, Any]]:
        """The records of metrics.jsonl, in order (a line cut by an interrupted write is skipped)."""
        return read_jsonl(self.path / LOG_FILE)

    def append_log(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path / LOG_FILE, record)

    def truncate_log(self, step: int) -> None:
        """Forget what was logged after `step` (a resumed run logs those steps again, once)."""
        if (self.path / LOG_FILE).is_file():
            write_jsonl(self.path / LOG_FILE, [r for r in self.log() if r.get("step", 0) <= step])

    def evaluation(self) -> dict[str, Any] | None:
        """metrics.json of the latest evaluation, or None before any."""
        return self._read(EVALUATION_FILE) if (self.path / EVALUATION_FILE).is_file() else None

    def summary(self) -> dict[str, Any]:
        """summary.json of the latest evaluation (every answer, the headline counts), or {} before any."""
        return self._read(SUMMARY_FILE) if (self.path / SUMMARY_FILE).is_file() else {}

    @property
    def has_adapter(self) -> bool:
        return (self.path / ADAPTER_CONFIG).is_file()

    def checkpoints(self) -> list[Path]:
        return sorted((self.path / CHECKPOINTS).glob("step-??????"))

    def last_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def checkpoint_path(self, step: int) -> Path:
        return self.path / CHECKPOINTS / f"step-{step:06d}"

    @property
    def best_path(self) -> Path:
        """The weights of the best probed step so far (train.keep_best), until the run ends."""
        return self.path / CHECKPOINTS / "best"


def _json_kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "true or false", type(None): "null"}.get(
        type(value), "a number")


def base_key(config: RunConfig) -> tuple:
    """What runs must share to be compared on one base: the same weights, quantisation and prompt format."""
    return config.model.base, config.model.revision, config.quantization, config.data.template


def require_one_base(runs: list[RunFolder], purpose: str) -> list[RunConfig]:
    """The runs' configs, after checking that they share one base (the one rule every command applies)."""
    configs = [run.config() for run in runs]
    for run, config in zip(runs[1:], configs[1:]):
        if base_key(config) != base_key(configs[0]):
            raise AffinerError(f"{run.path} does not share the base model, quantisation and template of "
                               f"{runs[0].path}; {purpose}")
    one_template([(run.path, run.template()) for run in runs], purpose)
    return configs


def model_names(folders: list[Path]) -> list[str]:
    """"tuned" for one run, else each run folder's name (with its parent's when two names collide, or one is
    "base", the model without adapter)."""
    if len(folders) == 1:
        return ["tuned"]
    for name_of in (lambda f: f.name, lambda f: f"{f.parent.name}/{f.name}", lambda f: str(f.resolve())):
        names = [name_of(f) for f in folders]
        if len(set(names)) == len(names) and "base" not in names:  # "base" names the model without adapter
            return names
    return names


def require_adapter_weights(folder: Path) -> None:
    """An adapter folder holds its weights file: without it, peft would look for the folder's name on the Hub."""
    if not any((Path(folder) / name).is_file() for name in (ADAPTER_WEIGHTS, "adapter_model.bin")):
        raise damaged("LoRA adapter", Path(folder), FileNotFoundError(f"{ADAPTER_WEIGHTS} is missing"))
