"""`affiner <verb>`: one module per verb, dispatched from one table."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from importlib import import_module

from affiner.errors import AffinerError

VERBS = {
    "run": "train, then compare base and tuned answers on held-out questions",
    "prepare": "clean, filter, split and measure a dataset; write the files train reads",
    "generate": "write question/answer conversations about a glossary (offline or with an LLM)",
    "train": "fine-tune with LoRA, QLoRA or fully",
    "evaluate": "answer held-out questions with the base and the tuned model, and score them",
    "sweep": "train and evaluate one run per point of a grid of config values, then compare them",
    "export": "write the adapter, the merged model, GGUF + Ollama Modelfile and a model card; push to the Hub",
    "runs": "list runs with their scores, or compare several side by side",
    "chat": "talk to a tuned model (or its base) in the terminal",
    "app": "compare base and tuned answers side by side in the browser",
    "serve": "answer OpenAI-compatible API requests with the base and tuned models",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="affiner", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, summary in VERBS.items():
        module = import_module(f"affiner.{verb}")
        sub = verbs.add_parser(verb, help=summary, description=module.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(main=module.main)
    return parser


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Deprecation notices inside transformers/peft are for their maintainers, not for our users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = build_parser().parse_args(argv)
    try:
        args.main(args)
    except AffinerError as exc:
        print(f"affiner {args.verb}: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
