"""Training data: read a source, turn each row into an `Example`, tokenise with response-only labels.

Sources: local JSON, JSONL, CSV and Parquet files, Hub datasets by name (`tatsu-lab/alpaca`), and
files shipped with affiner (`embedded:glossary-train.json`). Formats: alpaca (instruction, optional
input, output), qa (question, answer), conversations (role/content messages, including the nested
glossary layout). Rows that are empty or would be cut by `max_length` are counted and dropped,
never truncated silently: a truncated answer teaches the model to stop mid-sentence, or never.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import torch

from affiner.errors import AffinerError
from affiner.templates import Example, Template, encode_prompt, encode_response

FILE_SUFFIXES = {".json", ".jsonl", ".csv", ".parquet"}
IGNORE_INDEX = -100
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
    if path.suffix in FILE_SUFFIXES or source.startswith((".", "/", "~")) or path.exists():
        raise AffinerError(f"data file {source} does not exist.")
    return _read_hub(source, split)


def _read_file(path: Path, label: str) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path, label)
    text = _strict_utf8(path, label)
    if suffix == ".jsonl":
        return _read_jsonl(text, label)
    if suffix == ".json":
        return _read_json(text, label)
    if suffix == ".csv":
        return _read_csv(text, label)
    raise AffinerError(f"data file {label} has an unsupported type '{suffix}' (supported: "
                       f"{', '.join(sorted(FILE_SUFFIXES))}, or a Hub dataset name).")


def _strict_utf8(path: Path, label: str) -> str:
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

    from affiner.models import hub_error, hub_reachable

    if not hub_reachable():
        datasets.config.HF_HUB_OFFLINE = True  # read the local cache instead of retrying for a minute
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets wraps network, auth and missing-repo failures in many types
        raise hub_error("dataset", name, exc) from None
    return [(record, f"{name}[{split}] row {i}") for i, record in enumerate(dataset, start=1)]


# ---------------------------------------------------------------------------------------- formats


def detect_format(record: dict[str, Any]) -> str:
    keys = set(record)
    if keys & {"messages", "conversation", "conversations"}:
        return "conversations"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"question", "answer"} <= keys:
        return "qa"
    return ""


def to_examples(rows: list[Row], fmt: str = "auto", columns: dict[str, str] | None = None) -> list[Example]:
    """Canonical examples from rows; `columns` maps canonical names to the source's (`output: answer`)."""
    if not rows:
        return []
    rename = {source: canonical for canonical, source in (columns or {}).items()}
    rows = [({rename.get(k, k): v for k, v in record.items()}, where) for record, where in rows]
    if fmt == "auto":
        fmt = detect_format(rows[0][0])
        if not fmt:
            record, where = rows[0]
            raise AffinerError(f"cannot tell the format of {where} from its keys ({', '.join(map(str, record))}); "
                               "expected instruction/output (alpaca), question/answer (qa) or messages "
                               "(conversations). Set data.format, and data.columns to map your column names.")
    convert = {"alpaca": _from_alpaca, "qa": _from_qa, "conversations": _from_conversations}[fmt]
    return [example for record, where in rows for example in convert(record, where)]


def _field(record: dict[str, Any], key: str, where: str, required: bool = True) -> str:
    if key not in record or record[key] is None:
        if required:
            raise AffinerError(f"{where} has no '{key}' field (it has: {', '.join(map(str, record))}). "
                               f"Map your column with data.columns, e.g. {key}: your_column.")
        return ""
    value = record[key]
    if not isinstance(value, (str, int, float)):
        raise AffinerError(f"{where}: '{key}' must be text, not {type(value).__name__}.")
    return str(value)


def _from_alpaca(record: dict[str, Any], where: str) -> list[Example]:
    return [Example(instruction=_field(record, "instruction", where), input=_field(record, "input", where, False),
                    response=_field(record, "output", where), reference=_field(record, "reference", where, False),
                    source=where)]


def _from_qa(record: dict[str, Any], where: str) -> list[Example]:
    return [Example(instruction=_field(record, "question", where), response=_field(record, "answer", where),
                    reference=_field(record, "reference", where, False), source=where)]


def _from_conversations(record: dict[str, Any], where: str) -> list[Example]:
    """Plain `messages` records, or the glossary layout {acronym, ground_truth, conversation: [[...], ...]}."""
    key = next(k for k in ("messages", "conversation", "conversations") if k in record)
    value = record[key]
    nested = isinstance(value, list) and value and all(isinstance(c, list) for c in value)
    conversations = value if nested else [value]
    reference = _field(record, "ground_truth", where, required=False)
    group = _field(record, "acronym", where, required=False)
    examples = []
    for index, conversation in enumerate(conversations, start=1):
        at = f"{where} conversation {index}" if nested else where
        examples += _turns(_messages(conversation, at), at, reference, group)
    return examples


