"""Write question/answer conversations about a glossary's acronyms, in English and French, ready for `affiner train`.

    affiner generate glossary.csv --output data/glossary-train.json --test-output data/glossary-test.json
    affiner generate glossary.json --output data/train.json --per-entry 12 --languages en --seed 3
    affiner generate terms.csv --columns acronym=term,definition=meaning --output data/train.json
    affiner generate thesaurus.rdf --output data/train.json      # SKOS: prefLabel, altLabel, definition

    # an LLM writes the conversations, here a local Ollama server:
    affiner generate glossary.csv --output data/glossary-train.json --test-output data/glossary-test.json \\
        --endpoint http://127.0.0.1:11434/v1 --model gemma3:27b
    # or OpenAI, the key read from an environment variable:
    affiner generate glossary.csv --output data/glossary-train.json --endpoint https://api.openai.com/v1 \\
        --model gpt-4o-mini --api-key-env OPENAI_API_KEY

    affiner train llama-3.2-1b-instruct-glossary-lora --set data.train=data/glossary-train.json \\
        --set data.test=data/glossary-test.json

The glossary is a JSON list (or {"data": [...]}), JSONL or CSV of `acronym` and `definition`
(other names with --columns), or SKOS RDF/XML: a concept's shorter label is the acronym, its longer
label the definition, and skos:definition a description; with a single label, skos:definition is the
definition. Entries without an acronym or definition, and exact duplicates, are dropped and counted;
one acronym with two definitions is an error.

Offline (the default), conversations come from phrasing templates, reproducible with --seed; the
held-out file (--test-output) uses question phrasings never used for training. With --endpoint, any
OpenAI-compatible server writes them; every reply is checked (JSON, roles, the definition word for
word in every answer), retried and de-duplicated, and cached in `$AFFINER_CACHE/generate`, so an
interrupted run resumes where it stopped. The output is the nested glossary layout `train` reads:
one record per acronym, {acronym, ground_truth, languages, conversation: [[user, assistant], ...]}.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import random
import re
import shlex
import sys
import threading
import unicodedata
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from affiner.data.read import strict_utf8
from affiner.core.errors import AffinerError

Conversation = list[dict[str, str]]

LANGUAGES = {"en": "English", "fr": "French"}
COLUMN_KEYS = ("acronym", "definition", "description")
SUFFIXES = (".json", ".jsonl", ".csv", ".xml", ".rdf", ".skos")
RECIPE = "llama-3.2-1b-instruct-glossary-lora"
RETRY_BACKOFF = 1.0  # seconds before the first transport retry, doubled after each (tests make it tiny)
TRANSPORT_RETRIES = 3

# ---------------------------------------------------------------------------------------- phrasings

# Training questions and held-out questions never overlap, so a held-out score measures whether the
# model learned the definition, not whether it memorised a phrasing.
TRAIN_QUESTIONS = {
    "en": (
        "What does {acronym} stand for?",
        "What is {acronym}?",
        "Define {acronym}.",
        "Expand the acronym {acronym}.",
        "What is the full name of {acronym}?",
        "Can you tell me what {acronym} means?",
        "{acronym}: what does it mean?",
        "I saw {acronym} in a report. What is it?",
        "What does the abbreviation {acronym} mean?",
        "What is {acronym} short for?",
        "Spell out {acronym} for me, please.",
        "Quick question: what's {acronym}?",
        "My colleague keeps saying {acronym}. What does it refer to?",
        "What is the meaning of {acronym}?",
        "Give me the expansion of {acronym}.",
        "Do you know what {acronym} stands for?",
        "What do the letters {acronym} stand for?",
        "In our glossary, what is {acronym}?",
        "Please explain the acronym {acronym}.",
        "What's the long form of {acronym}?",
        "I keep running into {acronym} in documents. What does it mean?",
        "Could you define {acronym} for me?",
    ),
    "fr": (
        "Que signifie {acronym} ?",
        "Qu'est-ce que {acronym} ?",
        "Que veut dire {acronym} ?",
        "Définis {acronym}.",
        "Quelle est la signification de {acronym} ?",
        "Que désigne le sigle {acronym} ?",
        "Développe l'acronyme {acronym}.",
        "Quel est le nom complet de {acronym} ?",
        "Peux-tu me dire ce que signifie {acronym} ?",
        "{acronym} : qu'est-ce que ça veut dire ?",
        "J'ai vu {acronym} dans un rapport. De quoi s'agit-il ?",
        "À quoi correspond {acronym} ?",
        "Que représente l'abréviation {acronym} ?",
        "Pouvez-vous m'expliquer ce qu'est {acronym} ?",
        "Quelle est la forme longue de {acronym} ?",
        "Que veulent dire les lettres {acronym} ?",
        "Petite question : c'est quoi, {acronym} ?",
        "Un collègue parle souvent de {acronym}. Qu'est-ce que c'est ?",
        "Donne-moi la définition de {acronym}.",
        "Sais-tu ce que veut dire {acronym} ?",
        "Dans notre glossaire, que signifie {acronym} ?",
        "Je croise souvent {acronym} dans des documents. Que signifie ce sigle ?",
    ),
}
HELD_OUT_QUESTIONS = {
    "en": (
        "Could you explain what the acronym {acronym} refers to?",
        "What's the meaning behind the letters {acronym}?",
        "I'm new here: what is meant by {acronym}?",
        "Remind me, what does {acronym} expand to?",
        "What is {acronym} an abbreviation of?",
        "Someone mentioned {acronym} in a meeting. What is that?",
    ),
    "fr": (
        "Pourriez-vous préciser à quoi fait référence l'acronyme {acronym} ?",
        "Que cache le sigle {acronym} ?",
        "Je suis nouveau ici : que veut dire {acronym} ?",
        "Rappelle-moi ce que désigne {acronym}.",
        "De quoi {acronym} est-il l'abréviation ?",
        "Quelqu'un a parlé de {acronym} en réunion. Qu'est-ce que c'est ?",
    ),
}
# Every answer holds the definition verbatim. French forms avoid "de {definition}", which would need
# an elision ("d'Organisation") that a template cannot know.
ANSWERS = {
    "en": (
        "{acronym} stands for {definition}.",
        "{acronym} means {definition}.",
        "The acronym {acronym} expands to {definition}.",
        "It stands for {definition}.",
        "{acronym} is short for {definition}.",
        "{definition} ({acronym}).",
        "{acronym} is the abbreviation of {definition}.",
        "It means {definition}.",
    ),
    "fr": (
        "{acronym} signifie {definition}.",
        "{acronym} veut dire {definition}.",
        "Le sigle {acronym} désigne {definition}.",
        "Cela signifie {definition}.",
        "{acronym}, c'est {definition}.",
        "{definition} ({acronym}).",
        "L'acronyme {acronym} se développe ainsi : {definition}.",
        "La forme longue de {acronym} est {definition}.",
    ),
}
# Longer answers, used only when the glossary gives a description besides the definition.
DESCRIBED_ANSWERS = {
    "en": (
        "{acronym} stands for {definition}. {description}",
        "{definition} ({acronym}). {description}",
    ),
    "fr": (
        "{acronym} signifie {definition}. {description}",
        "{definition} ({acronym}). {description}",
    ),
}

# ---------------------------------------------------------------------------------------- glossary entries


@dataclass(frozen=True)
class Term:
    acronym: str
    definition: str  # what every answer must contain, word for word
    description: str = ""  # a longer explanation (SKOS skos:definition next to two labels), optional


@dataclass(frozen=True)
class Entry:
    term: Term
    where: str  # "glossary.csv:4", "glossary.json item 3", "thesaurus.rdf concept 2 (line 14)"
    localized: dict[str, Term] = field(default_factory=dict)  # xml:lang -> term, when labels differ by language

    def in_language(self, language: str) -> Term:
        return self.localized.get(language, self.term)


@dataclass
class Drops:
    """What was dropped and why, with where."""

    counts: Counter = field(default_factory=Counter)
    places: dict[str, dict[str, None]] = field(default_factory=dict)  # reason -> distinct places, in order

    def add(self, reason: str, where: str, times: int = 1) -> None:
        self.counts[reason] += times
        self.places.setdefault(reason, {})[where] = None

    def merge(self, other: Drops) -> None:
        for reason, count in other.counts.items():
            self.counts[reason] += count
            self.places.setdefault(reason, {}).update(other.places.get(reason, {}))

    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self, shown: int = 3) -> str:
        parts = []
        for reason, count in self.counts.most_common():
            places = list(self.places.get(reason, {}))
            more = ", ..." if len(places) > shown else ""
            parts.append(f"{count} {reason} ({', '.join(places[:shown])}{more})")
        return "; ".join(parts)


@dataclass(frozen=True)
class Glossary:
    entries: list[Entry]
    read: int  # entries (rows, items, concepts) found in the file
    drops: Drops


@dataclass(frozen=True)
class _Candidate:
    acronym: str
    definition: str
    description: str
    where: str
    localized: dict[str, Term] = field(default_factory=dict)


def _clean(text: str) -> str:
    return " ".join(text.split())


def read_glossary(path: Path, columns: dict[str, str] | None = None) -> Glossary:
    """Entries from a JSON, JSONL, CSV or SKOS file; unusable ones dropped and counted, conflicts refused."""
    label = str(path)
    if not path.is_file():
        raise AffinerError(f"glossary file {label} does not exist." if not path.exists()
                           else f"glossary {label} is not a file.")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise AffinerError(f"glossary {label} has an unsupported type '{suffix or '(none)'}'; use one of "
                           f"{', '.join(SUFFIXES)} (JSON list, JSON lines, CSV with a header row, SKOS RDF/XML).")
    drops = Drops()
    if suffix in {".xml", ".rdf", ".skos"}:
        if columns:
            raise AffinerError(f"--columns does not apply to the SKOS file {label}: its acronym and definition "
                               "come from skos:prefLabel, skos:altLabel and skos:definition.")
        candidates, read = _read_skos(strict_utf8(path, label), label, drops)
    else:
        records = _table_records(path, label)
        candidates, read = _from_records(records, label, columns or {}, drops), len(records)
    if read == 0:
        raise AffinerError(f"glossary {label} holds no entries.")
    entries = _keep(candidates, drops)
    if not entries:
        raise AffinerError(f"glossary {label}: none of its {read} entries is usable ({drops.describe()}).")
    return Glossary(entries=entries, read=read, drops=drops)


# -- tables: JSON, JSONL, CSV, read as training data is (strict UTF-8, file:line in every error)

Record = tuple[dict[str, Any], str]  # a row and where it came from


def _table_records(path: Path, label: str) -> list[Record]:
    from affiner.data.read import read_rows

    records = []
    for record, where in read_rows(str(path)):
        if "messages" in record and len(record) == 1:  # read_rows' reading of a bare list item
            raise AffinerError(f"{where} must be a JSON object such as {{\"acronym\": \"WHO\", \"definition\": "
                               "\"World Health Organization\"}, not a list.")
        if any(str(value or "").strip() for value in record.values()):  # blank CSV lines are not entries
            records.append((record, where))
    return records


def _column(records: list[Record], label: str, key: str, columns: dict[str, str], csv_file: bool) -> str | None:
    """The file's name for `key`: as mapped by --columns, else `key` itself, else a unique case-insensitive match."""
    present: dict[str, None] = {}
    for record, _ in records:
        present.update(dict.fromkeys(map(str, record)))
    wanted = columns.get(key, key)
    if wanted in present:
        return wanted
    matches = [name for name in present if name.strip().casefold() == wanted.strip().casefold()]
    if len(matches) == 1:
        return matches[0]
    if key == "description" and key not in columns:
        return None  # optional
    kind, holder = ("column", "header") if csv_file else ("field", "entries")
    raise AffinerError(f"glossary {label} has no '{wanted}' {kind} for the {key} (its {holder}: "
                       f"{', '.join(present) or 'none'}). Name yours with --columns {key}=NAME, for example "
                       f"--columns acronym=term,definition=meaning.")


