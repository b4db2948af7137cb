"""Fine-tune a model with LoRA, QLoRA or fully, with an explicit training loop.

    affiner train quickstart --set train.epochs=1
    affiner train quickstart --set lora.r=8 --set train.learning_rate=1e-4
    affiner train --resume runs/quickstart-20261122-183000
    affiner config quickstart --yaml > my-run.yaml     # every setting in a file of your own, then:
    affiner train my-run.yaml

The run folder gets the adapter (plain peft format), tokenizer, resolved config, prompt template,
data fingerprints and what the cleaning dropped (data.json), `metrics.jsonl`, and checkpoints every
`train.save_steps` steps (by default every 10 minutes of training).
"""

from __future__ import annotations

import argparse

from affiner.commands.arguments import add_training_arguments, training_start


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser)


def main(args: argparse.Namespace) -> None:
    from affiner.experiments.workflow import train
    from affiner.training.processes import Processes

    config, resume = training_start(args)
    folder = train(config, resume=resume)
    if Processes().is_main:
        print(f"Run folder: {folder}")
