"""Reading a glossary: a JSON list, JSON lines or CSV of acronym and definition, or SKOS RDF/XML.

Entries without an acronym or definition, and exact duplicates, are dropped and counted in a
ledger; one acronym with two definitions is refused, since a model cannot learn both as the meaning.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from affiner.core.errors import AffinerError
from affiner.data.formats import text_of
from affiner.data.ledger import Ledger
from affiner.data.read import read_rows, strict_utf8
from affiner.synth.skos import read_skos
from affiner.synth.terms import Entry, Term, clean

COLUMN_KEYS = ("acronym", "definition", "description")
SKOS_SUFFIXES = (".xml", ".rdf", ".skos")
SUFFIXES = (".json", ".jsonl", ".csv") + SKOS_SUFFIXES

Record = tuple[dict[str, Any], str]  # a row and where it came from


@dataclass(frozen=True)
class Glossary:
    entries: list[Entry]
    read: int  # entries (rows, items, concepts) found in the file
    drops: Ledger  # each dropped entry's row is where it stood ("glossary.csv:4")


def read_glossary(path: Path, columns: dict[str, str] | None = None) -> Glossary:
    """Entries from a JSON, JSONL, CSV or SKOS file; unusable ones dropped and counted, conflicts refused."""
    label = str(path)
    _check_file(path, label)
    drops = Ledger()
    if path.suffix.lower() in SKOS_SUFFIXES:
        if columns:
            raise AffinerError(f"--columns does not apply to the SKOS file {label}: its acronym and definition "
                               "come from skos:prefLabel, skos:altLabel and skos:definition.")
        candidates, read = read_skos(strict_utf8(path, label), label, drops)
    else:
        records = _table_records(path, label)
        candidates, read = _from_records(records, label, columns or {}, drops), len(records)
    if read == 0:
        raise AffinerError(f"glossary {label} holds no entries.")
    entries = _keep(candidates, drops)
    if not entries:
        raise AffinerError(f"glossary {label}: none of its {read} entries is usable ({drops.describe()}).")
    return Glossary(entries=entries, read=read, drops=drops)


def _check_file(path: Path, label: str) -> None:
    if not path.is_file():
        raise AffinerError(f"glossary file {label} does not exist." if not path.exists()
                           else f"glossary {label} is not a file.")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise AffinerError(f"glossary {label} has an unsupported type '{suffix or '(none)'}'; use one of "
                           f"{', '.join(SUFFIXES)} (JSON list, JSON lines, CSV with a header row, SKOS RDF/XML).")


# -- tables: JSON, JSONL, CSV, read as training data is (strict UTF-8, file:line in every error)


def _table_records(path: Path, label: str) -> list[Record]:
    records = []
    for record, where in read_rows(str(path)):
        if "messages" in record and len(record) == 1:  # read_rows' reading of a bare list item
            raise AffinerError(f"{where} must be a JSON object such as {{\"acronym\": \"WHO\", \"definition\": "
                               "\"World Health Organization\"}, not a list.")
        # A blank CSV line is no entry; an empty JSON item is one, dropped and counted ("no acronym").
        if path.suffix.lower() != ".csv" or any(str(value or "").strip() for value in record.values()):
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


def _from_records(records: list[Record], label: str, columns: dict[str, str], drops: Ledger) -> list[Entry]:
    if not records:
        return []
    csv_file = label.lower().endswith(".csv")
    names = {key: _column(records, label, key, columns, csv_file) for key in COLUMN_KEYS}
    candidates = []
    for record, where in records:
        values = {key: _text(record, name, where) for key, name in names.items()}
        if not values["acronym"]:
            drops.drop(where, "no acronym")
        elif not values["definition"]:
            drops.drop(where, "no definition")
        else:
            candidates.append(Entry(Term(values["acronym"], values["definition"], values["description"]), where))
    return candidates


def _text(record: dict[str, Any], name: str | None, where: str) -> str:
    value = record.get(name) if name is not None else None
    # A number is refused as `prepare` refuses it: 1.10 would read "1.1", NaN "nan", 1e400 "inf".
    return clean(text_of(value, f"{where}: '{name}'", required=False))


# -- duplicates and conflicts


def _keep(candidates: list[Entry], drops: Ledger) -> list[Entry]:
    """Entries once each: the same acronym with the same definition (case and spacing aside) is a duplicate; the same
    acronym, written alike, with another definition is a conflict; acronyms that differ only by case are other
    abbreviations (MW, megawatt; mW, milliwatt)."""
    kept: dict[str, Entry] = {}
    meanings: set[tuple[str, str]] = set()  # (acronym, definition), case aside
    for candidate in candidates:
        acronym = candidate.term.acronym
        meaning = (acronym.casefold(), clean(candidate.term.definition).casefold())
        earlier = kept.get(acronym)
        if meaning in meanings:
            drops.drop(candidate.where, "duplicate")
        elif earlier is None:
            kept[acronym] = candidate
            meanings.add(meaning)
        else:
            raise AffinerError(f"the acronym {acronym!r} has two different definitions: "
                               f"{earlier.term.definition!r} at {earlier.where} and {candidate.term.definition!r} "
                               f"at {candidate.where}. Keep one (a model cannot learn both as the meaning), or "
                               f"rename one of the acronyms.")
    return list(kept.values())
