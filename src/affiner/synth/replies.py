"""Reading a model's reply: the conversations it holds, each checked (roles, the definition word for
word in every answer) and de-duplicated by question; what is unusable is dropped and counted."""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

from affiner.data.ledger import Ledger
from affiner.synth.terms import Conversation

_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.IGNORECASE | re.DOTALL)
_FENCE = re.compile(r"```[a-zA-Z]*\s*(.*?)(?:```|\Z)", re.DOTALL)


def parse_conversations(text: str) -> list[Any] | None:
    """The reply's list of conversations, not yet checked; None when it holds no JSON list."""
    text = _THINK.sub("", text).strip()
    fenced = _FENCE.search(text)
    if fenced:
        text = fenced.group(1).strip()
    data = _loads(text)
    if data is None and "[" in text and "]" in text:
        data = _loads(text[text.index("["): text.rindex("]") + 1])  # prose around the list
    if isinstance(data, dict):  # {"conversations": [...]}: the list under the one key that holds one
        lists = [value for value in data.values() if isinstance(value, list)]
        data = lists[0] if len(lists) == 1 else None
    if not isinstance(data, list):
        return None
    if data and all(isinstance(item, dict) and "role" in item for item in data):
        return [data]  # a single conversation, not wrapped in a list
    return data


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


_TYPOGRAPHY = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})


def _normal(text: str) -> str:
    """Case, spacing and curly quotes do not matter; accents do (they change French words)."""
    return " ".join(text.casefold().translate(_TYPOGRAPHY).split())


def question_key(text: str) -> str:
    """Two questions differing only in case, spacing or punctuation are the same question."""
    kept = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.casefold())
    return " ".join(kept.split())


def check_conversation(conversation: Any, definition: str) -> tuple[Conversation | None, str | None]:
    """(the cleaned conversation, None), or (None, the reason it is unusable)."""
    if not isinstance(conversation, list) or not conversation:
        return None, "not a list of messages"
    messages = []
    for message in conversation:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            return None, "not a list of messages"
        messages.append({"role": message["role"].strip().lower(), "content": message["content"].strip()})
    roles = [m["role"] for m in messages]
    if len(roles) % 2 or roles != ["user", "assistant"] * (len(roles) // 2):
        return None, "wrong roles"
    if not all(m["content"] for m in messages):
        return None, "empty message"
    wanted = _normal(definition)
    if any(wanted not in _normal(m["content"]) for m in messages if m["role"] == "assistant"):
        return None, "definition missing"
    # A question that gives the answer away ("does WHO stand for World Health Organization?") teaches nothing,
    # and held out it measures copying, not recall.
    if any(wanted in _normal(m["content"]) for m in messages if m["role"] == "user"):
        return None, "question holds the definition"
    return messages, None


def accept_reply(text: str, definition: str, seen: set[str], drops: Ledger | None = None,
                 where: str = "") -> list[Conversation]:
    """The reply's valid conversations whose question is not in `seen` (which they are added to).

    What is dropped goes into `drops`, its row being `where` ("WHO (en)").
    """
    drops = drops if drops is not None else Ledger()
    candidates = parse_conversations(text)
    if candidates is None:
        drops.drop(where, "broken JSON")
        return []
    kept = []
    for candidate in candidates:
        conversation, reason = check_conversation(candidate, definition)
        if conversation is None:
            drops.drop(where, reason or "invalid")
            continue
        key = question_key(conversation[0]["content"])
        if key in seen:
            drops.drop(where, "duplicate question")
            continue
        seen.add(key)
        kept.append(conversation)
    return kept