def _messages(conversation: Any, where: str) -> list[tuple[str, str]]:
    if not isinstance(conversation, list) or not conversation:
        raise AffinerError(f"{where}: a conversation must be a non-empty list of {{role, content}} messages.")
    messages = []
    for i, message in enumerate(conversation, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise AffinerError(f"{where} message {i} must be an object with 'role' and 'content'.")
        if message["role"] not in {"system", "user", "assistant"}:
            raise AffinerError(f"{where} message {i} has role '{message['role']}' "
                               "(expected system, user or assistant).")
        messages.append((message["role"], str(message["content"] or "")))
    return messages


def _turns(messages: list[tuple[str, str]], where: str, reference: str, group: str) -> list[Example]:
    """One example per assistant turn, each with the conversation before it as history."""
    examples = []
    for i, (role, content) in enumerate(messages):
        if role != "assistant":
            continue
        if i == 0 or messages[i - 1][0] != "user":
            raise AffinerError(f"{where}: assistant message {i + 1} must follow a user message.")
        examples.append(Example(instruction=messages[i - 1][1], response=content, history=tuple(messages[: i - 1]),
                                reference=reference, group=group, source=where))
    if not examples:
        raise AffinerError(f"{where}: the conversation has no assistant message to learn from.")
    return examples


# ---------------------------------------------------------------------------------------- tokens


@dataclass
class DataReport:
    read: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples_dropped: dict[str, list[str]] = field(default_factory=dict)

    def drop(self, reason: str, where: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        shown = self.examples_dropped.setdefault(reason, [])
        if len(shown) < 3:
            shown.append(where)

    def summary(self, name: str) -> str:
        reasons = ", ".join(f"{n} {reason} ({', '.join(self.examples_dropped[reason])}...)"
                            for reason, n in self.dropped.items())
        return f"{name}: read {self.read}, kept {self.kept}" + (f", dropped {reasons}" if reasons else "")


def tokenize(examples: list[Example], template: Template, tokenizer, max_length: int,
             report: DataReport | None = None, max_response_words: int | None = None) -> list[dict[str, list[int]]]:
    """Prompt + response ids; labels are -100 on the prompt, so the loss is on the response (and its EOS)."""
    from tqdm.auto import tqdm

    report = report if report is not None else DataReport()
    features = []
    for example in tqdm(examples, desc="tokenizing", unit="row", disable=len(examples) < 5000, leave=False):
        report.read += 1
        if not example.instruction.strip() or not example.response.strip():
            report.drop("empty", example.source)
            continue
        if max_response_words and len(example.response.split()) > max_response_words:
            report.drop(f"answers over {max_response_words} words", example.source)
            continue
        prompt = encode_prompt(template, tokenizer, example)
        response = encode_response(template, tokenizer, example)
        if len(prompt) + len(response) > max_length:
            report.drop(f"longer than max_length={max_length} tokens", example.source)
            continue
        features.append({"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response})
        report.kept += 1
    return features


def collate(features: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest row of this batch only (dynamic padding); padding is never supervised."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(features), width), dtype=torch.long)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        input_ids[row, :n] = torch.tensor(feature["input_ids"])
        labels[row, :n] = torch.tensor(feature["labels"])
        attention[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


# ---------------------------------------------------------------------------------------- splits


def split(examples: list[Example], test_size: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Seeded train/test split; examples sharing a group (one acronym's paraphrases) stay together."""
    groups: dict[str, list[Example]] = {}
    for i, example in enumerate(examples):
        groups.setdefault(example.group or f"#{i}", []).append(example)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n_test = int(test_size) if test_size >= 1 else max(1, round(len(keys) * test_size))
    if n_test >= len(keys):
        raise AffinerError(f"data.test_size={test_size} leaves nothing to train on ({len(keys)} groups of rows).")
    test_keys = set(keys[:n_test])
    train = [e for k in keys if k not in test_keys for e in groups[k]]
    test = [e for k in keys if k in test_keys for e in groups[k]]
    return train, test


def fingerprint(examples: Iterable[Example]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps(asdict(example), sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()


def load_splits(data_config) -> tuple[list[Example], list[Example], dict[str, Any]]:
    """Train and held-out examples as the config describes them, with where they came from."""
    train = to_examples(read_rows(data_config.train, data_config.split), data_config.format, data_config.columns)
    if data_config.max_rows:
        train = train[: data_config.max_rows]
    if data_config.test:
        test = to_examples(read_rows(data_config.test, data_config.split), data_config.format, data_config.columns)
        origin = data_config.test
    else:
        train, test = split(train, data_config.test_size, data_config.seed)
        origin = f"{data_config.test_size} of {data_config.train} held out with seed {data_config.seed}"
    if not train:
        raise AffinerError(f"{data_config.train} holds no training rows.")
    info = {"train": {"source": data_config.train, "examples": len(train), "sha256": fingerprint(train)},
            "test": {"source": origin, "examples": len(test), "sha256": fingerprint(test)},
            "groups_on_both_sides": len({e.group for e in train if e.group} & {e.group for e in test if e.group}),
            "format": data_config.format, "template": data_config.template}
    return train, test, info
