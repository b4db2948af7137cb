"""Talk to a tuned model in the terminal, through the run's own prompt template, with streaming.

    affiner chat                                         # the latest run under runs/
    affiner chat runs/quickstart-20261122-183000
    affiner chat runs/quickstart-20261122-183000 --base  # the same prompts, without the adapter
    affiner chat --model gpt2 --template alpaca           # any model, no run
    affiner chat runs/quickstart-20261122-183000 --prompt "What does QUILT stand for?" --greedy
    affiner chat runs/lr-1e-4 runs/lr-3e-4                # two adapters on one base: /use lr-3e-4
    affiner chat --model gpt2 --adapter my-lora --template alpaca   # adapters trained anywhere

In the session: `/set temperature=0.7 top_k=20` changes sampling, `/settings` shows it, `/use NAME`
switches to another adapter of the same base (or `base`), `/models` lists them, `/reset` forgets the
conversation, `exit` or `quit` (or Ctrl-D) leaves. Ctrl-C stops the current answer,
not the program. Models with a chat template keep the conversation (oldest turns are dropped, with
a notice, when it no longer fits the context window); text templates answer one question at a time.
"""

from __future__ import annotations

import argparse
import sys
import threading
from dataclasses import asdict
from pathlib import Path

from affiner.core.settings import Settings
from affiner.interfaces.engine import BASE, Engine, Reply
from affiner.core.errors import AffinerError
from affiner.core.runfolder import RunFolder, model_names

HELP = ("commands: /set key=value ... (temperature, top_p, top_k, max_new_tokens, seed), /settings, "
        "/use NAME, /models, /reset, exit")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="*", metavar="RUN",
                        help="run folders sharing one base (default: the latest under runs/); /use switches")
    parser.add_argument("--base", action="store_true", help="start with the base model, without adapter")
    parser.add_argument("--model", help="instead of a run: any model (Hub id, folder, .gguf, embedded:gemma-3-270m)")
    parser.add_argument("--adapter", action="append", default=[], type=Path, metavar="DIR",
                        help="with --model: a LoRA adapter folder (plain peft) to load on it, named by its folder "
                             "(repeatable)")
    parser.add_argument("--template", choices=["alpaca", "instruction", "qa", "chat"],
                        help="with --model: the prompt template (default: chat if the model has one, else alpaca)")
    parser.add_argument("--prompt", help="answer this one prompt and exit")
    parser.add_argument("--greedy", action="store_true", help="decode greedily (temperature 0)")
    defaults = Settings()
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--top-k", type=int, default=defaults.top_k)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--seed", type=int)


def main(args: argparse.Namespace) -> None:
    engine, name, label = open_engine(args)
    settings = Settings(temperature=0.0 if args.greedy else args.temperature, top_p=args.top_p, top_k=args.top_k,
                        max_new_tokens=args.max_new_tokens, seed=args.seed)
    if args.prompt is not None:
        answer(engine, name, [{"role": "user", "content": args.prompt}], settings)
        return
    Session(engine, name, settings).run(label)


def open_engine(args: argparse.Namespace) -> tuple[Engine, str, str]:
    if args.model:
        from affiner.core.models import load_model, load_tokenizer
        from affiner.core.templates import build_template

        if args.runs:
            raise AffinerError("pass either run folders or --model (with --adapter folders), not both.")
        tokenizer = load_tokenizer(args.model)
        template_name = args.template or ("chat" if getattr(tokenizer, "chat_template", None) else "alpaca")
        adapters = dict(zip(model_names(args.adapter), args.adapter))  # two adapter/ folders get distinct names
        for folder in args.adapter:
            if not (folder / "adapter_config.json").is_file():
                raise AffinerError(f"--adapter {folder} is not a LoRA adapter folder (no adapter_config.json).")
        engine = Engine.on_base(load_model(args.model), tokenizer, build_template(template_name, tokenizer), adapters)
        name = BASE if args.base or not adapters else engine.adapters[0]
        return engine, name, f"{args.model} ({template_name} template)"
    if args.adapter:
        raise AffinerError("--adapter goes with --model (a base model); run folders carry their own adapter.")
    latest = RunFolder.latest()
    folders = [Path(f) for f in args.runs] or ([latest.path] if latest else [])
    if not folders:
        raise AffinerError("no run folder given and none found under runs/; train one with: affiner run "
                           "(or talk to any model with --model NAME).")
    engine = Engine.from_runs(folders)
    name = BASE if args.base else engine.adapters[0]
    label = ", ".join(str(f) for f in folders) + (" (starting with the base model)" if args.base else "")
    return engine, name, label