def _from_records(records: list[Record], label: str, columns: dict[str, str], drops: Drops) -> list[_Candidate]:
    if not records:
        return []
    csv_file = label.lower().endswith(".csv")
    names = {key: _column(records, label, key, columns, csv_file) for key in COLUMN_KEYS}
    candidates = []
    for record, where in records:
        values = {key: _text(record, name, where) for key, name in names.items()}
        if not values["acronym"]:
            drops.add("no acronym", where)
        elif not values["definition"]:
            drops.add("no definition", where)
        else:
            candidates.append(_Candidate(values["acronym"], values["definition"], values["description"], where))
    return candidates


def _text(record: dict[str, Any], name: str | None, where: str) -> str:
    value = record.get(name) if name is not None else None
    if value is None:
        return ""
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise AffinerError(f"{where}: '{name}' must be text, not {type(value).__name__}.")
    return _clean(str(value))


# -- SKOS

SKOS = "{http://www.w3.org/2004/02/skos/core#}"
PREF, ALT, DEFINITION, CONCEPT = SKOS + "prefLabel", SKOS + "altLabel", SKOS + "definition", SKOS + "Concept"
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
_LABELS = {PREF, ALT}
_FIELDS = {PREF, ALT, DEFINITION}


@dataclass(frozen=True)
class _Field:
    kind: str  # PREF, ALT or DEFINITION
    language: str  # "" when no xml:lang applies
    text: str


