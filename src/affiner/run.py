"""Train, then answer the held-out questions with the base and the tuned model: the quickstart.

    affiner run                      # the embedded Gemma 3 270M learns a glossary, offline, on a CPU
    affiner run recipes/gpt2-alpaca-lora.yaml --set train.max_steps=50

Ends with a before/after table and the run folder's path.
"""

from __future__ import annotations

import argparse
import time

from affiner import evaluate, train
from affiner.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    train.add_arguments(parser)


def main(args: argparse.Namespace) -> None:
    started = time.time()
    if args.resume:
        folder = train.train(resume=args.resume)
    else:
        folder = train.train(load_config(args.config, args.overrides))
    evaluation = evaluate.evaluate(folder)
    print()
    print(evaluate.format_table(evaluation))
    print(f"\nReport: {folder / 'report.html'}")
    print(f"Run folder: {folder}  ({(time.time() - started) / 60:.1f} min)")
