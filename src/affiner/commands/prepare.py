"""Clean, filter, split and measure a dataset, and write the train/test files that `train` reads.

    affiner prepare quickstart --output data/glossary
    affiner prepare gpt2-alpaca-lora --output data/alpaca
    affiner prepare gpt2-large-glaive-qlora --output data/glaive
    # your own file, with the quickstart's model and cleaning: question/answer columns Q and A, French only
    affiner prepare quickstart --set data.train=faq.csv --set data.test=null --set data.format=qa \\
        --set data.columns.question=Q --set data.columns.answer=A --set data.languages=[fr] --output data/faq

The `data:` section of the config says what to read and how to clean it; the tokenizer and the
template are the model's own, so "at most max_length tokens" means what it will mean in training.
Each step (read, characters, empty, duplicates, answer words, patterns, language, tokens, split, train/test
overlap) is counted, and every dropped row is kept with its reason in `dropped.jsonl`. The output
folder holds train.jsonl, test.jsonl, prepared.json (counts, token-length percentiles, sha256 of
each file), lengths.png and data_card.md. Train on it with `--set data.train=data/alpaca`; a file
edited after preparing is refused, so the data card always describes the data trained on.

`affiner train` runs the same cleaning in memory when it is given raw data, so preparing first
changes nothing in the rows a model sees: it lets you look at them before paying for training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from affiner.commands.arguments import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "YAML config or recipe name whose data: section to prepare (default: quickstart)",
                         "data.max_length=1024")
    parser.add_argument("--output", type=Path, help="folder to write (default: data/<config name>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier prepared folder")


def main(args: argparse.Namespace) -> None:
    from affiner.core.config import load_config
    from affiner.data.prepared import prepare

    config = load_config(args.config, args.overrides)
    prepare(config, args.output or Path("data") / config.name, args.overwrite, label=args.config or "quickstart")
