"""Time `affiner prepare` on 100 000 Alpaca-shaped rows with token filtering (target: under 60 s).

    python bench/prepare_speed.py              # 100 000 rows, the embedded Gemma tokenizer
    python bench/prepare_speed.py --rows 20000

The rows are generated here (seeded): instructions, optional inputs and answers of varied length,
with a share of empty answers, exact and near duplicates, answers over 80 words and inputs over
max_length tokens, so that every filter has work to do. The command is timed as a user runs it (a new process: imports, tokenizer
loading, reading, cleaning, counting tokens, splitting, writing, the histogram and the data card).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the a model data answer explain list three ways write short story about water energy city learn "
         "people science history music code function python return value number table describe compare "
         "summarize translate sentence paragraph healthy food travel planet ocean mountain friend").split()


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def make_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.02 and rows:  # exact duplicate of an earlier row
            rows.append(dict(rng.choice(rows)))
            continue
        if kind < 0.04 and rows:  # near duplicate: same row in other case and spacing
            row = rng.choice(rows)
            rows.append({k: "  ".join(v.upper().split()) for k, v in row.items()})
            continue
        answer_words = (0 if kind < 0.05 else 120) if kind < 0.08 else rng.randint(5, 70)
        long_input = 0.08 <= kind < 0.10  # over max_length tokens, for the token filter
        rows.append({"instruction": f"{sentence(rng, 4, 16)} (#{i})",
                     "input": sentence(rng, 250, 400) if long_input else
                              sentence(rng, 3, 30) if rng.random() < 0.4 else "",
                     "output": sentence(rng, answer_words, answer_words) if answer_words else ""})
    return rows


def check_batched_counts(rows: list[dict[str, str]]) -> int:
    """The fast batched counter must agree with the encoder training uses, row by row, on Gemma's tokenizer."""
    from affiner.data.formats import to_examples
    from affiner.data.tokens import token_lengths
    from affiner.core.models import load_tokenizer
    from affiner.core.templates import build_template, encode_prompt, encode_response

    tokenizer = load_tokenizer("embedded:gemma-3-270m")
    template = build_template("alpaca", tokenizer)
    examples = to_examples([(row, f"row {i}") for i, row in enumerate(rows)], "alpaca")
    batched = token_lengths(examples, template, tokenizer)
    single = [len(encode_prompt(template, tokenizer, e)) + len(encode_response(template, tokenizer, e))
              for e in examples]
    return sum(a != b for a, b in zip(batched, single))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "alpaca-like.jsonl"
        with open(source, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in make_rows(args.rows))
        config = Path(tmp) / "bench.yaml"
        config.write_text(f"name: bench\ndata:\n  train: {source}\n  format: alpaca\n  template: alpaca\n"
                          f"  max_length: {args.max_length}\n  max_response_words: 80\n  test_size: 0.02\n",
                          encoding="utf-8")
        output = Path(tmp) / "prepared"
        command = [sys.executable, "-m", "affiner", "prepare", str(config), "--output", str(output)]
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        print(result.stdout[-2500:])
        if result.returncode != 0:
            sys.exit(f"affiner prepare failed:\n{result.stderr[-2000:]}")
        manifest = json.loads((output / "prepared.json").read_text(encoding="utf-8"))
        kept = {name: f["rows"] for name, f in manifest["files"].items()}
    target = 60.0
    mismatches = check_batched_counts(make_rows(300, seed=1))
    print(f"batched token counts == encode_prompt + encode_response on 300 rows: {mismatches} mismatches")
    print(f"{args.rows} rows prepared (kept {kept}) in {elapsed:.1f} s; target < {target:.0f} s: "
          f"{'met' if elapsed < target else 'NOT met'}")


if __name__ == "__main__":
    main()
