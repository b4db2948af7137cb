"""The cleaning pipeline shared by `affiner prepare` and `affiner train`: read, clean, split, measure.

Both commands call `build`, so preparing first changes nothing in the rows a model sees. Each
filter of the `data:` section is one counted step in the ledger (rows in, dropped by reason,
kept); the token filter counts with the model's own tokenizer and template, so "at most
max_length tokens" means what it will mean in training; a row far too long to fit is dropped by its
character count first, before anything copies or tokenises it. Rows sharing a group (one acronym's
paraphrases) stay on one side of the seeded split, and test questions also asked in train are
dropped: a held-out question the model trained on measures memory, not learning.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from affiner.core.config import DataConfig
from affiner.core.errors import AffinerError
from affiner.core.files import read_json
from affiner.core.templates import Example, Template, render_prompt
from affiner.data.filters import (drop_by_pattern, drop_duplicates, drop_empty, drop_long_answers,
                                  drop_other_languages, drop_overlap, drop_too_many_characters,
                                  drop_too_many_tokens)
from affiner.data.formats import to_examples
from affiner.data.ledger import Ledger
from affiner.data.read import PREPARED_FILE, is_prepared, read_rows
from affiner.data.tokens import chars_per_token, token_lengths


@dataclass
class Prepared:
    train: list[Example]
    test: list[Example]
    ledger: Ledger
    lengths: dict[str, list[int]]  # token lengths of every row that reached the token filter, per split
    info: dict[str, Any]  # what data.json / prepared.json record: sources, fingerprints, counts


def clean(examples: list[Example], data: DataConfig, tokenizer, template: Template, ledger: Ledger,
          side: str) -> tuple[list[Example], list[int]]:
    """Every filter of the config, in order, each counted; returns the kept rows and the measured token lengths."""
    per_token = chars_per_token(tokenizer)
    if per_token is not None:  # first: the other filters copy and normalise every row in full
        examples = ledger.record(side, "characters", len(examples),
                                 *drop_too_many_characters(examples, data.max_length, per_token, template.is_chat))
    steps = [("empty fields", True, lambda rows: drop_empty(rows)),
             ("duplicates", data.dedupe != "none", lambda rows: drop_duplicates(rows, data.dedupe)),
             ("answer words", bool(data.max_response_words),
              lambda rows: drop_long_answers(rows, data.max_response_words)),
             ("patterns", bool(data.keep_matching or data.drop_matching),
              lambda rows: drop_by_pattern(rows, data.keep_matching, data.drop_matching)),
             ("language", bool(data.languages), lambda rows: drop_other_languages(rows, data.languages))]
    for name, active, step in steps:
        if active:  # a filter that is off is not a step: the data card lists what was done
            examples = ledger.record(side, name, len(examples), *step(examples))
    _check_renderable(examples, template)
    lengths = token_lengths(examples, template, tokenizer)
    kept = ledger.record(side, "tokens", len(examples), *drop_too_many_tokens(examples, lengths, data.max_length))
    return kept, lengths


def _check_renderable(examples: list[Example], template: Template) -> None:
    multi_turn = next((e for e in examples if e.history), None)
    if multi_turn is not None and not template.is_chat:
        render_prompt(template, multi_turn)  # raises the template's own error, naming the row


def read_examples(source: str, data: DataConfig, split_name: str, ledger: Ledger, side: str) -> list[Example]:
    rows = read_rows(source, split_name)
    examples = to_examples(rows, data.format, data.columns)
    ledger.steps.append({"split": side, "step": "read", "in": len(rows), "dropped": {}, "kept": len(examples)})
    if side == "train" and data.max_rows and len(examples) > data.max_rows:
        examples = ledger.record(side, "max_rows", len(examples), examples[: data.max_rows],
                                 [(e, f"beyond max_rows={data.max_rows}") for e in examples[data.max_rows:]])
    return examples


def build(data: DataConfig, tokenizer, template: Template) -> Prepared:
    """The rows a run trains and is evaluated on: read, cleaned, split, de-overlapped, measured."""
    ledger = Ledger()
    train = read_examples(data.train, data, data.split, ledger, "train")
    if not train:
        raise AffinerError(f"{data.train} holds no rows.")
    train, train_lengths = clean(train, data, tokenizer, template, ledger, "train")
    if not train:
        reasons = "; ".join(f"{n} {reason}" for step in ledger.steps for reason, n in step["dropped"].items())
        raise AffinerError(f"no row of {data.train} survives cleaning ({reasons}), so there is nothing to train "
                           "on. Loosen the filters (data.max_length, data.max_response_words, data.keep_matching, "
                           "data.drop_matching, data.languages) or fix the data.")
    test_source = data.test or (data.train if is_prepared(data.train) else None)
    if test_source:
        test_split = "test" if is_prepared(test_source) else data.split
        test = read_examples(test_source, data, test_split, ledger, "test")
        test, test_lengths = clean(test, data, tokenizer, template, ledger, "test")
        origin = test_source
    else:
        before = len(train)
        train, test = split(train, data.test_size, data.seed)
        ledger.steps.append({"split": "train", "step": "split", "in": before, "dropped": {}, "kept": len(train)})
        ledger.steps.append({"split": "test", "step": "split", "in": before, "dropped": {}, "kept": len(test)})
        origin = f"{data.test_size} of {data.train} held out with seed {data.seed}"
    test = ledger.record("test", "overlap with train", len(test), *drop_overlap(test, train))
    info = {"train": {"source": data.train, "examples": len(train), "sha256": fingerprint(train)},
            "test": {"source": origin, "examples": len(test), "sha256": fingerprint(test)},
            "groups": {"train": len({e.group for e in train if e.group}),
                       "test": len({e.group for e in test if e.group}),
                       "on_both_sides": len({e.group for e in train if e.group} & {e.group for e in test if e.group})},
            "format": data.format, "template": data.template, "steps": ledger.steps}
    for side, source in (("train", data.train), ("test", test_source)):
        if is_prepared(source):  # the prepared files' own fingerprints, as their data card shows them
            manifest = read_json(Path(source).expanduser() / PREPARED_FILE)
            info[side]["prepared"] = {"folder": source, **manifest["files"].get(f"{side}.jsonl", {})}
    # Lengths are measured before any split: with a split, they describe both sides together.
    lengths = {"train": train_lengths, "test": test_lengths} if test_source else {"all": train_lengths}
    return Prepared(train, test, ledger, lengths, info)


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
