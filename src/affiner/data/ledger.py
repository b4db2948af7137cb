"""The ledger of dropped rows: how many rows each step read, dropped (by reason) and kept.

One ledger serves every place rows are dropped (prepare and train's cleaning, the synthetic-data
generator), so the data card, the terminal summary and the error messages count rows alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Dropped = list[tuple[Any, str]]  # (row, reason)


@dataclass
class Ledger:
    """Rows in, dropped (by reason) and kept at each step, per split: the data card's table."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    dropped: Dropped = field(default_factory=list)

    def record(self, side: str, step: str, before: int, kept: list, dropped: Dropped) -> list:
        reasons: dict[str, int] = {}
        for _, reason in dropped:
            reasons[reason] = reasons.get(reason, 0) + 1
        self.steps.append({"split": side, "step": step, "in": before, "dropped": reasons, "kept": len(kept)})
        self.dropped += dropped
        return kept

    def summary(self) -> str:
        lines = []
        for s in self.steps:
            why = "; ".join(f"{n} {reason}" for reason, n in s["dropped"].items())
            lines.append(f"  {s['split']:<5} {s['step']:<22} {s['in']:>8} -> {s['kept']:>8}" + (f"  ({why})" if why else ""))
        return "\n".join(lines)

    def drop(self, row: Any, reason: str, times: int = 1) -> None:
        """Rows dropped outside a counted step (one reply of an endpoint, say): counted in totals and messages."""
        self.dropped += [(row, reason)] * times

    def merge(self, other: "Ledger") -> None:
        self.steps += other.steps
        self.dropped += other.dropped

    @property
    def total(self) -> int:
        return len(self.dropped)

    def counts(self) -> dict[str, int]:
        """How many rows were dropped for each reason, in the order reasons first appeared."""
        counts: dict[str, int] = {}
        for _, reason in self.dropped:
            counts[reason] = counts.get(reason, 0) + 1
        return counts

    def describe(self, shown: int = 3) -> str:
        """'2 empty question (f:2, f:3); 1 exact duplicate (f:9)': the most frequent reason first, each with
        its first distinct places ("..." means more places than shown, not more rows)."""
        places: dict[str, dict[str, None]] = {}
        for row, reason in self.dropped:
            where = row if isinstance(row, str) else getattr(row, "source", "")
            places.setdefault(reason, {}).update({where: None} if where else {})
        parts = []
        for reason, n in sorted(self.counts().items(), key=lambda item: -item[1]):
            listed = list(places[reason])
            more = ", ..." if len(listed) > shown else ""
            parts.append(f"{n} {reason}" + (f" ({', '.join(listed[:shown])}{more})" if listed else ""))
        return "; ".join(parts)
