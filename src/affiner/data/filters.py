"""The cleaning filters: each takes rows and returns (kept, dropped with a reason)."""

from __future__ import annotations

import re
import string
import unicodedata

from affiner.core.errors import AffinerError
from affiner.core.stopping import marker_at
from affiner.core.templates import Example
from affiner.data.ledger import Dropped


def normalized(text: str) -> str:
    """Case, accents' composition, spacing and punctuation removed: "Hello,  World!" == "hello world"."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = text.translate(_PUNCTUATION)
    return " ".join(text.split())


_PUNCTUATION = str.maketrans("", "", string.punctuation + "«»“”‘’…¿¡")


def question_key(example: Example, normalize: bool = True) -> str:
    parts = [*(f"{role}:{content}" for role, content in example.history), example.instruction, example.input]
    return "\x1f".join(normalized(p) if normalize else p for p in parts)


def drop_empty(examples: list[Example], held_out: bool = False) -> tuple[list[Example], Dropped]:
    """Rows without a question, or without an answer to train on; `held_out` rows need only something to hold
    an answer against: their answer or their reference."""
    kept, dropped = [], []
    for e in examples:
        if not e.instruction.strip():
            dropped.append((e, "empty question"))
        elif not (e.expected if held_out else e.response).strip():
            dropped.append((e, "no answer or reference to hold the answers against" if held_out else "empty answer"))
        else:
            kept.append(e)
    return kept, dropped


def drop_duplicates(examples: list[Example], mode: str) -> tuple[list[Example], Dropped]:
    """Keep the first of identical (question, answer) pairs; `normalized` also catches case/space/punctuation twins."""
    if mode == "none":
        return examples, []
    seen: dict[str, str] = {}
    kept, dropped = [], []
    for e in examples:
        exact = question_key(e, normalize=False) + "\x1e" + e.response
        key = exact if mode == "exact" else question_key(e) + "\x1e" + normalized(e.response)
        if key in seen:
            kind = "exact duplicate" if exact == seen[key] else "near duplicate (case, spaces, punctuation)"
            dropped.append((e, kind))
        else:
            seen[key] = exact
            kept.append(e)
    return kept, dropped


def drop_long_answers(examples: list[Example], max_words: int | None) -> tuple[list[Example], Dropped]:
    if not max_words:
        return examples, []
    reason = f"answer over {max_words} words"
    kept = [e for e in examples if len(e.response.split()) <= max_words]
    return kept, [(e, reason) for e in examples if len(e.response.split()) > max_words]


def drop_new_turns(examples: list[Example], markers: tuple[str, ...]) -> tuple[list[Example], Dropped]:
    """Answers to train on that open a new turn of the template (a line starting "### Question:"): generation
    cuts an answer there, so the model would learn to write what nobody ever reads."""
    kept, dropped = [], []
    for e in examples:
        at = marker_at(e.response, markers)
        if at is None:
            kept.append(e)
        else:
            marker = next(m for m in markers if e.response.startswith(m, at))
            dropped.append((e, f"answer starts a line with the template's {marker!r}, where answers are cut"))
    return kept, dropped


def drop_by_pattern(examples: list[Example], keep: str | None, drop: str | None) -> tuple[list[Example], Dropped]:
    keep_re, drop_re = (re.compile(p) if p else None for p in (keep, drop))
    kept, dropped = [], []
    for e in examples:
        text = f"{e.instruction}\n{e.input}\n{e.response}"
        if keep_re and not keep_re.search(text):
            dropped.append((e, f"does not match keep_matching {keep!r}"))
        elif drop_re and drop_re.search(text):
            dropped.append((e, f"matches drop_matching {drop!r}"))
        else:
            kept.append(e)
    return kept, dropped


def drop_other_languages(examples: list[Example], languages: list[str] | None) -> tuple[list[Example], Dropped]:
    if not languages:
        return examples, []
    from py3langid.langid import _get_identifier

    identifier = _get_identifier()
    unknown = sorted(set(languages) - set(identifier.nb_classes))
    if unknown:
        raise AffinerError(f"data.languages: {', '.join(unknown)} is not a language code the detector knows "
                           f"(ISO 639-1 codes such as en, fr, de, es; known: {', '.join(identifier.nb_classes)}).")
    kept, dropped = [], []
    for e in examples:
        language, _ = identifier.classify(f"{e.instruction}\n{e.input}\n{e.response}")
        if language in languages:
            kept.append(e)
        else:
            dropped.append((e, f"language {language} not in {', '.join(languages)}"))
    return kept, dropped


# Rows up to this many times the certain bound are still tokenised: the length histogram then shows how far
# over max_length a data set's long rows go, and only absurd rows (a whole book in one cell) skip counting.
LENGTH_MARGIN = 4


def drop_too_many_characters(examples: list[Example], max_length: int, chars_per_token: int,
                             chat: bool, limit_name: str | None = None) -> tuple[list[Example], Dropped]:
    """Rows certainly over max_length tokens, told by their length alone, before anything copies, normalises or
    tokenises them (a 50 MB cell would take gigabytes there). `chars_per_token`: the most characters a token
    of this tokenizer stands for. A chat template may trim each message and drop earlier turns, so only the
    trimmed question and answer count there."""
    limit = LENGTH_MARGIN * max_length * chars_per_token
    reason = f"over {limit_name or f'max_length={max_length} tokens'} (over {limit} characters, not tokenised)"
    kept, dropped = [], []
    for e in examples:
        texts = (e.instruction, e.response) if chat else (e.instruction, e.input, e.response)
        if sum(len(text.strip()) for text in texts) > limit:
            dropped.append((e, reason))
        else:
            kept.append(e)
    return kept, dropped


def drop_too_many_tokens(examples: list[Example], lengths: list[int], max_length: int) -> tuple[list[Example], Dropped]:
    reason = f"over max_length={max_length} tokens (prompt + answer)"
    kept = [e for e, n in zip(examples, lengths) if n <= max_length]
    return kept, [(e, reason) for e, n in zip(examples, lengths) if n > max_length]


EXACT_OVERLAP = "question word for word in the run's training set"
NORMALISED_OVERLAP = "question in the run's training set up to case, spacing and punctuation"


def training_overlap(test: list[Example], train: list[Example]) -> Dropped:
    """Held-out rows whose question (with its input and earlier turns) the model trained on, word for word
    (EXACT_OVERLAP) or once case, spacing and punctuation are set aside (NORMALISED_OVERLAP)."""
    exact, loose = {question_key(e, normalize=False) for e in train}, {question_key(e) for e in train}
    found = []
    for example in test:
        if question_key(example, normalize=False) in exact:
            found.append((example, EXACT_OVERLAP))
        elif question_key(example) in loose:
            found.append((example, NORMALISED_OVERLAP))
    return found


def drop_overlap(test: list[Example], train: list[Example]) -> tuple[list[Example], Dropped]:
    """A held-out question the model trained on measures memory, not learning: drop it from the test side."""
    asked = {question_key(e) for e in train}
    kept = [e for e in test if question_key(e) not in asked]
    return kept, [(e, "question also in train") for e in test if question_key(e) in asked]


