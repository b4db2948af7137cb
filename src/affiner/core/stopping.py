"""Where an answer ends for a reader: at a stop token, or where the model starts a new turn of its template.

A base model prompted with `### Question: ...\n### Answer:` answers, then writes `### Question:` again and
goes on until the token limit: everything from that marker on is another turn nobody asked for. Generation
stops there (for every row of a batch on its own), the marker and what follows are cut from the answer, and
the answer is counted as having run into a new turn, not as having stopped by itself.
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


def cut_at_turn(text: str, markers: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the first marker (without it), and whether one was found."""
    found = [i for i in (text.find(m) for m in markers) if i >= 0]
    return (text[:min(found)], True) if found else (text, False)


class TurnStop:
    """For a batch decoder: which rows have started a new turn, given each row's new tokens so far."""

    def __init__(self, markers: tuple[str, ...], tokenizer):
        self.markers, self.tokenizer = markers, tokenizer

    def __call__(self, rows: list[int], new_tokens: list[list[int]]) -> list[bool]:
        tails = self.tokenizer.batch_decode([tokens[-TAIL_TOKENS:] for tokens in new_tokens], skip_special_tokens=True)
        return [any(m in tail for m in self.markers) for tail in tails]


class TurnCutter:
    """Streamed text with the new turn cut out: a piece is held back while it could be the start of a marker,
    and nothing after a marker is let through."""

    def __init__(self, markers: tuple[str, ...]):
        self.markers, self.pending, self.cut = markers, "", False

    def feed(self, piece: str) -> str:
        if self.cut:
            return ""
        self.pending += piece
        text, self.cut = cut_at_turn(self.pending, self.markers)
        if self.cut:
            self.pending = ""
            return text
        keep = max((len(m) - 1 for m in self.markers), default=0)
        hold = next((k for k in range(min(keep, len(text)), 0, -1) if any(m.startswith(text[-k:])
                                                                           for m in self.markers)), 0)
        ready, self.pending = (text[:-hold], text[-hold:]) if hold else (text, "")
        return ready

    def flush(self) -> str:
        rest, self.pending = self.pending, ""
        return "" if self.cut else rest
