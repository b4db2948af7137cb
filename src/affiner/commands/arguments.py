"""Arguments several verbs share, declared once so that their names and help read the same everywhere."""

from __future__ import annotations

import argparse


def add_config_arguments(parser: argparse.ArgumentParser, config_help: str, set_example: str) -> None:
    """CONFIG (a YAML file or a shipped recipe's name) and repeatable --set KEY=VALUE overrides."""
    parser.add_argument("config", nargs="?", help=config_help)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value, e.g. --set {set_example} (repeatable)")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """What `train` and `run` take: a config with overrides, or a run folder to resume."""
    add_config_arguments(parser, "YAML file or recipe name (default: quickstart)", "train.learning_rate=1e-4")
    parser.add_argument("--resume", metavar="RUN", help="continue a run folder from its last checkpoint")
    parser.add_argument("--accelerate-config", metavar="FILE",
                        help="an Accelerate config file choosing how several processes share the model "
                             "(FSDP2 shards it; default DDP); the same as --set train.accelerate_config=FILE")


def training_overrides(args: argparse.Namespace) -> list[str]:
    """--set values, with --accelerate-config as the train.accelerate_config it stands for."""
    extra = [f"train.accelerate_config={args.accelerate_config}"] if args.accelerate_config else []
    return [*args.overrides, *extra]
