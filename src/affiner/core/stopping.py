"""Where an answer ends for a reader: at a stop token, or where the model starts a new turn of its template.

A base model prompted with `### Question: ...\n### Answer:` answers, then writes `### Question:` again and
goes on until the token limit: everything from that marker on is another turn nobody asked for. Generation
stops there (for every row of a batch on its own), the marker and what follows are cut from the answer, and
the answer is counted as having run into a new turn, not as having stopped by itself. A marker opens a turn
only at the start of a line: "Réponse:" in the middle of a French sentence is part of the answer.
"""

from __future__ import annotations

from affiner.core.templates import Template

TAIL_TOKENS = 16  # how many of the newest tokens are decoded to look for a marker (markers are a few tokens)


def turn_markers(template: Template) -> tuple[str, ...]:
    """The literal text that opens each part of a text template's prompt ("### Question:", "### Answer:"),
    read from the template saved with the run; none for chat templates, whose turns end with a stop token."""
    if template.is_chat:
        return ()
    markers = []
    for line in (template.prompt_with_input or template.prompt).splitlines():
        literal = line.split("{", 1)[0].strip()
        if literal and literal not in markers:
            markers.append(literal)
    return tuple(markers)


def marker_at(text: str, markers: tuple[str, ...], anywhere: bool = False, opens_line: bool = True) -> int | None:
    """Where the first marker in `text` begins, or None. A template's turn marker counts only where a turn can
    begin, at the start of a line (spaces before it allowed): "Réponse:" or "### Answer:" inside a sentence is
    part of the answer, as it was in training. `opens_line`: whether `text` itself starts a line (the answer's
    start does; a tail cut from its middle does not). A stop text of a request counts `anywhere`, as OpenAI's."""
    found = []
    for marker in markers:
        start = text.find(marker)
        while start >= 0:
            before, newline, line = text[:start].rpartition("\n")
            if anywhere or (not line.strip(" \t") and (newline or opens_line)):
                found.append(start)
                break
            start = text.find(marker, start + 1)
    return min(found, default=None)


def cut_at_turn(text: str, markers: tuple[str, ...], anywhere: bool = False) -> tuple[str, bool]:
    """`text` up to the first marker (without it), and whether one was found (see `marker_at`)."""
    at = marker_at(text, markers, anywhere)
    return (text, False) if at is None else (text[:at], True)


def trim_unfinished_marker(text: str, markers: tuple[str, ...]) -> str:
    """`text` without a last line that only begins a marker: an answer the token limit ended inside "\n### Quest"
    ends where that marker began, as `cut_at_turn` cuts a whole one. The marker was never finished, so the answer
    is not counted as a new turn; its tokens were all generated, and stay counted."""
    start = text.rpartition("\n")[2].lstrip(" \t")
    if start and any(marker.startswith(start) for marker in markers):
        return text[:len(text) - len(start)]
    return text


class RowEnds:
    """For a batch decoder (`decode_rows`' `done`): which rows have ended, besides at a stop token, given each row's
    new tokens so far: at the row's own token limit, at a new turn of its template (`markers`), at one of its
    request's stop texts (`stops`, found anywhere) or when its `cancel` event is set. Evaluation's batches and
    serve's share it, so that a row ends at the same token in both."""

    def __init__(self, tokenizer, limits: list[int], markers: list[tuple[str, ...]],
                 stops: list[tuple[str, ...]] | None = None, cancels: list | None = None):
        self.tokenizer, self.limits, self.markers = tokenizer, limits, markers
        self.stops, self.cancels = stops or [()] * len(limits), cancels or [None] * len(limits)
        # A stop text may be longer than a marker: each of its characters can take up to 4 byte tokens.
        self.tail = max([TAIL_TOKENS, *(4 * len(text) for row in self.stops for text in row)])
        self.reads_text = any(self.markers) or any(self.stops)

    def __call__(self, rows: list[int], new_tokens: list[list[int]]) -> list[bool]:
        tails = (self.tokenizer.batch_decode([tokens[-self.tail:] for tokens in new_tokens], skip_special_tokens=True)
                 if self.reads_text else [""] * len(rows))
        return [len(tokens) >= self.limits[row] or (self.cancels[row] is not None and self.cancels[row].is_set())
                or marker_at(tail, self.markers[row], opens_line=len(tokens) <= self.tail) is not None
                or marker_at(tail, self.stops[row], anywhere=True) is not None
                for row, tokens, tail in zip(rows, new_tokens, tails)]


class TurnCutter:
    """Streamed text with the new turn (or, `anywhere`, a request's stop text) cut out: a piece is held back
    while it could be the start of a marker, and nothing from a marker on is let through."""

    def __init__(self, markers: tuple[str, ...], anywhere: bool = False):
        self.markers, self.anywhere, self.cut = markers, anywhere, False
        self.text, self.released = "", 0  # all the text fed, and how much of it was let through

    def feed(self, piece: str) -> str:
        if self.cut:
            return ""
        self.text += piece
        kept, self.cut = cut_at_turn(self.text, self.markers, self.anywhere)
        if not self.cut:
            longest = max((len(m) - 1 for m in self.markers), default=0)
            hold = next((k for k in range(min(longest, len(kept)), 0, -1)
                         if any(m.startswith(kept[-k:]) for m in self.markers)), 0)
            kept = kept[:len(kept) - hold]
        ready, self.released = kept[self.released:], max(self.released, len(kept))
        return ready

    def flush(self, trim: bool = False) -> str:
        """What was held back, at the end: none of a new turn, nor, with `trim` (no stop token ended the answer),
        of a marker the limit left unfinished. A request's stop text, found `anywhere`, may begin mid-line: its
        unfinished start is text."""
        whole = trim_unfinished_marker(self.text, self.markers) if trim and not self.anywhere else self.text
        rest, self.released = ("" if self.cut else whole[self.released:]), len(self.text)
        return rest


class Trim:
    """Strips a streamed answer as a whole answer is stripped (`Engine.complete`, serve's replies, chat): leading
    whitespace is dropped and trailing whitespace held back until more text follows, so the pieces add up to the
    stripped answer."""

    def __init__(self) -> None:
        self.started, self.pending = False, ""

    def feed(self, piece: str) -> str:
        text = self.pending + piece
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        kept = text.rstrip()
        self.pending = text[len(kept):]
        return kept
