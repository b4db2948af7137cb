"""Turn rows of any supported format into canonical `Example`s.

Formats: alpaca (instruction, optional input, output), qa (question, answer), conversations
(role/content messages, including the nested glossary layout {acronym, ground_truth,
conversation: [[...], ...]}). `data.columns` maps a source's column names to the canonical ones.
"""

from __future__ import annotations

import difflib
import sys
from typing import Any

from affiner.core.errors import AffinerError
from affiner.core.templates import Example
from affiner.data.parse import Row


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
    _check_column_names(columns or {})
    rename = {source: canonical for canonical, source in (columns or {}).items()}
    rows = [({rename.get(k, k): v for k, v in record.items()}, where) for record, where in rows]
    _note_unread_columns(rows[0])
    if fmt == "auto":
        fmt = detect_format(rows[0][0])
        if not fmt:
            record, where = rows[0]
            raise AffinerError(f"cannot tell the format of {where} from its keys ({', '.join(map(str, record))}); "
                               "expected instruction/output (alpaca), question/answer (qa) or messages "
                               "(conversations). Set data.format, and data.columns to map your column names.")
    convert = {"alpaca": _from_alpaca, "qa": _from_qa, "conversations": _from_conversations}[fmt]
    return [example for record, where in rows for example in convert(record, where)]


# Every field a row can give, by its canonical name: what data.columns may map a column to.
FIELDS = ("instruction", "input", "output", "question", "answer", "messages", "conversation", "conversations",
          "reference", "key", "group", "history", "ground_truth", "acronym")


def _note_unread_columns(row: Row) -> None:
    """Say so when a column that is not read looks like a misspelt field (`groupe` for `group`): extra columns are
    fine, but that one would be ignored, and with it the grouped split or the input."""
    record, where = row
    for column in record:
        close = difflib.get_close_matches(str(column).strip().lower(), FIELDS, n=1, cutoff=0.8)
        if column not in FIELDS and close:
            print(f"note: {where.rsplit(':', 1)[0]} has a column '{column}' that affiner does not read; if it is "
                  f"the '{close[0]}' field, map it with data.columns: {{{close[0]}: {column}}} or rename it.",
                  file=sys.stderr)


def _check_column_names(columns: dict[str, str]) -> None:
    """data.columns maps only fields affiner reads: a typo there (`gruop: topic`) would be ignored, and with it the
    grouped split."""
    unknown = [name for name in columns if name not in FIELDS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], FIELDS, n=1)
        raise AffinerError(f"data.columns: '{unknown[0]}' is no field affiner reads"
                           + (f", did you mean '{close[0]}'?" if close else "") + f" (fields: {', '.join(FIELDS)}; "
                           "write field: your_column).")


def check_mapped_columns(rows: list[Row], columns: dict[str, str]) -> None:
    """Each column data.columns names is in the (training) data: a misspelt optional one (`group: topicz`) would
    otherwise be read as absent. A held-out file may lack an optional column the training data has."""
    _check_column_names(columns)  # a misspelt field first: its column may well be there
    present = set().union(*(record.keys() for record, _ in rows))
    missing = [(name, column) for name, column in columns.items() if column not in present]
    if missing and rows:
        name, column = missing[0]
        raise AffinerError(f"data.columns.{name} names the column '{column}', which no row of the data has (the "
                           f"first row, {rows[0][1]}, has: {', '.join(map(str, rows[0][0]))[:300]}).")


def _field(record: dict[str, Any], key: str, where: str, required: bool = True) -> str:
    if key not in record:
        if required:
            raise AffinerError(f"{where} has no '{key}' field (it has: {', '.join(map(str, record))}). "
                               f"Map your column with data.columns, e.g. {key}: your_column.")
        return ""
    return text_of(record[key], f"{where}: '{key}'", required)


def text_of(value: Any, what: str, required: bool = True) -> str:
    """A cell as text, refusing anything else: a number or a list turned into text by str() would train
    the model on "42.0", "nan" or "['a']" that nobody wrote. An optional cell may be null (empty)."""
    if isinstance(value, str):
        if "\x00" in value:  # JSON's \u0000: valid JSON, but no text; reports holding it read as binary files
            raise AffinerError(f"{what} holds a NUL character (\\u0000), which is no text (a binary value, a "
                               "bad export?): remove it.")
        return value
    if value is None and not required:
        return ""
    raise AffinerError(f"{what} must be text, not {_not_text(value)}.")


