"""Talk to a tuned model in the terminal, through the run's own prompt template, with streaming.

    affiner chat                                         # the latest run under runs/
    affiner chat runs/quickstart-20261122-183000
    affiner chat runs/quickstart-20261122-183000 --base  # the same prompts, without the adapter
    affiner chat --model gpt2 --template alpaca           # any model, no run
    affiner chat runs/quickstart-20261122-183000 --prompt "What does QUILT stand for?" --greedy
    affiner chat runs/lr-1e-4 runs/lr-3e-4                # two adapters on one base: /use lr-3e-4
    affiner chat --model gpt2 --adapter my-lora --template alpaca   # adapters trained anywhere
    affiner chat --model embedded:gemma-3-270m --prompt "What is LoRA?"   # offline, no run needed

In the session: `/set temperature=0.7 top_k=20` changes sampling, `/settings` shows it, `/use NAME`
switches to another adapter of the same base (or `base`), `/models` lists them, `/reset` forgets the
conversation, `exit` or `quit` (or Ctrl-D) leaves. Ctrl-C stops the current answer, not the program.
The arrow keys edit the line and Up recalls earlier lines, kept across sessions in
~/.cache/affiner/chat_history ($AFFINER_CACHE moves it). Models with a chat template keep the
conversation (oldest turns are dropped, with a notice, when it no longer fits the context window);
text templates answer one question at a time.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from affiner.commands.arguments import (non_negative_int, positive_int, probability, repetition_penalty, seed,
                                        temperature)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Both light (no torch): the help shows the one set of decoding defaults and template names.
    from affiner.core.settings import Settings
    from affiner.core.templates import TEXT_TEMPLATES

    parser.add_argument("runs", nargs="*", type=Path, metavar="RUN",
                        help="run folders sharing one base (default: the latest under runs/); /use switches")
    parser.add_argument("--base", action="store_true", help="start with the base model, without adapter")
    parser.add_argument("--model", help="instead of a run: any model (Hub id, folder, .gguf, embedded:gemma-3-270m)")
    parser.add_argument("--adapter", action="append", default=[], type=Path, metavar="DIR",
                        help="with --model: a LoRA adapter folder (plain peft) to load on it, named by its folder "
                             "(repeatable)")
    parser.add_argument("--template", choices=[*TEXT_TEMPLATES, "chat"],
                        help="with --model: the prompt template (default: the template.json saved beside the "
                             "adapter, as affiner's exports have; else chat if the model has one, else alpaca)")
    parser.add_argument("--prompt", help="answer this one prompt and exit")
    parser.add_argument("--greedy", action="store_true", help="decode greedily (temperature 0)")
    defaults = Settings()
    parser.add_argument("--temperature", type=temperature, default=defaults.temperature, metavar="T",
                        help=f"sampling temperature: higher varies more, 0 decodes greedily "
                             f"(default {defaults.temperature})")
    parser.add_argument("--top-p", type=probability, default=defaults.top_p, metavar="P",
                        help=f"sample among the likeliest tokens making up this probability "
                             f"(default {defaults.top_p})")
    parser.add_argument("--top-k", type=non_negative_int, default=defaults.top_k, metavar="K",
                        help=f"sample among the K likeliest tokens, 0 for all (default {defaults.top_k})")
    parser.add_argument("--max-new-tokens", type=positive_int, default=defaults.max_new_tokens, metavar="N",
                        help=f"answer length limit, in tokens (default {defaults.max_new_tokens})")
    parser.add_argument("--seed", type=seed, metavar="N",
                        help="seed of the sampling: the same seed, the same answer (default: random)")
    parser.add_argument("--repetition-penalty", type=repetition_penalty, metavar="R",
                        help="above 1, tokens the answer already holds are made less likely: a looping model "
                             "stops looping (default: the run's eval.repetition_penalty, as its evaluation decoded; "
                             "1: off)")


def main(args: argparse.Namespace) -> None:
    from affiner.core.errors import AffinerError
    from affiner.core.settings import Settings
    from affiner.interfaces.chat import Session, answer, open_engine

    if args.prompt is not None and not args.prompt.strip():
        raise AffinerError("--prompt is empty: give the question to answer, e.g. --prompt 'What does QUILT stand for?'"
                           ", or leave --prompt out to chat.")
    engine, name, label = open_engine(args.runs, model=args.model, adapters=args.adapter, template=args.template,
                                      base=args.base)
    settings = Settings(temperature=0.0 if args.greedy else args.temperature, top_p=args.top_p, top_k=args.top_k,
                        max_new_tokens=args.max_new_tokens, seed=args.seed,
                        repetition_penalty=args.repetition_penalty or engine.repetition_penalty(name))
    if args.prompt is not None:
        answer(engine, name, [{"role": "user", "content": args.prompt}], settings, one_shot=True)
        return
    Session(engine, name, settings).run(label)
