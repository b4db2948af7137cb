"""Training data: read a source, turn each row into an `Example`, tokenise with response-only labels.

Sources: local JSON, JSONL, CSV and Parquet files, Hub datasets by name (`tatsu-lab/alpaca`), and
files shipped with affiner (`embedded:glossary-train.json`). Formats: alpaca (instruction, optional
input, output), qa (question, answer), conversations (role/content messages, including the nested
glossary layout). Rows that are empty or would be cut by `max_length` are counted and dropped,
never truncated silently: a truncated answer teaches the model to stop mid-sentence, or never.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import torch

from affiner.errors import AffinerError
from affiner.templates import Example, Template, encode_prompt, encode_response, render_prompt

FILE_SUFFIXES = {".json", ".jsonl", ".csv", ".parquet"}
IGNORE_INDEX = -100
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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    if key not in record:
        if required:
            raise AffinerError(f"{where} has no '{key}' field (it has: {', '.join(map(str, record))}). "
                               f"Map your column with data.columns, e.g. {key}: your_column.")
        return ""
    value = record[key]
    if value is None:  # a null cell (common in Parquet and Hub datasets) is an empty field, counted when dropped
        return ""
    if not isinstance(value, (str, int, float)):
        raise AffinerError(f"{where}: '{key}' must be text, not {type(value).__name__}.")
    return str(value)


def _from_alpaca(record: dict[str, Any], where: str) -> list[Example]:
    return [Example(instruction=_field(record, "instruction", where), input=_field(record, "input", where, False),
                    response=_field(record, "output", where), **_optional(record, where))]


def _from_qa(record: dict[str, Any], where: str) -> list[Example]:
    return [Example(instruction=_field(record, "question", where), response=_field(record, "answer", where),
                    **_optional(record, where))]


def _optional(record: dict[str, Any], where: str) -> dict[str, Any]:
    """reference, group (map a column to `group` for a grouped split) and earlier turns (prepared files)."""
    history = record.get("history") or []
    return {"reference": _field(record, "reference", where, False), "group": _field(record, "group", where, False),
            "history": tuple(_messages(history, where)) if history else (), "source": where}


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


def token_lengths(examples: list[Example], template: Template, tokenizer, batch_size: int = 4096) -> list[int]:
    """len(encode_prompt) + len(encode_response) for every example, tokenised in batches (100k rows in seconds)."""
    from tqdm.auto import tqdm

    if template.is_chat:  # the chat template renders each conversation apart; no batch shortcut
        return [len(encode_prompt(template, tokenizer, e)) + len(encode_response(template, tokenizer, e))
                for e in tqdm(examples, desc="counting tokens", unit="row", disable=len(examples) < 5000, leave=False)]
    lengths = []
    bos = tokenizer.bos_token
    with _parallel_tokenizer():
        for start in tqdm(range(0, len(examples), batch_size), desc="counting tokens", unit="batch",
                          disable=len(examples) < 5 * batch_size, leave=False):
            chunk = examples[start: start + batch_size]
            prompts = [render_prompt(template, e) for e in chunk]
            # Same rule as encode_prompt: special tokens (BOS) are added unless the text already starts with BOS.
            has_bos = [bool(bos) and p.startswith(bos) for p in prompts]
            counted = {flag: iter(_count_tokens(tokenizer, [p for p, b in zip(prompts, has_bos) if b == flag],
                                                add_special_tokens=not flag)) for flag in (False, True)}
            responses = _count_tokens(tokenizer, [template.response_prefix + e.response for e in chunk], False)
            # + 1: the EOS that encode_response appends.
            lengths += [next(counted[flag]) + n + 1 for flag, n in zip(has_bos, responses)]
    return lengths


def _count_tokens(tokenizer, texts: list[str], add_special_tokens: bool) -> list[int]:
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a Python (slow) tokenizer
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]
    # The Rust tokenizer directly, without offsets: a third of the time of the transformers wrapper.
    return [len(encoding.ids) for encoding in backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]


@contextlib.contextmanager
def _parallel_tokenizer():
    """Let the Rust tokenizer use every core for one batch job, then restore the setting (forks stay safe)."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


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
    for e in examples:  # fields listed by hand: dataclasses.asdict takes seconds on 100k rows
        fields = [e.instruction, e.response, e.input, e.history, e.reference, e.group, e.source]
        digest.update(json.dumps(fields, ensure_ascii=False).encode())
    return digest.hexdigest()