def _not_text(value: Any) -> str:
    """What the value is, and what to write instead."""
    if value is None:
        return 'null: write "" for an empty text (the row is then dropped and counted), or remove the row'
    if isinstance(value, bool):
        return f'{str(value).lower()}: quote it ("{str(value).lower()}") if it is meant as text'
    if isinstance(value, float) and value != value:
        return 'NaN, a missing value (pandas writes it for an empty cell): write "" or remove the row'
    if isinstance(value, (int, float)):
        number = repr(value)[:40]
        return f'the number {number}: quote it ("{number}") if it is meant as text'
    if isinstance(value, list):
        return "a list: write the text itself as one string (join the parts of a multi-part message)"
    if isinstance(value, dict):
        return "an object: write the text itself as one string, or map the column holding it with data.columns"
    return f"{type(value).__name__}: write it as a string"


def _from_alpaca(record: dict[str, Any], where: str) -> list[Example]:
    return [Example(instruction=_field(record, "instruction", where), input=_field(record, "input", where, False),
                    response=_field(record, "output", where), **_optional(record, where))]


def _from_qa(record: dict[str, Any], where: str) -> list[Example]:
    return [Example(instruction=_field(record, "question", where), response=_field(record, "answer", where),
                    **_optional(record, where))]


def _optional(record: dict[str, Any], where: str) -> dict[str, Any]:
    """reference, its key part, group (map a column to `group` for a grouped split) and earlier turns (prepared
    files)."""
    history = record.get("history") or []
    return {"reference": _field(record, "reference", where, False), "key": _field(record, "key", where, False),
            "group": _field(record, "group", where, False),
            "history": tuple(_messages(history, where)) if history else (), "source": where}


def _from_conversations(record: dict[str, Any], where: str) -> list[Example]:
    """Plain `messages` records, or the glossary layout {acronym, ground_truth, conversation: [[...], ...]}."""
    key = next(k for k in ("messages", "conversation", "conversations") if k in record)
    value = record[key]
    nested = isinstance(value, list) and value and all(isinstance(c, list) for c in value)
    conversations = value if nested else [value]
    reference = _field(record, "ground_truth", where, required=False)
    group = _field(record, "acronym", where, required=False)
    key = _field(record, "key", where, required=False)
    examples = []
    for index, conversation in enumerate(conversations, start=1):
        at = f"{where} conversation {index}" if nested else where
        examples += _turns(_messages(conversation, at), at, reference, group, key)
    return examples


def _messages(conversation: Any, where: str) -> list[tuple[str, str]]:
    if not isinstance(conversation, list) or not conversation:
        raise AffinerError(f"{where}: a conversation must be a non-empty list of {{role, content}} messages.")
    messages = []
    for i, message in enumerate(conversation, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise AffinerError(f"{where} message {i} must be an object with 'role' and 'content'.")
        role = message["role"]
        if not isinstance(role, str) or role not in {"system", "user", "assistant"}:
            raise AffinerError(f"{where} message {i} has role {repr(role)[:80]} "
                               "(expected system, user or assistant).")
        messages.append((role, text_of(message["content"], f"{where} message {i}: 'content'")))
    return messages


def _turns(messages: list[tuple[str, str]], where: str, reference: str, group: str, key: str = "") -> list[Example]:
    """One example per assistant turn, each with the conversation before it as history."""
    examples = []
    for i, (role, content) in enumerate(messages):
        if role != "assistant":
            continue
        if i == 0 or messages[i - 1][0] != "user":
            raise AffinerError(f"{where}: assistant message {i + 1} must follow a user message.")
        examples.append(Example(instruction=messages[i - 1][1], response=content, history=tuple(messages[: i - 1]),
                                reference=reference, key=key, group=group, source=where))
    if not examples:
        raise AffinerError(f"{where}: the conversation has no assistant message to learn from.")
    return examples


