"""Parse local JSON, JSON lines and CSV files into rows, strictly and a line at a time.

A malformed file stops with its file and line: silently losing or merging rows is worse than a
clear stop. JSONL and CSV files are decoded one line at a time, so a huge file (or one 50 MB row)
costs a few times that row in memory, never the whole file several times over.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any, Iterator

from affiner.core.errors import AffinerError
from affiner.core.files import is_text

Row = tuple[dict[str, Any], str]  # a record and where it came from ("file.jsonl:12")
MESSAGE_KEYS = {"role", "content", "from", "value"}  # a message's keys (ShareGPT's from/value among them)

DEEP = 100  # lists or objects nested deeper than this are no training record; where they start is the line we name
_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')
_QUOTED_REST = re.compile(r'[^"]*(?:""[^"]*)*')  # the inside of a quoted cell, up to its closing quote
# An unquoted cell, up to its separator: a comma, or the semicolon that spreadsheets write where the comma is the
# decimal mark (French Excel's "CSV"), found in the header.
_UNQUOTED = {separator: re.compile(rf"[^{separator}\r\n]*") for separator in ",;"}


# ---------------------------------------------------------------------------------------- UTF-8


def strict_utf8(path: Path, label: str) -> str:
    """The whole file as text (a JSON document, an XML file); invalid UTF-8 names its line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise _not_utf8(label, line, raw[exc.start]) from None