def answer(engine: Engine, name: str, messages: list[dict[str, str]], settings: Settings) -> Reply:
    """Stream one answer to stdout; Ctrl-C ends the answer early and keeps what was said."""
    reply, stop = Reply(), threading.Event()
    try:
        started = False
        for piece in engine.stream(name, messages, settings, stop=stop, reply=reply):
            if not started:  # templates put a space between the prompt and the answer; the screen needs none
                piece = piece.lstrip()
                started = bool(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stop.set()
        sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    sys.stdout.flush()
    return reply


class Session:
    def __init__(self, engine: Engine, name: str, settings: Settings):
        self.engine, self.name, self.settings = engine, name, settings
        self.messages: list[dict[str, str]] = []

    def run(self, label: str) -> None:
        mode = "multi-turn, chat template" if self.engine.template.is_chat else \
            f"one question at a time, {self.engine.template.name} template"
        print(f"Chatting with {label} ({mode}). {HELP}")
        if len(self.engine.names) > 2:
            print(f"(models: {self.models()}; /use NAME to switch)")
        while True:
            # Ctrl-C can land anywhere (while typing, rendering, streaming): it never ends the session.
            try:
                text = input("> ").strip()
                if text in {"exit", "quit"}:
                    return
                if text.startswith("/"):
                    self.command(text)
                elif text:
                    self.ask(text)
            except EOFError:
                print()
                return
            except KeyboardInterrupt:
                print("\n(Ctrl-C stops an answer; type exit to leave)")

    def command(self, text: str) -> None:
        verb, _, rest = text.partition(" ")
        if verb == "/reset":
            self.messages = []
            print("(conversation cleared)")
        elif verb == "/models":
            print(f"({self.models()})")
        elif verb == "/use" and rest.strip():
            if rest.strip() not in self.engine.names:
                print(f"(error: no model named '{rest.strip()}'; models: {self.models()})")
                return
            self.name = rest.strip()
            print(f"(now talking to {self.name}; the conversation so far is kept)")
        elif verb == "/settings":
            print(", ".join(f"{k}={v}" for k, v in asdict(self.settings).items()))
        elif verb == "/set" and rest.strip():
            try:
                for pair in rest.split():
                    key, sep, value = pair.partition("=")
                    if not sep:
                        raise AffinerError(f"'{pair}' must look like key=value.")
                    self.settings = self.settings.updated(key, value)
            except AffinerError as exc:
                print(f"(error: {exc})")
                return
            print("(" + ", ".join(f"{k}={v}" for k, v in asdict(self.settings).items()) + ")")
        else:
            print(f"({HELP})")

    def models(self) -> str:
        return ", ".join(f"[{n}]" if n == self.name else n for n in self.engine.names)

    def ask(self, text: str) -> None:
        messages = [*self.messages, {"role": "user", "content": text}]
        try:
            reply = answer(self.engine, self.name, messages, self.settings)
        except AffinerError as exc:
            print(f"(error: {exc})")
            return
        if not self.engine.template.is_chat:
            return  # text templates are single-turn: nothing to remember
        if reply.dropped_turns:
            print(f"(the {reply.dropped_turns} oldest messages no longer fit the context window and were left out)")
            messages = messages[reply.dropped_turns:]
        self.messages = [*messages, {"role": "assistant", "content": reply.text.strip()}]
