"""A glossary entry (an acronym, its definition, perhaps a description) and the conversations made from it."""

from __future__ import annotations

from dataclasses import dataclass, field

Conversation = list[dict[str, str]]  # user and assistant messages, in turn
Pairs = dict[tuple[int, str], list[Conversation]]  # (entry's index in the glossary, language) -> conversations


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
    tagged: frozenset[str] = frozenset()  # the xml:lang codes its labels and definitions carry (SKOS), "en", "fr"

    def in_language(self, language: str) -> Term:
        return self.localized.get(language, self.term)


def clean(text: str) -> str:
    """The text with its whitespace collapsed: hand-written glossaries space and wrap words unevenly."""
    return " ".join(text.split())
