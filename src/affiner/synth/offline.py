"""Conversations from the phrasing banks, with no model: reproducible for a seed, and never asking a
held-out question in training."""

from __future__ import annotations

import random
import re

from affiner.core.errors import AffinerError
from affiner.synth.banks import ANSWERS, DESCRIBED_ANSWERS, HELD_OUT_QUESTIONS, LANGUAGES, TRAIN_QUESTIONS
from affiner.synth.terms import Conversation, Entry, Pairs, Term

_VOWEL = re.compile(r"[AEIOUYÀÂÉÈÊËÎÏÔÙÛÜaeiouyàâéèêëîïôùûü]")


def _elide(template: str, acronym: str, language: str) -> str:
    # French drops the vowel of "de" and "que" before a vowel: "d'OMS", "qu'INRIA".
    if language != "fr" or not _VOWEL.match(acronym):
        return template
    return template.replace("de {acronym}", "d'{acronym}").replace("que {acronym}", "qu'{acronym}")


def fill(template: str, term: Term, language: str) -> str:
    """A bank's template with the term put in, as the language writes it."""
    template = _elide(template, term.acronym, language)
    text = template.format(acronym=term.acronym, definition=term.definition, description=term.description)
    # A definition that ends with its own full stop must not get a second one from the template.
    if term.definition[-1:] and term.definition[-1] in ".!?":
        text = text.replace(term.definition + ".", term.definition)
    return text


def offline_capacity(held_out: bool) -> int:
    """How many distinct questions per entry and language the phrasing bank can give."""
    bank = HELD_OUT_QUESTIONS if held_out else TRAIN_QUESTIONS
    return min(len(bank[language]) for language in LANGUAGES)


def offline_conversations(term: Term, language: str, count: int, seed: int,
                          held_out: bool = False) -> list[Conversation]:
    """`count` conversations with distinct questions, reproducible for (seed, acronym, language)."""
    bank = (HELD_OUT_QUESTIONS if held_out else TRAIN_QUESTIONS)[language]
    if count > len(bank):
        raise AffinerError(f"{count} {'held-out' if held_out else 'training'} conversations per entry is more "
                           f"than the offline phrasings give in {LANGUAGES[language]}: the maximum is {len(bank)}.")
    # One generator per entry, language and pool: adding an entry, or changing the held-out count,
    # leaves every other conversation as it was.
    rng = random.Random(f"{seed}\x1f{term.acronym}\x1f{language}\x1f{'test' if held_out else 'train'}")
    answers = list(ANSWERS[language])
    if term.description:
        answers += DESCRIBED_ANSWERS[language]
    rng.shuffle(answers)
    return [[{"role": "user", "content": fill(question, term, language)},
             {"role": "assistant", "content": fill(answers[i % len(answers)], term, language)}]
            for i, question in enumerate(rng.sample(bank, count))]


def offline_pairs(entries: list[Entry], languages: tuple[str, ...], per_entry: int, held_out: int,
                  seed: int) -> tuple[Pairs, Pairs]:
    """Training and held-out conversations for every entry and language (no held-out ones when `held_out` is 0)."""
    train, test = {}, {}
    for index, entry in enumerate(entries):
        for language in languages:
            term = entry.in_language(language)
            train[index, language] = offline_conversations(term, language, per_entry, seed)
            if held_out:
                test[index, language] = offline_conversations(term, language, held_out, seed, held_out=True)
    return train, test
