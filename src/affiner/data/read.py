"""Read training data from any source into rows: (record, where it came from).

Sources: local JSON, JSONL, CSV and Parquet files, Hub datasets by name (`tatsu-lab/alpaca`), files
shipped with affiner (`embedded:glossary-train.json`) and folders written by `affiner prepare`. A
malformed file stops with its file and line: silently losing rows is worse than a clear stop.
"""

from __future__ import annotations

import csv
import io
import json
from importlib import resources
from pathlib import Path
from typing import Any

from affiner.core.errors import AffinerError
from affiner.core.files import file_sha256

FILE_SUFFIXES = {".json", ".jsonl", ".csv", ".parquet"}
PREPARED_FILE = "prepared.json"  # written by `affiner prepare` beside train.jsonl and test.jsonl
Row = tuple[dict[str, Any], str]  # a record and where it came from ("file.jsonl:12")


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
    if path.suffix in FILE_SUFFIXES or source.startswith((".", "/", "~")) or path.exists():
        raise AffinerError(f"data file {source} does not exist.")
    return _read_hub(source, split)


def read_test_rows(source: str) -> list[Row]:
    """Held-out rows named on the command line: a file, a Hub dataset, or a prepared folder's test split."""
    return read_rows(source, "test" if is_prepared(source) else "train")


def is_prepared(source: str | None) -> bool:
    """A folder written by `affiner prepare`: its train/test files behave like a dataset's splits."""
    return bool(source) and (Path(source).expanduser() / PREPARED_FILE).is_file()


def _read_prepared(folder: Path, split: str) -> list[Row]:
    manifest = json.loads((folder / PREPARED_FILE).read_text(encoding="utf-8"))
    files = manifest.get("files", {})
    name = f"{split}.jsonl"
    if name not in files:
        raise AffinerError(f"{folder} (prepared by affiner prepare) has no '{split}' split; it has "
                           f"{', '.join(f.removesuffix('.jsonl') for f in files) or 'none'}.")
    path = folder / name
    if not path.is_file() or file_sha256(path) != files[name]["sha256"]:
        raise AffinerError(f"{path} is missing or was changed after affiner prepare wrote it (its sha256 differs "
                           f"from {folder / PREPARED_FILE}); run affiner prepare again so that the data card and "
                           "the fingerprint describe what you train on.")
    return _read_file(path, label=str(path))


def _read_file(path: Path, label: str) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path, label)
    text = strict_utf8(path, label)
    if suffix == ".jsonl":
        return _read_jsonl(text, label)
    if suffix == ".json":
        return _read_json(text, label)
    if suffix == ".csv":
        return _read_csv(text, label)
    raise AffinerError(f"data file {label} has an unsupported type '{suffix}' (supported: "
                       f"{', '.join(sorted(FILE_SUFFIXES))}, or a Hub dataset name).")


def strict_utf8(path: Path, label: str) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise AffinerError(f"{label}:{line} is not valid UTF-8 (byte 0x{raw[exc.start]:02x}); re-save the "
                           "file as UTF-8.") from None


def _read_jsonl(text: str, label: str) -> list[Row]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AffinerError(f"{label}:{number} is not valid JSON: {exc.msg} (column {exc.colno}).") from None
        rows.append((_as_record(record, f"{label}:{number}"), f"{label}:{number}"))
    return rows


def _read_json(text: str, label: str) -> list[Row]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AffinerError(f"{label}:{exc.lineno} is not valid JSON: {exc.msg} (column {exc.colno}).") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise AffinerError(f"{label} must hold a JSON list of records (or {{\"data\": [...]}}), "
                           f"not a {type(data).__name__}.")
    return [(_as_record(item, f"{label} item {i}"), f"{label} item {i}") for i, item in enumerate(data, 1)]


def _as_record(item: Any, where: str) -> dict[str, Any]:
    if isinstance(item, list):  # a bare conversation: [{role, content}, ...]
        return {"messages": item}
    if not isinstance(item, dict):
        raise AffinerError(f"{where} must be a JSON object (or a list of messages), not {type(item).__name__}.")
    return item


def _read_csv(text: str, label: str) -> list[Row]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise AffinerError(f"{label} is empty: a CSV file needs a header row.")
    rows = []
    try:
        for record in reader:
            if None in record:
                raise AffinerError(f"{label}:{reader.line_num} has more fields than the header "
                                   f"({', '.join(reader.fieldnames)}).")
            rows.append((dict(record), f"{label}:{reader.line_num}"))
    except csv.Error as exc:
        raise AffinerError(f"{label}:{reader.line_num} is not valid CSV: {exc}.") from None
    return rows


def _read_parquet(path: Path, label: str) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
        raise AffinerError(f"{label} is not a readable Parquet file: {exc}.") from None
    return [(record, f"{label} row {i}") for i, record in enumerate(table.to_pylist(), start=1)]


def _read_hub(name: str, split: str) -> list[Row]:
    import datasets

    from affiner.core.models import hub_error, hub_reachable

    if not hub_reachable():
        datasets.config.HF_HUB_OFFLINE = True  # read the local cache instead of retrying for a minute
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets wraps network, auth and missing-repo failures in many types
        raise hub_error("dataset", name, exc) from None
    return [(record, f"{name}[{split}] row {i}") for i, record in enumerate(dataset, start=1)]


