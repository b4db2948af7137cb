"""The cleaning pipeline shared by `affiner prepare` and `affiner train`: read, clean, split, measure.

Both commands call `build`, so preparing first changes nothing in the rows a model sees. Each
filter of the `data:` section is one counted step in the ledger (rows in, dropped by reason,
kept); the token filter counts with the model's own tokenizer and template, so "at most
max_length tokens" means what it will mean in training; a row far too long to fit is dropped by its
character count first, before anything copies or tokenises it. Rows sharing a group (one acronym's
paraphrases) stay on one side of the seeded split, and test questions also asked in train are
dropped: a held-out question the model trained on measures memory, not learning.

data.max_length is a training limit: held-out rows are kept whatever their answer's length, as long as
their prompt fits the model's context (`context`), so that the evaluation does not favour short answers;
the split is made before the training rows are measured against max_length.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from affiner.core.config import DataConfig
from affiner.core.errors import AffinerError
from affiner.core.files import read_json
from affiner.core.stopping import turn_markers
from affiner.core.templates import Example, Template, render_prompt
from affiner.data.filters import (drop_by_pattern, drop_duplicates, drop_empty, drop_long_answers, drop_new_turns,
                                  drop_other_languages, drop_overlap, drop_too_many_characters,
                                  drop_too_many_tokens, question_key)
from affiner.data.formats import check_mapped_columns, to_examples
from affiner.data.ledger import Ledger
from affiner.data.read import PREPARED_FILE, is_prepared, read_rows
from affiner.data.tokens import chars_per_token, response_lengths, token_lengths


@dataclass
class Prepared:
    train: list[Example]
    test: list[Example]
    ledger: Ledger
    lengths: dict[str, list[int]]  # token lengths of every row that reached the token filter, per split
    info: dict[str, Any]  # what data.json / prepared.json record: sources, fingerprints, counts


def clean(examples: list[Example], data: DataConfig, tokenizer, template: Template, ledger: Ledger,
          side: str, context: int | None = None, to_train: bool | None = None) -> tuple[list[Example], list[int]]:
    """Every filter of the config, in order, each counted; returns the kept rows and the measured token lengths.
    Rows to train on (`to_train`, by default the train side's) must fit data.max_length; held-out rows only
    need their prompt to fit `context`."""
    to_train = side == "train" if to_train is None else to_train
    examples = _drop_far_too_long(examples, data, tokenizer, template, ledger, side, to_train, context)
    # A held-out file's row needs something to hold answers against: an answer, or a reference alone.
    steps = [("empty fields", True, lambda rows: drop_empty(rows, held_out=side == "test")),
             ("duplicates", data.dedupe != "none", lambda rows: drop_duplicates(rows, data.dedupe)),
             ("answer words", bool(data.max_response_words),
              lambda rows: drop_long_answers(rows, data.max_response_words)),
             ("patterns", bool(data.keep_matching or data.drop_matching),
              lambda rows: drop_by_pattern(rows, data.keep_matching, data.drop_matching)),
             ("language", bool(data.languages), lambda rows: drop_other_languages(rows, data.languages))]
    for name, active, step in steps:
        if active:  # a filter that is off is not a step: the data card lists what was done
            examples = ledger.record(side, name, len(examples), *step(examples))
    return _fit(examples, data, tokenizer, template, ledger, side, context, to_train)


def _drop_far_too_long(examples: list[Example], data: DataConfig, tokenizer, template: Template, ledger: Ledger,
                       side: str, to_train: bool, context: int | None) -> list[Example]:
    """First of all, rows certainly over data.max_length tokens (to train on) or the model's context (held out)
    by their characters: the other filters copy and normalise every row in full."""
    per_token = chars_per_token(tokenizer)
    limit = data.max_length if to_train else context
    if per_token is None or limit is None:
        return examples
    name = None if to_train else f"the model's context ({limit} tokens)"
    return ledger.record(side, "characters", len(examples),
                         *drop_too_many_characters(examples, limit, per_token, template.is_chat, name))


def _fit(examples: list[Example], data: DataConfig, tokenizer, template: Template, ledger: Ledger, side: str,
         context: int | None, to_train: bool) -> tuple[list[Example], list[int]]:
    """The rows that fit: whole within data.max_length to train on, the prompt within the context to evaluate."""
    _check_renderable(examples, template)
    if to_train and (markers := turn_markers(template)):  # also after a split, which cleaned rows as held out
        examples = ledger.record(side, "new turns", len(examples), *drop_new_turns(examples, markers))
    lengths = token_lengths(examples, template, tokenizer)
    if to_train:
        kept = ledger.record(side, "tokens", len(examples), *drop_too_many_tokens(examples, lengths, data.max_length))
        return kept, lengths
    return ledger.record(side, "prompt tokens", len(examples),
                         *prompts_that_fit(examples, template, tokenizer, context, lengths)), lengths


def prompts_that_fit(examples: list[Example], template: Template, tokenizer, context: int | None,
                     lengths: list[int] | None = None) -> tuple[list[Example], list[tuple[Example, str]]]:
    """The held-out rows whose prompt leaves the model room to answer, and the others with why."""
    if context is None:
        return examples, []
    lengths = lengths or token_lengths(examples, template, tokenizer)
    prompts = [n - r for n, r in zip(lengths, response_lengths(examples, template, tokenizer))]
    reason = f"prompt over the model's context ({context} tokens)"
    return [e for e, n in zip(examples, prompts) if n < context], [(e, reason) for e, n in zip(examples, prompts)
                                                                   if n >= context]


def _check_renderable(examples: list[Example], template: Template) -> None:
    multi_turn = next((e for e in examples if e.history), None)
    if multi_turn is not None and not template.is_chat:
        render_prompt(template, multi_turn)  # raises the template's own error, naming the row


def source_examples(rows: list, source: str, data: DataConfig) -> list[Example]:
    """Examples from rows of `source` in data.format with data.columns; a prepared folder's rows are affiner's
    own, alpaca-shaped whatever the format they were prepared from (`prepare` then `--set data.train=FOLDER`)."""
    if is_prepared(source):
        return to_examples(rows, "alpaca")
    return to_examples(rows, data.format, data.columns)


def read_examples(source: str, data: DataConfig, split_name: str, ledger: Ledger, side: str) -> list[Example]:
    rows = read_rows(source, split_name)
    if side == "train" and not is_prepared(source):
        check_mapped_columns(rows, data.columns)
    examples = source_examples(rows, source, data)
    ledger.steps.append({"split": side, "step": "read", "in": len(rows), "dropped": {}, "kept": len(examples)})
    if side == "train" and data.max_rows and len(examples) > data.max_rows:
        examples = ledger.record(side, "max_rows", len(examples), examples[: data.max_rows],
                                 [(e, f"beyond max_rows={data.max_rows}") for e in examples[data.max_rows:]])
    return examples


def training_rows(data: DataConfig, held_out: list[Example]) -> list[Example]:
    """The rows a run's config trains on, read again (before cleaning, which only removes rows): its training
    source, less the held-out rows it split off when it had no data.test."""
    train = read_examples(data.train, data, data.split, Ledger(), "train")
    if data.test or is_prepared(data.train):
        return train
    split_off = {question_key(e, normalize=False) for e in held_out}
    return [e for e in train if question_key(e, normalize=False) not in split_off]


def build(data: DataConfig, tokenizer, template: Template, context: int | None = None) -> Prepared:
    """The rows a run trains and is evaluated on: read, cleaned, split, de-overlapped, measured; `context`: the
    model's, which a held-out prompt must fit (None: no limit)."""
    ledger = Ledger()
    train = read_examples(data.train, data, data.split, ledger, "train")
    if not train:
        raise AffinerError(f"{data.train} holds no rows.")
    test_source = data.test or (data.train if is_prepared(data.train) else None)
    if test_source:
        train, train_lengths = clean(train, data, tokenizer, template, ledger, "train")
    else:  # split first, so that held-out rows are not chosen among those short enough to train on
        train, _ = clean(train, data, tokenizer, template, ledger, "train", context, to_train=False)
    if not train:
        raise _nothing_to_train(data, ledger)
    if test_source:
        mark = len(ledger.dropped)
        test_split = "test" if is_prepared(test_source) else data.split
        test = read_examples(test_source, data, test_split, ledger, "test")
        if data.test and not test:  # refused before any training: an evaluation after it would have nothing to ask
            raise AffinerError(f"{data.test} (data.test) holds no rows: the held-out questions need at least one. "
                               "Give a file with rows, or set data.test: null to hold out data.test_size of the "
                               "training rows instead.")
        test, test_lengths = clean(test, data, tokenizer, template, ledger, "test", context)
        origin = test_source
    else:
        before = len(train)
        train, test = split(train, data.test_size, data.seed)
        ledger.steps.append({"split": "train", "step": "split", "in": before, "dropped": {}, "kept": len(train)})
        ledger.steps.append({"split": "test", "step": "split", "in": before, "dropped": {}, "kept": len(test)})
        train = _drop_far_too_long(train, data, tokenizer, template, ledger, "train", True, None)
        train, train_lengths = _fit(train, data, tokenizer, template, ledger, "train", None, to_train=True)
        test_lengths = token_lengths(test, template, tokenizer)
        if not train:
            raise _nothing_to_train(data, ledger, f" once {len(test)} rows are held out")
        origin = f"{data.test_size} of {data.train} held out with seed {data.seed}"
        mark = len(ledger.dropped)
    test = ledger.record("test", "overlap with train", len(test), *drop_overlap(test, train))
    dropped = [(e, reason) for e, reason in ledger.dropped[mark:] if isinstance(e, Example)]
    info = {"train": {"source": data.train, "examples": len(train), "sha256": fingerprint(train)},
            "test": {"source": origin, "examples": len(test), "sha256": fingerprint(test),
                     "dropped": dropped_rows(dropped)},
            "groups": {"train": len({e.group for e in train if e.group}),
                       "test": len({e.group for e in test if e.group}),
                       "on_both_sides": len({e.group for e in train if e.group} & {e.group for e in test if e.group})},
            "format": data.format, "template": data.template, "steps": ledger.steps}
    for side, source in (("train", data.train), ("test", test_source)):
        if is_prepared(source):  # the prepared files' own fingerprints, as their data card shows them
            manifest = read_json(Path(source).expanduser() / PREPARED_FILE)
            info[side]["prepared"] = {"folder": source, **manifest["files"].get(f"{side}.jsonl", {})}
    lengths = {"train": train_lengths, "test": test_lengths}
    return Prepared(train, test, ledger, lengths, info)


def _nothing_to_train(data: DataConfig, ledger: Ledger, when: str = "") -> AffinerError:
    reasons = "; ".join(f"{n} {reason}" for step in ledger.steps for reason, n in step["dropped"].items())
    return AffinerError(f"no row of {data.train} survives cleaning{when} ({reasons}), so there is nothing to train "
                        "on. Loosen the filters (data.max_length, data.max_response_words, data.keep_matching, "
                        "data.drop_matching, data.languages) or fix the data.")


def dropped_rows(dropped: list[tuple[Example, str]], shown: int = 200) -> dict:
    """Held-out rows left out of the evaluation, with why: the report lists them (the first `shown`) and counts
    every one by its reason."""
    return {"count": len(dropped), "reasons": dict(Counter(reason for _, reason in dropped)),
            "rows": [{"question": e.instruction[:300], "reason": reason} for e, reason in dropped[:shown]]}


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
