"""Train, then answer the held-out questions with the base and the tuned model: the quickstart.

    affiner run                      # the embedded Gemma 3 270M learns a glossary, offline, on a CPU
    affiner run gpt2-alpaca-lora --set train.max_steps=50
    affiner run --resume runs/quickstart-20261122-183000

Ends with a before/after table and the run folder's path.
"""

from __future__ import annotations

import argparse
import time

from affiner.commands.arguments import add_training_arguments, training_start


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser)


def main(args: argparse.Namespace) -> None:
    from affiner.core.runfolder import RunFolder
    from affiner.evaluation.evaluate import require_judged
    from affiner.evaluation.table import format_table
    from affiner.experiments.workflow import train_and_evaluate

    started = time.time()
    config, resume = training_start(args)
    folder, evaluation = train_and_evaluate(config, resume=resume)
    if evaluation is None:  # another process than the main one: the main one reports
        return
    print()
    print(format_table(evaluation))
    for note in RunFolder(folder).info().get("advice") or []:  # said after training, repeated where it is read
        print(f"Training: {note}")
    print(f"\nReport: {folder / 'report.html'}")
    require_judged(evaluation, folder / "report.html", f"affiner evaluate {folder}")  # exit 3 if verdicts are missing
    print(f"Run folder: {folder}  ({(time.time() - started) / 60:.1f} min)")