def _parse_xml(text: str, label: str) -> tuple[ET.Element, dict[int, int]]:
    """The root, and the line each element starts on (ElementTree does not keep it), by element id."""
    parser = ET.XMLPullParser(events=("start",))
    lines: dict[int, int] = {}
    root: ET.Element | None = None
    try:
        for number, line in enumerate(text.splitlines(keepends=True), start=1):
            parser.feed(line)
            for _, element in parser.read_events():
                lines[id(element)] = number
                root = element if root is None else root
        parser.close()
    except ET.ParseError as exc:
        line, column = exc.position
        raise AffinerError(f"{label}:{line}:{column + 1} is not well-formed XML: "
                           f"{str(exc).split(':')[0]}.") from None
    if root is None:
        raise AffinerError(f"glossary {label} holds no XML element.")
    return root, lines


def _is_concept(element: ET.Element, inside_concept: bool) -> bool:
    # A label child makes a concept; a lone skos:definition only does outside a concept, because looser
    # layouts wrap a concept's definition in an element of its own.
    tags = {child.tag for child in element}
    return (element.tag == CONCEPT or CONCEPT in element.attrib or bool(tags & _LABELS)
            or (not inside_concept and DEFINITION in tags))


def _concepts(element: ET.Element, language: str = "", inside: bool = False) -> Iterator[tuple[ET.Element, str]]:
    language = element.get(XML_LANG, language)
    concept = _is_concept(element, inside)
    if concept:
        yield element, language
    for child in element:
        if child.tag not in _FIELDS:
            yield from _concepts(child, language, inside or concept)


def _fields(element: ET.Element, language: str) -> Iterator[_Field]:
    """The concept's labels and definitions, not those of concepts nested inside it."""
    for child in element:
        child_language = child.get(XML_LANG, language)
        if child.tag in _FIELDS:
            text = _clean("".join(child.itertext()))
            if text:
                yield _Field(child.tag, child_language.lower(), text)
        elif not _is_concept(child, inside_concept=True):
            yield from _fields(child, child_language)


