"""Reading SKOS thesauri (RDF/XML, or looser XML using the SKOS namespace) as glossary entries.

A concept's shorter label is the acronym, its longer label the definition, and skos:definition a
description; with a single label, skos:definition is the definition. Labels in several xml:lang
languages give each language its own term.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass

from affiner.core.errors import AffinerError
from affiner.data.ledger import Ledger
from affiner.synth.terms import Entry, Term, clean

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
            text = clean("".join(child.itertext()))
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


def read_skos(text: str, label: str, drops: Ledger) -> tuple[list[Entry], int]:
    """The usable concepts of the file's text, and how many concepts it holds; the others are dropped."""
    root, lines = _parse_xml(text, label)
    entries, read = [], 0
    for number, (element, language) in enumerate(_concepts(root), start=1):
        read += 1
        where = f"{label} concept {number} (line {lines.get(id(element), '?')})"
        fields = list(_fields(element, language))
        term = _skos_term(fields, None)
        if isinstance(term, str):
            drops.drop(where, term)
            continue
        tagged = frozenset(f.language.split("-")[0] for f in fields if f.language)
        localized = {}
        for code in sorted(tagged):
            other = _skos_term(fields, code)
            if isinstance(other, Term) and other != term:
                localized[code] = other
        entries.append(Entry(term, where, localized, tagged))
    return entries, read