def utf8_lines(path: Path, label: str) -> Iterator[tuple[int, str]]:
    """(line number, line with its line ending), decoded one line at a time. Only "\\n" ends a line, as in
    JSON lines (a U+2028 inside a JSON string is text) and CSV (a CR LF keeps its CR for the csv module)."""
    with path.open("rb") as stream:
        for number, raw in enumerate(stream, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _not_utf8(label, number, raw[exc.start]) from None
            yield number, line.removeprefix("\ufeff") if number == 1 else line


def _not_utf8(label: str, line: int, byte: int) -> AffinerError:
    return AffinerError(f"{label}:{line} is not valid UTF-8 (byte 0x{byte:02x}); re-save the file as UTF-8.")


# ---------------------------------------------------------------------------------------- JSON


def read_jsonl(path: Path, label: str) -> list[Row]:
    rows = []
    for number, line in utf8_lines(path, label):
        if not line or line.isspace():  # isspace, not strip: no copy of a long line
            continue
        where = f"{label}:{number}"
        item = loads(line, label, number)
        if isinstance(item, list) and item and all(isinstance(m, dict) and not m.keys() & MESSAGE_KEYS for m in item):
            raise AffinerError(f"{where} is a JSON list of records, not one record: a .jsonl file holds one JSON "
                               "object per line. A file that is one JSON list is read as .json: rename it.")
        rows.append((as_record(item, where), where))
    return rows


def read_json(path: Path, label: str) -> list[Row]:
    data = loads(strict_utf8(path, label), label)
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise AffinerError(f"{label} must hold a JSON list of records (or {{\"data\": [...]}}), "
                           f"not a {type(data).__name__}.")
    return [(as_record(item, f"{label} item {i}"), f"{label} item {i}") for i, item in enumerate(data, 1)]


class _NotOneText(ValueError):
    """A JSON object that no reader could take as the writer meant it: a key given twice, or a lone surrogate."""


def _checked_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (json keeps the last, dropping the first unseen) and a string
    holding a lone UTF-16 surrogate (an escape such as \\ud800 without its pair: no file or tokenizer holds it)."""
    record = dict(pairs)
    if len(record) != len(pairs):
        twice = next(key for i, (key, _) in enumerate(pairs) if any(key == other for other, _ in pairs[:i]))
        raise _NotOneText(f"gives the key '{twice[:80]}' twice in one object; json would keep the second and drop the "
                          "first unseen: keep one")
    for key, value in pairs:
        if not (is_text(key) and (not isinstance(value, str) or is_text(value))):
            raise _NotOneText(f"'{key[:80]}' holds a lone UTF-16 surrogate (an escape such as \\ud800 without its "
                              "pair), which is no text: fix or remove it")
    return record


def loads(text: str, label: str, line: int | None = None) -> Any:
    """json.loads naming `label`:line on failure; `line` is the JSONL line (None: a whole JSON file)."""
    try:  # a JSONL line without its line break: a record cut short is then told at its end, not "column 1" after it
        return json.loads(text.rstrip("\r\n") if line else text, object_pairs_hook=_checked_object)
    except _NotOneText as exc:
        raise AffinerError(f"{label}{f':{line}' if line else ''} {exc}.") from None
    except json.JSONDecodeError as exc:
        raise AffinerError(f"{label}:{line or exc.lineno} is not valid JSON: {exc.msg} (column {exc.colno}).") from None
    except ValueError:  # an integer of more digits than Python converts (4300)
        digits = re.search(r"\d{4300}", text)
        at = line or (text.count("\n", 0, digits.start()) + 1 if digits else 1)
        raise AffinerError(f"{label}:{at} holds a number of more than 4300 digits, which no training text is; "
                           "quote it if it is meant as text.") from None
    except RecursionError:  # "[[[[..." a thousand deep exhausts the decoder's stack
        deep_line, column = _where_too_deep(text)
        raise AffinerError(f"{label}:{line or deep_line} nests lists or objects too deep to read (more than {DEEP} "
                           f"levels from column {column} on). A record is an object of texts, or a list of "
                           "{role, content} messages; fix or remove this line.") from None


def _where_too_deep(text: str) -> tuple[int, int]:
    """(line, column) where nesting first goes deeper than DEEP, brackets inside strings left out."""
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        char = text[match.start()]
        depth += 1 if char in "[{" else -1 if char in "]}" else 0
        if depth > DEEP:
            line_start = text.rfind("\n", 0, match.start()) + 1
            return text.count("\n", 0, match.start()) + 1, match.start() - line_start + 1
    return 1, 1


def as_record(item: Any, where: str) -> dict[str, Any]:
    if isinstance(item, list):  # a bare conversation: [{role, content}, ...]
        return {"messages": item}
    if not isinstance(item, dict):
        raise AffinerError(f"{where} must be a JSON object (or a list of messages), not {type(item).__name__}.")
    return item


# ---------------------------------------------------------------------------------------- CSV


def read_csv(path: Path, label: str) -> list[Row]:
    """Rows of a CSV file with a header, comma- or (as the header shows) semicolon-separated, read strictly (RFC
    4180, as Excel writes it): a quote that never
    closes, or text after a closing quote, stops with its line instead of merging the lines after it
    into one cell. Parsed here rather than by the csv module, which holds a cell at 4 bytes a character."""
    records = _csv_records(path, label)
    _, header = next(records, (1, []))
    if not header:
        raise AffinerError(f"{label} is empty: a CSV file needs a header row.")
    twice = next((name for i, name in enumerate(header) if name.strip() and name in header[:i]), None)
    if twice is not None:  # a row is read by column name: one of the two would be dropped unseen
        raise AffinerError(f"{label}:1 names the column {twice!r} twice ({', '.join(header)}); rename one of them.")
    rows = []
    for start, cells in records:
        if not cells:
            continue  # a blank line
        if len(cells) > len(header):
            raise AffinerError(f"{label}:{start} has more fields than the header ({', '.join(header)}); quote a "
                               "cell that holds the separator (a comma; a semicolon where the header is separated "
                               "by semicolons).")
        if len(cells) < len(header) and any(cell.strip() for cell in cells):
            raise AffinerError(f"{label}:{start} has {len(cells)} of the header's {len(header)} fields "
                               f"({', '.join(header)}); a cell that holds a line break must be quoted.")
        rows.append(({name: cells[i] if i < len(cells) else "" for i, name in enumerate(header)}, f"{label}:{start}"))
    return rows


def _csv_records(path: Path, label: str) -> Iterator[tuple[int, list[str]]]:
    """(first line, cells) of each record; a quoted cell may span lines. A blank line gives no cells."""
    lines, separator = _universal_lines(path, label), None
    for start, line in lines:
        if line in ("\n", "\r", "\r\n"):
            yield start, []
            continue
        separator = separator or (";" if ";" in line and "," not in line else ",")  # decided by the header
        cells, at, number = [], 0, start
        while True:
            if line.startswith('"', at):
                cell, number, line, at = _quoted_cell(lines, start, line, at + 1, label)
                cells.append(cell)
            else:
                end = _UNQUOTED[separator].match(line, at).end()
                cells.append(line[at:end])
                at = end
            if not line.startswith(separator, at):
                break
            at += 1
        if line[at:] not in ("", "\n", "\r", "\r\n"):  # only a closing quote stops a cell elsewhere
            unclosed = (f" The cell's quote opened on line {start}: most likely it is never closed there, and "
                        f"line {number}'s own opening quote was read as its end." if number != start else "")
            raise AffinerError(f"{label}:{number} is not valid CSV: a quoted cell has text after its closing quote."
                               f"{unclosed} Quote the whole cell, and write a quote inside it as two (\"\").")
        yield start, cells


def _quoted_cell(lines: Iterator[tuple[int, str]], number: int, line: str, at: int,
                 label: str) -> tuple[str, int, str, int]:
    """(the cell, the number and text of the line its closing quote is on, the position after that quote),
    from just after the opening quote on line `number`; `lines` advances when the cell holds line breaks."""
    opened, parts = number, []
    while True:
        end = _QUOTED_REST.match(line, at).end()
        parts.append(line[at:end])
        if end < len(line):
            return "".join(parts).replace('""', '"'), number, line, end + 1
        number, line = next(lines, (0, None))
        if line is None:
            raise AffinerError(f"{label}:{opened}: the quote opened on line {opened} is never closed, so every "
                               "line after it would be read as one cell. Close the quote, and write a quote inside "
                               "a quoted cell as two (\"\").")
        at = 0


def _universal_lines(path: Path, label: str) -> Iterator[tuple[int, str]]:
    """Lines ended by LF, CR LF or a lone CR (Excel's "CSV (Macintosh)"), each with its ending."""
    with path.open("rb") as raw:
        try:
            yield from enumerate(io.TextIOWrapper(raw, encoding="utf-8-sig", newline=""), start=1)
        except UnicodeDecodeError:
            _name_bad_line(path, label)
            raise


def _name_bad_line(path: Path, label: str) -> None:
    """Raise the error naming the line of the first byte that is not UTF-8, lines ended as in
    `_universal_lines` (LF, CR LF or a lone CR), reading the file again a line at a time."""
    number = 0
    with path.open("rb") as stream:
        for raw in stream:
            parts = re.split(rb"\r(?!\n)", raw)  # a lone CR ends a line too
            for line in parts[:-1] if parts[-1] == b"" else parts:  # nothing after a CR at the very end
                number += 1
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise _not_utf8(label, number, line[exc.start]) from None
