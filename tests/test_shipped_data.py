"""The data affiner ships: counts, languages, kinds, and no held-out row that training has already seen."""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from importlib import resources

import pytest

NEAR_DUPLICATE = 0.6  # character 5-gram Jaccard similarity of instruction + input


def _rows(name: str) -> list[dict]:
    return json.loads(resources.files("affiner").joinpath(f"resources/{name}").read_text(encoding="utf-8"))


def _normal(text: str) -> str:
    text = unicodedata.normalize("NFKD", text.lower())
    return re.sub(r"[^a-z0-9]+", " ", "".join(c for c in text if not unicodedata.combining(c))).strip()


def _grams(row: dict) -> set[str]:
    text = _normal(f"{row['instruction']} {row['input']}")
    return {text[i:i + 5] for i in range(max(1, len(text) - 4))}


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / max(1, len(a | b))


TRAIN, TEST, GENERAL = _rows("instruct-train.json"), _rows("instruct-test.json"), _rows("general.json")


@pytest.mark.parametrize("rows, size, kinds", [(TRAIN, 600, 15), (TEST, 120, 15), (GENERAL, 80, 6)],
                         ids=["instruct-train", "instruct-test", "general"])
def test_each_set_has_its_size_kinds_and_both_languages(rows, size, kinds):
    assert len(rows) >= size
    assert len({r["kind"] for r in rows}) >= kinds
    languages = Counter(r["lang"] for r in rows)
    assert set(languages) == {"en", "fr"} and min(languages.values()) >= 0.4 * len(rows)
    assert all(isinstance(r[k], str) for r in rows for k in ("instruction", "input", "output"))
    assert all(r["instruction"].strip() and r["output"].strip() for r in rows)


def test_answers_have_realistic_varied_lengths():
    words = sorted(len(r["output"].split()) for r in TRAIN + TEST)
    assert words[0] >= 5 and words[-1] <= 220 and 30 <= words[len(words) // 2] <= 120


@pytest.mark.parametrize("held_out", [TEST, GENERAL], ids=["instruct-test", "general"])
def test_no_held_out_row_duplicates_or_nearly_duplicates_a_training_row(held_out):
    seen = {_normal(f"{r['instruction']} {r['input']}") for r in TRAIN}
    assert not [r["instruction"] for r in held_out if _normal(f"{r['instruction']} {r['input']}") in seen]
    train_grams = [_grams(r) for r in TRAIN]
    close = [(r["instruction"], max(_jaccard(_grams(r), g) for g in train_grams)) for r in held_out]
    assert [c for c in close if c[1] >= NEAR_DUPLICATE] == []


@pytest.mark.parametrize("rows", [TRAIN, TEST, GENERAL], ids=["instruct-train", "instruct-test", "general"])
def test_no_duplicate_within_a_set(rows):
    keys = Counter(_normal(f"{r['instruction']} {r['input']}") for r in rows)
    assert [k for k, n in keys.items() if n > 1] == []