def _pick(fields: list[_Field], kind: str, language: str | None, strict: bool = False) -> str:
    # The wanted language first, then text without a language, then (unless strict) whatever comes first.
    options = [f for f in fields if f.kind == kind]
    for keep in (lambda f: language is not None and f.language.split("-")[0] == language,
                 lambda f: not f.language, lambda f: not strict or language is None):
        chosen = [f for f in options if keep(f)]
        if chosen:
            return chosen[0].text
    return ""


def _skos_term(fields: list[_Field], language: str | None) -> Term | str:
    """The term in `language` (None: the default), or the reason the concept cannot be used."""
    labels = [text for text in (_pick(fields, PREF, language), _pick(fields, ALT, language)) if text]
    if len(labels) == 2 and labels[0].casefold() != labels[1].casefold():
        acronym, expansion = sorted(labels, key=len)
        # A description in another language would turn up untranslated in the answers.
        description = _pick(fields, DEFINITION, language, strict=True)
        return Term(acronym, expansion, description if description.casefold() != expansion.casefold() else "")
    definition = _pick(fields, DEFINITION, language)
    if not labels:
        return "no label"
    if not definition:
        return "no definition"
    return Term(labels[0], definition)


def _read_skos(text: str, label: str, drops: Drops) -> tuple[list[_Candidate], int]:
    root, lines = _parse_xml(text, label)
    candidates, read = [], 0
    for number, (element, language) in enumerate(_concepts(root), start=1):
        read += 1
        where = f"{label} concept {number} (line {lines.get(id(element), '?')})"
        fields = list(_fields(element, language))
        term = _skos_term(fields, None)
        if isinstance(term, str):
            drops.add(term, where)
            continue
        localized = {}
        for code in sorted({f.language.split("-")[0] for f in fields if f.language}):
            other = _skos_term(fields, code)
            if isinstance(other, Term) and other != term:
                localized[code] = other
        candidates.append(_Candidate(term.acronym, term.definition, term.description, where, localized))
    return candidates, read


# -- duplicates and conflicts


def _keep(candidates: list[_Candidate], drops: Drops) -> list[Entry]:
    kept: dict[str, Entry] = {}
    for candidate in candidates:
        key = candidate.acronym.casefold()
        earlier = kept.get(key)
        if earlier is None:
            kept[key] = Entry(Term(candidate.acronym, candidate.definition, candidate.description),
                              candidate.where, candidate.localized)
        elif _clean(earlier.term.definition).casefold() == _clean(candidate.definition).casefold():
            drops.add("duplicate", candidate.where)
        else:
            raise AffinerError(f"the acronym {candidate.acronym!r} has two different definitions: "
                               f"{earlier.term.definition!r} at {earlier.where} and {candidate.definition!r} at "
                               f"{candidate.where}. Keep one (a model cannot learn both as the meaning), or "
                               f"rename one of the acronyms.")
    return list(kept.values())


# ---------------------------------------------------------------------------------------- offline conversations


_VOWEL = re.compile(r"[AEIOUYÀÂÉÈÊËÎÏÔÙÛÜaeiouyàâéèêëîïôùûü]")


def _elide(template: str, acronym: str, language: str) -> str:
    # French drops the vowel of "de" and "que" before a vowel: "d'OMS", "qu'INRIA".
    if language != "fr" or not _VOWEL.match(acronym):
        return template
    return template.replace("de {acronym}", "d'{acronym}").replace("que {acronym}", "qu'{acronym}")


def _fill(template: str, term: Term, language: str) -> str:
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
    return [[{"role": "user", "content": _fill(question, term, language)},
             {"role": "assistant", "content": _fill(answers[i % len(answers)], term, language)}]
            for i, question in enumerate(rng.sample(bank, count))]


# ---------------------------------------------------------------------------------------- endpoint conversations

PROMPTS = {
    "en": (
        "Write {count} short, varied conversations in English in which a user asks what the acronym below means "
        "and an assistant answers.\n\n"
        "Acronym: {acronym}\n"
        "Meaning: {definition}\n"
        "{context}"
        "Number of conversations: {count}\n\n"
        "Rules:\n"
        "- Every assistant answer contains the meaning exactly as written above, word for word.\n"
        "- Vary the questions (direct, casual, formal, with a little context) and the answers (some restate "
        "the acronym). Keep them short.\n"
        "- Each conversation is a list of messages {{\"role\": \"user\" or \"assistant\", \"content\": \"...\"}} "
        "that starts with the user and ends with the assistant.\n"
        "{avoid}"
        "Reply with raw JSON only, a list of {count} conversations, without code fences or comments:\n"
        "[[{{\"role\": \"user\", \"content\": \"...\"}}, {{\"role\": \"assistant\", \"content\": \"...\"}}]]\n\n"
        "(request {attempt})"
    ),
    "fr": (
        "Écris {count} conversations courtes et variées, en français, dans lesquelles un utilisateur demande ce "
        "que signifie l'acronyme ci-dessous et un assistant répond.\n\n"
        "Acronyme : {acronym}\n"
        "Signification : {definition}\n"
        "{context}"
        "Nombre de conversations : {count}\n\n"
        "Règles :\n"
        "- Chaque réponse de l'assistant contient la signification exactement telle qu'écrite ci-dessus, mot "
        "pour mot.\n"
        "- Varie les questions (directes, familières, formelles, avec un peu de contexte) et les réponses "
        "(certaines reprennent l'acronyme). Reste bref.\n"
        "- Chaque conversation est une liste de messages {{\"role\": \"user\" ou \"assistant\", \"content\": "
        "\"...\"}} qui commence par l'utilisateur et finit par l'assistant.\n"
        "{avoid}"
        "Réponds uniquement en JSON brut, une liste de {count} conversations, sans bloc de code ni commentaire :\n"
        "[[{{\"role\": \"user\", \"content\": \"...\"}}, {{\"role\": \"assistant\", \"content\": \"...\"}}]]\n\n"
        "(demande {attempt})"
    ),
}
_CONTEXT = {"en": "Context (for you only, do not copy it): {}\n", "fr": "Contexte (pour toi seulement, ne le "
            "recopie pas) : {}\n"}
