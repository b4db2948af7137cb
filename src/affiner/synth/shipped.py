"""Expand a glossary (acronym, definition) into question/answer conversations in the nested layout.

The held-out questions use phrasings that never appear in training, so an evaluation on them
measures whether the model learned the definitions, not whether it memorised the questions.

Rebuild the shipped files after editing `resources/glossary.json`:

    python -m affiner.synth.shipped
"""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path
from typing import Any

from affiner.synth import banks

# The shipped files use the first English phrasings of `affiner synth`'s banks; fixed slices, so
# adding phrasings to the banks never changes the shipped data (a test rebuilds and compares them).
TRAIN_QUESTIONS = banks.TRAIN_QUESTIONS["en"][:8]
HELD_OUT_QUESTIONS = banks.HELD_OUT_QUESTIONS["en"][:2]
ANSWERS = banks.ANSWERS["en"][:6]


def expand(entries: list[dict[str, str]], questions: tuple[str, ...], seed: int) -> list[dict[str, Any]]:
    """One record per acronym: {acronym, ground_truth, conversation: [[user, assistant], ...]}."""
    rng = random.Random(seed)
    records = []
    for entry in entries:
        fields = {"acronym": entry["acronym"], "definition": entry["definition"]}
        conversations = [[{"role": "user", "content": question.format(**fields)},
                          {"role": "assistant", "content": rng.choice(ANSWERS).format(**fields)}]
                         for question in questions]
        records.append({"acronym": entry["acronym"], "ground_truth": entry["definition"],
                        "conversation": conversations})
    return records


def shipped_glossary() -> list[dict[str, str]]:
    return json.loads((resources.files("affiner") / "resources" / "glossary.json").read_text(encoding="utf-8"))


def build_shipped() -> dict[str, list[dict[str, Any]]]:
    entries = shipped_glossary()
    return {"glossary-train.json": expand(entries, TRAIN_QUESTIONS, seed=1),
            "glossary-test.json": expand(entries, HELD_OUT_QUESTIONS, seed=2)}


def render(records: list[dict[str, Any]]) -> str:
    return json.dumps(records, indent=1, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    folder = Path(__file__).parents[1] / "resources"  # affiner/resources, beside this package
    for name, records in build_shipped().items():
        (folder / name).write_text(render(records), encoding="utf-8")
        print(f"wrote {folder / name} ({sum(len(r['conversation']) for r in records)} conversations)")
