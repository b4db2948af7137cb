"""affiner fine-tunes a language model on your own data (LoRA, QLoRA or every weight), then shows on
held-out questions, answer by answer, whether it now answers better than before.

The workflow, each step a verb:
    affiner prepare gpt2-alpaca-lora --output data/alpaca   # optional: clean, split, look at the data
    affiner train quickstart                         # fine-tune: writes a run folder under runs/
    affiner evaluate runs/quickstart-20261122-183000 # base and tuned answer the same held-out questions
    affiner chat runs/quickstart-20261122-183000     # talk to it in the terminal,
    affiner app                                      # or side by side with the base in the browser,
    affiner serve                                    # or through an OpenAI-compatible API
    affiner export runs/quickstart-20261122-183000 --output exports/glossary --gguf   # share it

    affiner run                    # train, then evaluate: the quickstart, offline, minutes on a CPU
    affiner config quickstart      # every setting of a recipe: its value, default and what it trades off
    affiner VERB --help            # what a verb does, its flags and examples

A CONFIG is a shipped recipe's name or a YAML file of your own (`affiner config quickstart --yaml`
writes one to start from); `--set section.key=value` changes one setting for one command.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import textwrap
import time
import traceback
import warnings
from importlib import import_module
from pathlib import Path

from affiner.core.errors import AffinerError, SaidElsewhere

# The verb table: name -> (module under affiner.commands, one-line summary). A verb's module is
# imported only when that verb is asked for, so `affiner --help` never pays for torch.
VERBS: dict[str, tuple[str, str]] = {
    "run": ("run", "train, then compare base and tuned answers on held-out questions"),
    "config": ("config", "show every setting of a recipe or YAML file: value, default, type, trade-off"),
    "synth": ("synth", "write question/answer conversations about a glossary (offline or with an LLM)"),
    "generate": ("synth", "the former name of synth, kept as an alias"),
    "prepare": ("prepare", "clean, filter, split and measure a dataset; write the files train reads"),
    "train": ("train", "fine-tune with LoRA, QLoRA or fully"),
    "evaluate": ("evaluate", "answer held-out questions with the base and the tuned model, and score them"),
    "sweep": ("sweep", "train and evaluate one run per point of a grid of config values, then compare them"),
    "export": ("export", "write the adapter, the merged model, GGUF + Ollama Modelfile and a model card; "
                         "push to the Hub"),
    "runs": ("runs", "list runs with their scores, or compare several side by side"),
    "chat": ("chat", "talk to a tuned model (or its base) in the terminal"),
    "app": ("app", "compare base and tuned answers side by side in the browser"),
    "serve": ("serve", "answer OpenAI-compatible API requests with the base and tuned models"),
}


def _asked_verb(argv: list[str]) -> str | None:
    """The verb on the command line (the first word that is not an option), if it is one of ours."""
    words = [a for a in argv if not a.startswith("-")]
    return words[0] if words and words[0] in VERBS else None


class Parser(argparse.ArgumentParser):
    """argparse, with its errors in affiner's own shape: one line naming the flag, no usage block above it
    (the block pushes the one line that matters off a small screen), exit 2."""

    asked: str | None = None  # the verb on the command line: argparse reports a verb's unknown flags at the top

    def error(self, message: str):
        prog = f"{self.prog} {self.asked}" if self.asked and message.startswith("unrecognized arguments") else self.prog
        self.exit(2, f"{prog}: error: {message} (see {prog} --help).\n")


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `verb`'s command module is imported (every verb's when None, for tests and docs)."""
    from affiner import __version__
    from affiner.commands.arguments import HelpFormatter
    from affiner.core.config import recipe_names

    recipes = textwrap.fill(f"Recipes: {', '.join(recipe_names())}.", width=100, subsequent_indent="    ",
                            break_on_hyphens=False)
    parser = Parser(prog="affiner", description=f"{__doc__}\n{recipes}",
                    formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"affiner {__version__}")
    parser.asked = verb
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (module_name, summary) in VERBS.items():
        if verb is not None and name != verb:
            verbs.add_parser(name, help=summary, add_help=False)
            continue
        module = import_module(f"affiner.commands.{module_name}")
        sub = verbs.add_parser(name, help=summary, description=module.__doc__, formatter_class=HelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(main=module.main)
    return parser


def quiet_third_party_logs() -> None:
    """Libraries' log lines that speak to their maintainers or that describe a normal state as a fault."""
    # bitsandbytes, imported with peft by every verb, warns on CPUs with AVX512-BF16 that its optional `kernels`
    # (fetched from the Hub) are missing and to pip install them: its own 4-bit code runs without them, and the
    # warning came before every chat answer and evaluation, QLoRA or not.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # DeepSpeed (installed for ZeRO training), imported by accelerate whenever transformers saves a model, warns on
    # a machine without a GPU that it "was unable to detect" one: true, expected, and read as a fault after
    # `affiner export --merged`. Its logger keeps a filter set before it exists; its other messages still show.
    logging.getLogger("DeepSpeed").addFilter(_not_the_cpu_fallback_notice)  # added once, however often called


def _not_the_cpu_fallback_notice(record: logging.LogRecord) -> bool:
    return "Setting accelerator to CPU" not in record.getMessage()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Deprecation notices inside transformers/peft are for their maintainers, not for our users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    quiet_third_party_logs()
    verb = _asked_verb(argv)
    args = build_parser(verb or "").parse_args(argv)
    try:
        args.main(args)
    except AffinerError as exc:
        if not isinstance(exc, SaidElsewhere):
            print(f"affiner {args.verb}: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader stopped reading (`affiner config | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that Python's exit flush is silent
        sys.exit(1)
    except OSError as exc:  # a file or folder the user named or holds: missing, read-only, a full disk
        print(f"affiner {args.verb}: error: {_os_error_text(exc)}", file=sys.stderr)
        sys.exit(2)
    except Exception:  # noqa: BLE001  (anything else is affiner's fault: say so, keep the details)
        log = _save_traceback(args.verb)
        print(f"affiner {args.verb}: internal error: this is a bug in affiner, not in your input. The details "
              f"are in {log}; please report it with that file.",
              file=sys.stderr)
        sys.exit(1)


def _os_error_text(error: OSError) -> str:
    """One paragraph for a failed file operation, naming the path and what to do about the usual causes."""
    path = error.filename or "a file"
    reason = error.strerror or str(error)
    advice = {errno.ENOSPC: "free some space, then run the command again",
              errno.EACCES: "check its permissions or write elsewhere", errno.EROFS: "write elsewhere",
              errno.ENOTDIR: "a part of that path is a file, not a folder; choose another path",
              errno.ENOENT: "check the path", errno.EISDIR: "name a file, not a folder"}.get(error.errno, "")
    return f"{path}: {reason}" + (f"; {advice}." if advice else ".")


def _save_traceback(verb: str) -> Path:
    """The traceback in a log file under the user's cache (printed only by path: a wall of text hides the
    one line that matters to a user)."""
    folder = Path(os.environ.get("AFFINER_LOG_DIR", Path.home() / ".cache" / "affiner" / "logs"))
    text = f"affiner {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{verb}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        path.write_text(text, encoding="utf-8")
        return path
    except OSError:  # nowhere to keep it: then the screen is the only place left
        print(text, file=sys.stderr)
        return Path("the traceback above")