_AVOID = {"en": "- Do not reuse these questions:\n{}\n", "fr": "- Ne reprends pas ces questions :\n{}\n"}


def endpoint_messages(term: Term, language: str, count: int, attempt: int,
                      avoid: list[str] | tuple[str, ...] = ()) -> list[dict[str, str]]:
    """The request for `count` conversations; `attempt` and `avoid` make each retry a distinct request."""
    context = _CONTEXT[language].format(term.description) if term.description else ""
    avoid_text = _AVOID[language].format("\n".join(f"  - {q}" for q in avoid)) if avoid else ""
    prompt = PROMPTS[language].format(count=count, acronym=term.acronym, definition=term.definition,
                                      context=context, avoid=avoid_text, attempt=attempt)
    return [{"role": "user", "content": prompt}]


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
    return messages, None


def accept_reply(text: str, definition: str, seen: set[str], drops: Drops | None = None,
                 where: str = "") -> list[Conversation]:
    """The reply's valid conversations whose question is not in `seen` (which they are added to)."""
    drops = drops if drops is not None else Drops()
    candidates = parse_conversations(text)
    if candidates is None:
        drops.add("broken JSON", where)
        return []
    kept = []
    for candidate in candidates:
        conversation, reason = check_conversation(candidate, definition)
        if conversation is None:
            drops.add(reason or "invalid", where)
            continue
        key = question_key(conversation[0]["content"])
        if key in seen:
            drops.add("duplicate question", where)
            continue
        seen.add(key)
        kept.append(conversation)
    return kept


@dataclass(frozen=True)
class EndpointOptions:
    url: str
    model: str
    api_key_env: str | None = None
    temperature: float = 0.7
    concurrency: int = 4
    max_attempts: int = 3
    timeout: float = 300.0  # a local model writing ten conversations on a CPU takes minutes


@dataclass
class _Unit:
    """One entry in one language: the request(s) to make, and what came back."""

    entry: int  # index in the glossary's entries
    term: Term
    language: str
    need: int
    conversations: list[Conversation] = field(default_factory=list)
    drops: Drops = field(default_factory=Drops)

    @property
    def where(self) -> str:
        return f"{self.term.acronym} ({self.language})"


class _Stopped(Exception):
    """Another unit failed or the user pressed Ctrl-C: ask nothing more."""


def _run_unit(client, unit: _Unit, options: EndpointOptions, stop: threading.Event) -> _Unit:
    seen: set[str] = set()
    for attempt in range(1, options.max_attempts + 1):
        missing = unit.need - len(unit.conversations)
        if missing <= 0:
            break
        if stop.is_set():
            raise _Stopped
        asked = [c[0]["content"] for c in unit.conversations]
        messages = endpoint_messages(unit.term, unit.language, missing, attempt, asked)

        def useful(reply: str) -> bool:  # only replies worth replaying are cached
            return bool(accept_reply(reply, unit.term.definition, set(seen)))

        try:
            reply = client.ask(messages, options.temperature, keep=useful)
        except Exception:
            stop.set()  # here, not in the main thread, so that this worker's next unit already sees it
            raise
        unit.conversations += accept_reply(reply, unit.term.definition, seen, unit.drops, unit.where)
    del unit.conversations[unit.need:]
    return unit


def _endpoint_client(options: EndpointOptions):
    from affiner.core.endpoint import ChatClient

    return ChatClient(options.url, options.model, api_key_env=options.api_key_env, timeout=options.timeout,
                      max_retries=TRANSPORT_RETRIES, backoff=RETRY_BACKOFF, cache_name="generate",
                      label="generation endpoint", user_agent="affiner-generate", fail_fast_unreachable=True)


def _run_units(units: list[_Unit], options: EndpointOptions, client) -> None:
    from affiner.core.endpoint import RequestFailed

    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=options.concurrency, thread_name_prefix="generate")
    futures: list[Future] = [pool.submit(_run_unit, client, unit, options, stop) for unit in units]
    interrupted = False
    try:
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        if any(f.exception() is not None for f in done):
            stop.set()
            for future in futures:
                future.cancel()
            wait(futures)  # the requests under way finish, so their replies are cached
            # The first real failure, not the units that stopped because of it.
            error = next(e for f in futures if not f.cancelled() and (e := f.exception()) is not None
                         and not isinstance(e, _Stopped))
            if isinstance(error, RequestFailed):
                raise AffinerError(_transport_message(options, error, client)) from None
            raise error
    except KeyboardInterrupt:
        interrupted = True
        print(f"\ninterrupted: the finished replies are cached in {client.cache_path}; run the same command "
              "again to resume where this one stopped.", file=sys.stderr)
        raise
    finally:
        stop.set()  # requests under way finish (and are cached); no new one starts
        pool.shutdown(wait=not interrupted, cancel_futures=True)


