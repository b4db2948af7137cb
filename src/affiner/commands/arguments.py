"""Arguments several verbs share, declared once so that their names and help read the same everywhere."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's help, the description kept as written, and a renamed flag shown by its new name only:
    its former spellings (see `add_renamed`) still parse, so that old scripts keep working."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        former = getattr(action, "former_names", ())
        if former:
            action = copy.copy(action)
            action.option_strings = [name for name in action.option_strings if name not in former]
        return super()._format_action_invocation(action)


def add_renamed(parser: argparse.ArgumentParser, name: str, *former: str,
                **options) -> argparse.Action:
    """A flag called `name`, still accepted under its `former` names, which --help no longer shows."""
    action = parser.add_argument(name, *former, **options)
    action.former_names = former
    return action


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
                             "(FSDP2 shards it, DeepSpeed ZeRO 1/2 partitions the optimizer state; default DDP); "
                             "the same as --set train.accelerate_config=FILE")


def resumed_run(args: argparse.Namespace) -> Path | None:
    """The run folder of --resume, which continues a run with the settings it started with: a CONFIG, --set or
    --accelerate-config beside it would be silently ignored, so they are refused."""
    if not args.resume:
        return None
    given = [flag for flag, value in (("CONFIG", args.config), ("--set", args.overrides),
                                      ("--accelerate-config", args.accelerate_config)) if value]
    if given:
        from affiner.core.errors import AffinerError

        raise AffinerError(f"--resume continues {args.resume} with the settings it started with (its config.yaml); "
                           f"drop {', '.join(given)}, or start a new run with them.")
    return Path(args.resume)


def training_overrides(args: argparse.Namespace) -> list[str]:
    """--set values, with --accelerate-config as the train.accelerate_config it stands for."""
    extra = [f"train.accelerate_config={args.accelerate_config}"] if args.accelerate_config else []
    return [*args.overrides, *extra]


def training_start(args: argparse.Namespace):
    """(config, None) for a new run, or (None, run folder) for --resume. Under torchrun every process reads the
    same command line and config: a mistake in them is told by the main process alone (each printed the same
    paragraph), the others exit with its code."""
    from affiner.core.config import load_config
    from affiner.core.errors import AffinerError, SaidElsewhere
    from affiner.training.processes import Processes

    try:
        resume = resumed_run(args)
        return (None, resume) if resume else (load_config(args.config, training_overrides(args)), None)
    except AffinerError as error:
        if Processes().is_main:
            raise
        raise SaidElsewhere(error.exit_code) from None


# Number types for flags: argparse reports a value out of range as `argument --flag: ...`, exit 2, before
# anything runs.

def positive_int(text: str) -> int:
    """An integer of at least 1 (a count, a batch size, a token budget)."""
    return _checked(int, text, lambda v: v >= 1, "a whole number of at least 1")


def non_negative_int(text: str) -> int:
    """An integer of at least 0 (top-k, where 0 means off; a seed)."""
    return _checked(int, text, lambda v: v >= 0, "a whole number of at least 0")


def non_negative_float(text: str) -> float:
    """A finite number of at least 0 (a temperature, where 0 decodes greedily; seconds)."""
    return _checked(float, text, lambda v: 0 <= v < float("inf"), "a finite number of at least 0")


def probability(text: str) -> float:
    """A number in (0, 1] (top-p)."""
    return _checked(float, text, lambda v: 0 < v <= 1, "a number above 0 and at most 1")


def repetition_penalty(text: str) -> float:
    """A repetition penalty (1 is off), as core.settings.RULES accepts it."""
    return _decoding("repetition_penalty", float, text)


def temperature(text: str) -> float:
    """A temperature (0 decodes greedily), as core.settings.RULES accepts it."""
    return _decoding("temperature", float, text)


def seed(text: str) -> int:
    """A sampling seed, as core.settings.RULES accepts it."""
    return _decoding("seed", int, text)


def _decoding(key: str, kind: type, text: str):
    from affiner.core.settings import RULES

    valid, expected = RULES[key]
    return _checked(kind, text, valid, f"a number {expected}" if kind is float else f"a whole number {expected}")


def port(text: str) -> int:
    """A TCP port, 0 (any free one) to 65535."""
    return _checked(int, text, lambda v: 0 <= v <= 65535, "a port number from 0 to 65535")


def _checked(kind: type, text: str, valid, expected: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {expected}") from None
    if not valid(value):
        raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {expected}")
    return value
