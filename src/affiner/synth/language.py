"""Which languages a glossary is written in, to choose the languages of its conversations.

The rule, entry by entry:
  - SKOS labels or definitions tagged xml:lang="en" or "fr" say it: an entry tagged in both is both.
  - Otherwise its definition and description are read word by word: English function words (the, of,
    and, for...) count for English; French ones (de, la, les, et, pour, l'...) and words with French
    accents count for French. The language with more of them wins; a tie, often none at all
    ("Central Processing Unit"), leaves the entry undecided.
Then the glossary: every language that at least a fifth of the decided entries read as is chosen. A
fifth, because a few French names in an English glossary ("Conseil européen pour la recherche
nucléaire") must not make half of its conversations French, while a glossary a fifth or more of which
is in the other language has readers asking in both. When no entry is decided, English, and the reason
says so.

Only the languages with phrasing banks (English, French) are told apart: a stop-word count over two
languages is small, offline and explainable, which a general detector would not be.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from affiner.synth.banks import LANGUAGES
from affiner.synth.terms import Entry

DEFAULT = "en"  # when nothing can be told: the language most glossaries of acronyms are written in
MINORITY_SHARE = 0.2  # a language read in at least this share of the decided entries is generated too

# Words that belong to one of the two languages only ("a", "on", "as" are left out: both have them).
FUNCTION_WORDS = {
    "en": frozenset("the of and for to in with by from at is are its that which this or an into between "
                    "used when who where".split()),
    "fr": frozenset("le la les de des du et pour en un une au aux à par sur dans est sont qui que avec ou "
                    "ce cette entre lorsque dont".split()),
}
_WORD = re.compile(r"[^\W\d_]+")
_ELISION = re.compile(r"\b(?:l|d|qu)['’](?=[^\W\d_])", re.IGNORECASE)  # l'agence, d'information, qu'elle
_FRENCH_LETTERS = re.compile(r"[àâçéèêëîïôûùüÿœ]")


@dataclass(frozen=True)
class LanguageChoice:
    languages: tuple[str, ...]
    reason: str  # why, for the summary: "detected: 28 of 30 entries read as English; --languages en,fr for both"


def text_language(text: str) -> str | None:
    """Which of en and fr the text reads as, by its function words (and accented words for French); None on a tie."""
    lowered = text.lower()
    words = _WORD.findall(_ELISION.sub(" ", lowered))
    english = sum(word in FUNCTION_WORDS["en"] for word in words)
    french = (sum(word in FUNCTION_WORDS["fr"] for word in words) + len(_ELISION.findall(lowered))
              + sum(bool(_FRENCH_LETTERS.search(word)) for word in words))
    if english == french:
        return None
    return "en" if english > french else "fr"


def entry_languages(entry: Entry) -> frozenset[str]:
    """The languages an entry is written in: its en/fr xml:lang tags, else what its text reads as (maybe none)."""
    tagged = frozenset(code for code in entry.tagged if code in LANGUAGES)
    if tagged:
        return tagged
    found = text_language(f"{entry.term.definition} {entry.term.description}")
    return frozenset([found] if found else [])


def detect_languages(entries: Iterable[Entry]) -> LanguageChoice:
    """The languages to write conversations in, and the reason in a few words (see the module's rule)."""
    per_entry = [entry_languages(entry) for entry in entries]
    decided = [found for found in per_entry if found]
    if not decided:
        return LanguageChoice((DEFAULT,), f"undecided: none of the {len(per_entry)} entries has English or "
                                          f"French words beyond names, so {LANGUAGES[DEFAULT]}; --languages "
                                          f"fr or en,fr to choose")
    counts = Counter(code for found in decided for code in found)
    chosen = tuple(code for code in LANGUAGES if counts[code] >= MINORITY_SHARE * len(decided))
    return LanguageChoice(chosen, f"detected: {_readings(counts, chosen, len(per_entry), len(decided))}; "
                                  f"--languages {'en,fr for both' if len(chosen) == 1 else 'en or fr for one'}")


def _readings(counts: Counter, chosen: tuple[str, ...], entries: int, decided: int) -> str:
    """ "28 of 30 entries read as English, 2 as French (under a fifth)", the most read language first."""
    parts = []
    for code in sorted(counts, key=lambda code: (-counts[code], code)):
        read_as = f"{counts[code]} of {entries} entries read as" if not parts else f"{counts[code]} as"
        parts.append(f"{read_as} {LANGUAGES[code]}" + ("" if code in chosen else " (under a fifth)"))
    if entries > decided:
        parts.append(f"{entries - decided} undecided")
    return ", ".join(parts)