def _transport_message(options: EndpointOptions, error: Exception, client) -> str:
    status = getattr(error, "status", None)
    if status in (401, 403):
        hint = (f" The server refused the API key from {options.api_key_env}; check it." if options.api_key_env
                else " The server wants an API key: put it in an environment variable and name it with "
                     "--api-key-env.")
    elif status == 404:
        hint = f" Check the URL (it should end in /v1 for most servers) and the model name {options.model!r}."
    elif status is None:
        hint = " Is the server running, and is the URL right?"
    else:
        hint = ""
    return (f"the generation endpoint {options.url} failed: {error}.{hint} Nothing was written; replies already "
            f"received are cached in {client.cache_path}, so running the same command again resumes where this "
            f"one stopped.")


# ---------------------------------------------------------------------------------------- the whole run


@dataclass(frozen=True)
class Options:
    glossary: Path
    output: Path
    per_entry: int = 8
    languages: tuple[str, ...] = ("en", "fr")
    seed: int = 0
    test_output: Path | None = None
    test_per_entry: int = 2
    columns: dict[str, str] = field(default_factory=dict)
    endpoint: EndpointOptions | None = None
    overwrite: bool = False


@dataclass
class Result:
    glossary: Glossary
    train: list[dict[str, Any]]  # records in the nested glossary layout
    test: list[dict[str, Any]]
    counts: dict[str, Counter]  # "train"/"test" -> conversations per language
    conversation_drops: Drops = field(default_factory=Drops)
    short: list[str] = field(default_factory=list)  # units that got fewer conversations than asked for
    requests_sent: int = 0
    cache_hits: int = 0
    written: list[tuple[Path, int, int]] = field(default_factory=list)  # (file, records, conversations)


def generate(options: Options, say: Callable[[str], None] = print) -> Result:
    """Read the glossary, write the conversations, and the output file(s); raises AffinerError on bad input."""
    _check_options(options)
    _check_outputs(options)
    glossary = read_glossary(options.glossary, options.columns)
    held_out = options.test_per_entry if options.test_output else 0
    if options.endpoint is None:
        result = _offline(glossary, options, held_out)
    else:
        result = _with_endpoint(glossary, options, held_out, say)
    files = [(options.output, result.train)] + ([(options.test_output, result.test)] if options.test_output else [])
    for path, records in files:
        if not records:
            raise AffinerError(f"no conversation for {path}: nothing was written.")
    _write_json(files)
    result.written = [(path, len(records), sum(len(r["conversation"]) for r in records)) for path, records in files]
    return result


def _check_options(options: Options) -> None:
    problems = []
    if options.per_entry < 1:
        problems.append(f"--per-entry must be at least 1 (got {options.per_entry})")
    if options.test_output is not None and options.test_per_entry < 1:
        problems.append(f"--test-per-entry must be at least 1 (got {options.test_per_entry})")
    unknown = [code for code in options.languages if code not in LANGUAGES]
    if unknown or not options.languages:
        problems.append(f"--languages has unknown language code(s) {', '.join(map(repr, unknown)) or '(none)'}; "
                        f"supported: {', '.join(LANGUAGES)}")
    endpoint = options.endpoint
    if endpoint is not None:
        if endpoint.concurrency < 1:
            problems.append(f"--concurrency must be at least 1 (got {endpoint.concurrency})")
        if endpoint.max_attempts < 1:
            problems.append(f"--max-attempts must be at least 1 (got {endpoint.max_attempts})")
        if endpoint.temperature < 0:
            problems.append(f"--temperature must be 0 or more (got {endpoint.temperature:g})")
    if problems:
        raise AffinerError(f"affiner generate cannot run: {'; '.join(problems)}.")
    if endpoint is None:
        for count, held, flag in ((options.per_entry, False, "--per-entry"),
                                  (options.test_per_entry if options.test_output else 0, True, "--test-per-entry")):
            if count > offline_capacity(held):
                raise AffinerError(f"{flag} {count} is more than the offline phrasings can give without repeating "
                                   f"a question: the maximum is {offline_capacity(held)} per entry and language. "
                                   f"Lower {flag}, or let a model write the conversations with --endpoint.")


def _check_outputs(options: Options) -> None:
    paths = [options.output] + ([options.test_output] if options.test_output else [])
    if options.test_output and options.output.resolve() == options.test_output.resolve():
        raise AffinerError(f"--output and --test-output are the same file ({options.output}); the held-out "
                           "conversations need a file of their own.")
    for path in paths:
        if path.resolve() == options.glossary.resolve():
            raise AffinerError(f"the output {path} is the glossary itself; write the conversations elsewhere.")
        if path.is_dir():
            raise AffinerError(f"the output {path} is a folder; name a file, e.g. {path / 'glossary-train.json'}.")
        if path.exists() and not options.overwrite:
            raise AffinerError(f"{path} already exists and was left untouched; pass --overwrite to replace it, or "
                               "choose another file.")


