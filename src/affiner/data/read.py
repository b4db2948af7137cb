"""Read training data from any source into rows: (record, where it came from).

Sources: local JSON, JSONL, CSV and Parquet files, Hub datasets by name (`tatsu-lab/alpaca`), files
shipped with affiner (`embedded:glossary-train.json`) and folders written by `affiner prepare`. A
malformed file stops with its file and line (parse.py). In a columnar table (Parquet, a Hub dataset)
a null cell is how an empty cell is written, so it reads as ""; a null typed into JSON is refused later.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from affiner.core.errors import AffinerError
from affiner.core.files import file_sha256
from affiner.data.parse import Row, read_csv, read_json, read_jsonl, strict_utf8

__all__ = ["Row", "read_rows", "read_test_rows", "is_prepared", "strict_utf8"]

FILE_SUFFIXES = {".json", ".jsonl", ".csv", ".parquet"}
PREPARED_FILE = "prepared.json"  # written by `affiner prepare` beside train.jsonl and test.jsonl


# ---------------------------------------------------------------------------------------- reading


def read_rows(source: str, split: str = "train") -> list[Row]:
    if source.startswith("embedded:"):
        name = source.removeprefix("embedded:")
        shipped = resources.files("affiner") / "resources" / name
        if not shipped.is_file():
            available = sorted(p.name for p in (resources.files("affiner") / "resources").iterdir())
            raise AffinerError(f"no embedded data file '{name}'. Embedded files: {', '.join(available)}.")
        with resources.as_file(shipped) as path:
            return _read_file(path, label=source)
    path = Path(source).expanduser()
    if path.is_file():
        return _read_file(path, label=str(path))
    if is_prepared(source):
        return _read_prepared(path, split)
    if path.is_dir():
        raise AffinerError(f"data file {source} is a folder, and not one written by affiner prepare (it holds no "
                           f"{PREPARED_FILE}): name a JSON, JSONL, CSV or Parquet file in it.")
    if path.exists() or path.is_symlink():
        what = "is not a regular file" if path.exists() else "is a symbolic link to nothing (a loop, or a missing target)"
        raise AffinerError(f"data file {source} {what}: name a JSON, JSONL, CSV or Parquet file.")
    if path.suffix in FILE_SUFFIXES or source.startswith((".", "/", "~")):
        raise AffinerError(f"data file {source} does not exist.")
    return _read_hub(source, split)


def read_test_rows(source: str) -> list[Row]:
    """Held-out rows named on the command line: a file, a Hub dataset, or a prepared folder's test split."""
    return read_rows(source, "test" if is_prepared(source) else "train")


def is_prepared(source: str | None) -> bool:
    """A folder written by `affiner prepare`: its train/test files behave like a dataset's splits."""
    return bool(source) and (Path(source).expanduser() / PREPARED_FILE).is_file()


def _read_prepared(folder: Path, split: str) -> list[Row]:
    files = _prepared_files(folder)
    name = f"{split}.jsonl"
    if name not in files:
        raise AffinerError(f"{folder} (prepared by affiner prepare) has no '{split}' split; it has "
                           f"{', '.join(f.removesuffix('.jsonl') for f in files) or 'none'}.")
    path = folder / name
    if not path.is_file() or file_sha256(path) != files[name]:
        raise AffinerError(f"{path} is missing or was changed after affiner prepare wrote it (its sha256 differs "
                           f"from {folder / PREPARED_FILE}); run affiner prepare again so that the data card and "
                           "the fingerprint describe what you train on.")
    return _read_file(path, label=str(path))


def _prepared_files(folder: Path) -> dict[str, str]:
    """The files listed in a prepared folder's manifest, by name, with their sha256."""
    manifest_path = folder / PREPARED_FILE
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
        return {name: entry["sha256"] for name, entry in files.items() if isinstance(entry["sha256"], str)}
    except (OSError, ValueError, LookupError, TypeError, AttributeError) as exc:
        raise AffinerError(f"{manifest_path} is damaged ({type(exc).__name__}: {str(exc)[:120]}); it is what "
                           f"affiner prepare wrote to describe its files: run affiner prepare again to write "
                           f"{folder} anew.") from None


def _read_file(path: Path, label: str) -> list[Row]:
    suffix = path.suffix.lower()
    readers = {".parquet": _read_parquet, ".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv}
    if suffix not in readers:
        raise AffinerError(f"data file {label} has an unsupported type '{suffix}' (supported: "
                           f"{', '.join(sorted(FILE_SUFFIXES))}, or a Hub dataset name).")
    return readers[suffix](path, label)


def _read_parquet(path: Path, label: str) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
        raise AffinerError(f"{label} is not a readable Parquet file: {exc}.") from None
    return [(_nulls_as_empty(record), f"{label} row {i}") for i, record in enumerate(table.to_pylist(), start=1)]


def _read_hub(name: str, split: str) -> list[Row]:
    import datasets

    from affiner.core.hub import hub_error, hub_reachable

    if not hub_reachable():
        datasets.config.HF_HUB_OFFLINE = True  # read the local cache instead of retrying for a minute
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets wraps network, auth and missing-repo failures in many types
        raise hub_error("dataset", name, exc) from None
    return [(_nulls_as_empty(record), f"{name}[{split}] row {i}") for i, record in enumerate(dataset, start=1)]


def _nulls_as_empty(record: dict[str, Any]) -> dict[str, Any]:
    return {key: "" if value is None else value for key, value in record.items()}


