"""How much wider an evaluation's intervals are when a group of questions is resampled as one (the test file's
`group` column, one acronym's paraphrases) than when every question counts as independent.

    .venv/bin/python bench/grouped_intervals.py --run runs/quickstart-20261201-063407

Reads the run's answers.csv (each model's per-question scores) and test_examples.json (each question's group),
recomputes every interval both ways with affiner's own bootstrap, and prints the widths and their ratio, per model
and for the paired change (tuned - base): the README's figures for the quickstart come from here.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from affiner.evaluation.metrics import bootstrap_interval

SCORES = ("contains", "rouge_l", "bleu", "chrf", "embedding", "tokens", "new_turn", "repetition")


def width(values: list[float], groups: list[str] | None) -> float:
    low, high = bootstrap_interval(values, groups=groups)
    return high - low


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="an evaluated run folder")
    args = parser.parse_args()
    rows = list(csv.DictReader((args.run / "answers.csv").open(encoding="utf-8-sig")))
    examples = json.loads((args.run / "test_examples.json").read_text(encoding="utf-8"))
    if [row["question"] for row in rows] != [example["instruction"] for example in examples]:
        raise SystemExit("answers.csv and test_examples.json do not hold the same questions in the same order "
                         "(an evaluation with --test or --max-questions): evaluate the run on its own split.")
    groups = [example.get("group", "") for example in examples]
    print(f"{len(rows)} questions in {len({g or i for i, g in enumerate(groups)})} groups")
    print(f"{'score':12} {'of':7} {'independent':>11} {'grouped':>9} {'ratio':>6}")
    for score in SCORES:
        if f"base_{score}" not in rows[0]:
            continue
        series = {model: [float(row[f"{model}_{score}"]) for row in rows] for model in ("base", "tuned")}
        series["change"] = [t - b for t, b in zip(series["tuned"], series["base"])]
        for of, values in series.items():
            alone, grouped = width(values, None), width(values, groups)
            ratio = f"{grouped / alone:.2f}" if alone > 0 else "-"
            print(f"{score:12} {of:7} {alone:11.3f} {grouped:9.3f} {ratio:>6}")


if __name__ == "__main__":
    main()