def _records(glossary: Glossary, languages: tuple[str, ...],
             conversations: dict[tuple[int, str], list[Conversation]]) -> list[dict[str, Any]]:
    """One record per acronym (per localized acronym, for SKOS labels that differ by language)."""
    records: dict[tuple[int, str, str], dict[str, Any]] = {}
    for index, entry in enumerate(glossary.entries):
        for language in languages:
            found = conversations.get((index, language), [])
            if not found:
                continue
            term = entry.in_language(language)
            record = records.setdefault((index, term.acronym, term.definition), {
                "acronym": term.acronym, "ground_truth": term.definition, "languages": [], "conversation": []})
            record["languages"].append(language)
            record["conversation"] += found
    return list(records.values())


def _offline(glossary: Glossary, options: Options, held_out: int) -> Result:
    train, test = {}, {}
    counts = {"train": Counter(), "test": Counter()}
    for index, entry in enumerate(glossary.entries):
        for language in options.languages:
            term = entry.in_language(language)
            train[index, language] = offline_conversations(term, language, options.per_entry, options.seed)
            counts["train"][language] += options.per_entry
            if held_out:
                test[index, language] = offline_conversations(term, language, held_out, options.seed, held_out=True)
                counts["test"][language] += held_out
    return Result(glossary, _records(glossary, options.languages, train),
                  _records(glossary, options.languages, test), counts)


def _with_endpoint(glossary: Glossary, options: Options, held_out: int, say: Callable[[str], None]) -> Result:
    endpoint = options.endpoint
    assert endpoint is not None
    client = _endpoint_client(endpoint)
    units = [_Unit(index, entry.in_language(language), language, options.per_entry + held_out)
             for index, entry in enumerate(glossary.entries) for language in options.languages]
    say(f"asking {endpoint.model} at {endpoint.url} for {options.per_entry + held_out} conversations for each of "
        f"{len(glossary.entries)} entries in {', '.join(options.languages)} ({len(units)} requests at least; "
        f"cached replies are reused)")
    _run_units(units, endpoint, client)
    empty = [unit for unit in units if not unit.conversations]
    if empty:
        listed = "; ".join(f"{u.where} from {glossary.entries[u.entry].where}: "
                           f"{u.drops.describe() or 'no reply'}" for u in empty[:10])
        more = f" (and {len(empty) - 10} more)" if len(empty) > 10 else ""
        raise AffinerError(f"after {endpoint.max_attempts} attempt(s), {endpoint.model} at {endpoint.url} gave no "
                           f"usable conversation for {len(empty)} entry/language pair(s): {listed}{more}. Nothing "
                           f"was written; the good replies are cached, so running the same command again asks only "
                           f"for the missing ones (raise --max-attempts, or try another --model).")
    return _split_units(glossary, options, units, held_out, client)


def _split_units(glossary: Glossary, options: Options, units: list[_Unit], held_out: int, client) -> Result:
    train, test = {}, {}
    counts = {"train": Counter(), "test": Counter()}
    drops, short = Drops(), []
    for unit in units:
        drops.merge(unit.drops)
        key = (unit.entry, unit.language)
        train[key] = unit.conversations[: options.per_entry]
        test[key] = unit.conversations[options.per_entry:]
        counts["train"][unit.language] += len(train[key])
        counts["test"][unit.language] += len(test[key])
        if len(unit.conversations) < unit.need:
            short.append(f"{unit.where} {len(unit.conversations)} of {unit.need}")
    # A question written for one language may come back in another; held-out questions stay unseen anyway.
    for index, entry in enumerate(glossary.entries):
        trained = {question_key(c[0]["content"]) for lang in options.languages for c in train[index, lang]}
        for lang in options.languages:
            before = test[index, lang]
            test[index, lang] = [c for c in before if question_key(c[0]["content"]) not in trained]
            removed = len(before) - len(test[index, lang])
            if removed:
                drops.add("held-out question also in training", f"{entry.term.acronym} ({lang})", times=removed)
                counts["test"][lang] -= removed
    return Result(glossary, _records(glossary, options.languages, train),
                  _records(glossary, options.languages, test) if held_out else [], counts,
                  conversation_drops=drops, short=short, requests_sent=client.requests_sent,
                  cache_hits=client.cache_hits)


def _write_json(files: list[tuple[Path, list[dict[str, Any]]]]) -> None:
    """Write every file beside its target first, then move them in: a failure leaves the old files as they were."""
    written: list[tuple[Path, Path]] = []
    try:
        for path, records in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            # A plain open (not mkstemp) so that the file gets the user's usual permissions.
            temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            written.append((temporary, path))
            temporary.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        for temporary, path in written:
            os.replace(temporary, path)
    except OSError as error:
        raise AffinerError(f"cannot write {error.filename or 'the output'}: {error.strerror or error}.") from None
    finally:
        for temporary, _ in written:
            temporary.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------- summary


