"""Turn rows of any supported format into canonical `Example`s.

Formats: alpaca (instruction, optional input, output), qa (question, answer), conversations
(role/content messages, including the nested glossary layout {acronym, ground_truth,
conversation: [[...], ...]}). `data.columns` maps a source's column names to the canonical ones.
"""

from __future__ import annotations

from typing import Any

from affiner.core.errors import AffinerError
from affiner.core.templates import Example
from affiner.data.read import Row


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