def summary(result: Result, options: Options) -> str:
    glossary = result.glossary
    lines = [f"{options.glossary}: read {glossary.read} entries, kept {len(glossary.entries)}"
             + (f", dropped {glossary.drops.total()}: {glossary.drops.describe()}" if glossary.drops.total() else "")]
    per_language = []
    for language in options.languages:
        text = f"{language} {result.counts['train'][language]} train"
        if options.test_output:
            text += f" + {result.counts['test'][language]} held-out"
        per_language.append(text)
    lines.append(f"conversations: {', '.join(per_language)}")
    if options.endpoint is not None:
        line = (f"endpoint {options.endpoint.url} ({options.endpoint.model}): {result.requests_sent} requests sent, "
                f"{result.cache_hits} replies from the cache")
        if result.conversation_drops.total():
            line += f"; dropped {result.conversation_drops.total()} conversations: " \
                    f"{result.conversation_drops.describe()}"
        lines.append(line)
        if result.short:
            lines.append(f"fewer conversations than asked for: {', '.join(result.short[:10])}"
                         + (", ..." if len(result.short) > 10 else "") + " (rerun with a higher --max-attempts "
                                                                          "to ask for more)")
    for path, records, conversations in result.written:
        lines.append(f"wrote {path} ({records} records, {conversations} conversations)")
    # The recipe's own test file holds other acronyms: without a held-out file of ours, hold out part of ours.
    test = f"data.test={shlex.quote(str(options.test_output))}" if options.test_output else "data.test=null"
    lines.append(f"next: affiner train {RECIPE} --set data.train={shlex.quote(str(options.output))} --set {test}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("glossary", help="JSON, JSONL or CSV of acronym and definition, or SKOS RDF/XML")
    parser.add_argument("--output", required=True, metavar="FILE", help="training conversations (JSON)")
    parser.add_argument("--per-entry", type=int, default=8, metavar="N",
                        help="training conversations per entry and language (default 8)")
    parser.add_argument("--languages", default="en,fr", metavar="CODES", help="comma-separated: en, fr (default en,fr)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="offline phrasing choice (default 0)")
    parser.add_argument("--test-output", metavar="FILE", help="held-out conversations, with unseen questions")
    parser.add_argument("--test-per-entry", type=int, metavar="K",
                        help="held-out conversations per entry and language (default 2)")
    parser.add_argument("--columns", metavar="KEY=NAME,...",
                        help="the glossary's names for acronym, definition and description, e.g. "
                             "acronym=term,definition=meaning")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    group = parser.add_argument_group("writing with a model (any OpenAI-compatible server)")
    group.add_argument("--endpoint", metavar="URL", help="base URL, e.g. http://127.0.0.1:11434/v1 (Ollama)")
    group.add_argument("--model", help="model name the endpoint serves, e.g. gemma3:27b")
    group.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the API key")
    group.add_argument("--temperature", type=float, default=0.7, metavar="T", help="sampling temperature (default 0.7)")
    group.add_argument("--concurrency", type=int, default=4, metavar="N", help="requests in flight at once (default 4)")
    group.add_argument("--max-attempts", type=int, default=3, metavar="N",
                       help="requests per entry and language when replies fall short (default 3)")
    group.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS", help="seconds per request (default 300)")


def parse_columns(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    columns = {}
    for item in text.split(","):
        key, sep, name = (part.strip() for part in item.partition("="))
        if not sep or not key or not name:
            raise AffinerError(f"--columns {text!r}: each item must look like key=name, for example "
                               "--columns acronym=term,definition=meaning.")
        if key not in COLUMN_KEYS:
            close = difflib.get_close_matches(key, COLUMN_KEYS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise AffinerError(f"--columns: unknown key '{key}' (known keys: {', '.join(COLUMN_KEYS)}).{hint}")
        columns[key] = name
    return columns


def parse_languages(text: str) -> tuple[str, ...]:
    codes = tuple(dict.fromkeys(code.strip().lower() for code in text.split(",") if code.strip()))
    unknown = [code for code in codes if code not in LANGUAGES]
    if unknown or not codes:
        raise AffinerError(f"--languages {text!r}: unknown language code(s) {', '.join(unknown) or '(none given)'}; "
                           f"supported: {', '.join(LANGUAGES)} (e.g. --languages en,fr).")
    return codes


def options_from_args(args: argparse.Namespace) -> Options:
    endpoint = None
    if args.endpoint:
        if not args.model:
            raise AffinerError("--endpoint needs --model NAME: the name the server knows the model by, for "
                               "example --model gemma3:27b for Ollama.")
        endpoint = EndpointOptions(url=args.endpoint, model=args.model, api_key_env=args.api_key_env,
                                   temperature=args.temperature, concurrency=args.concurrency,
                                   max_attempts=args.max_attempts, timeout=args.timeout)
    elif args.model or args.api_key_env:
        raise AffinerError("--model and --api-key-env only apply with --endpoint URL; without it, conversations "
                           "come from the offline phrasings.")
    if args.test_per_entry is not None and not args.test_output:
        raise AffinerError("--test-per-entry needs --test-output FILE, the file that receives the held-out "
                           "conversations.")
    return Options(glossary=Path(args.glossary).expanduser(), output=Path(args.output).expanduser(),
                   per_entry=args.per_entry, languages=parse_languages(args.languages), seed=args.seed,
                   test_output=Path(args.test_output).expanduser() if args.test_output else None,
                   test_per_entry=2 if args.test_per_entry is None else args.test_per_entry,
                   columns=parse_columns(args.columns), endpoint=endpoint, overwrite=args.overwrite)


def main(args: argparse.Namespace) -> None:
    options = options_from_args(args)
    result = generate(options)
    print(summary(result, options))
