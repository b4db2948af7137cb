"""The terminal chat behind `affiner chat`: open an engine on run folders (or on any model with plain
adapter folders), stream answers to stdout, and the session loop with its /commands.

Ctrl-C stops the current answer, never the session; chat templates keep the conversation (oldest
turns dropped when the context window is full), text templates answer one question at a time. On a
terminal, lines are edited with GNU readline (arrows, Ctrl-A/E, Up recalls earlier lines), and the history
is kept across sessions in $AFFINER_CACHE/chat_history.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

from affiner.core.errors import AffinerError, first_line
from affiner.core.files import is_text
from affiner.core.runfolder import ADAPTER_CONFIG, RunFolder, model_names
from affiner.core.settings import Settings
from affiner.core.stopping import Trim
from affiner.interfaces.engine import BASE, Engine, Reply, how_it_ended
from affiner.interfaces.quiet import quiet_libraries

BLOCK = '"""'  # opens and closes a message of several lines (a pasted text), as in Ollama
HELP = ("commands: /set key=value ... (temperature, top_p, top_k, max_new_tokens, seed or seed=none, "
        "repetition_penalty), "
        f"/settings, /use NAME, /models, /reset, exit; {BLOCK} ... {BLOCK} for a message of several lines")
HISTORY_FILE = "chat_history"
HISTORY_LENGTH = 1000


def history_path() -> Path:
    from affiner.core.files import cache_root

    return cache_root() / HISTORY_FILE


@contextlib.contextmanager
def line_editing() -> Iterator[None]:
    """Line editing and history for input() while inside, the history read from and saved to history_path().
    Only on a terminal: piped input stays plain text, with no escape codes added to it."""
    if not sys.stdin.isatty():
        yield
        return
    try:
        import readline  # importing it is what makes input() edit lines
    except ImportError:  # Python builds without readline (Windows): input() still works, without history
        yield
        return
    path = history_path()
    with contextlib.suppress(OSError):  # no history yet, or an unreadable one: start afresh
        readline.read_history_file(path)
    readline.set_history_length(HISTORY_LENGTH)
    try:
        yield
    finally:
        _save_history(readline, path)


def _save_history(readline, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(path)
        os.chmod(path, 0o600)  # what was asked can be private: readable by its owner only
    except OSError:
        pass  # an unwritable cache loses the history, never the session


def open_engine(runs: list[Path], model: str | None = None, adapters: list[Path] | None = None,
                template: str | None = None, base: bool = False) -> tuple[Engine, str, str]:
    """The engine, the model to start with, and a label for the greeting: on the run folders (default: the
    latest under runs/), or on `model` with plain LoRA `adapters` rendered by the named `template`."""
    if model:
        if runs:
            raise AffinerError("pass either run folders or --model (with --adapter folders), not both.")
        with quiet_libraries:  # the loading bar and notes for developers: not the chat's (nor a script's stderr)
            return _open_model(model, adapters or [], template, base)
    if adapters:
        raise AffinerError("--adapter goes with --model (a base model); run folders carry their own adapter.")
    latest = RunFolder.latest()
    folders = [Path(f) for f in runs] or ([latest.path] if latest else [])
    if not folders:
        raise AffinerError("no run folder given and none found under runs/; train one with: affiner run "
                           "(or talk to any model with --model NAME).")
    with quiet_libraries:
        engine = Engine.from_runs(folders)
    name = BASE if base else engine.adapters[0]
    label = ", ".join(str(f) for f in folders) + (" (starting with the base model)" if base else "")
    return engine, name, label


def run_repetition_penalty(runs: list[Path]) -> float:
    """The repetition penalty the (first, or latest) run's evaluation decoded with, before its engine is loaded: the
    app's slider starts there, so that it answers as the report's answers were made (chat and serve ask the
    engine, `Engine.repetition_penalty`)."""
    folder = Path(runs[0]) if runs else getattr(RunFolder.latest(), "path", None)
    return RunFolder(folder).config().eval.repetition_penalty if folder else 1.0


def _open_model(model: str, folders: list[Path], template: str | None, base: bool) -> tuple[Engine, str, str]:
    from affiner.core.models import load_model, load_tokenizer
    from affiner.core.templates import template_for_adapters

    tokenizer = load_tokenizer(model)
    adapters = dict(zip(model_names(folders), folders))  # two adapter/ folders get distinct names
    for folder in folders:
        if not (folder / ADAPTER_CONFIG).is_file():
            raise AffinerError(f"--adapter {folder} is not a LoRA adapter folder (no {ADAPTER_CONFIG}).")
    default = "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    prompt = template_for_adapters(folders, template, default, tokenizer)
    engine = Engine.on_base(load_model(model), tokenizer, prompt, adapters)
    name = BASE if base or not adapters else engine.adapters[0]
    return engine, name, model  # the session's greeting names the template


def answer(engine: Engine, name: str, messages: list[dict[str, str]], settings: Settings,
           one_shot: bool = False) -> Reply:
    """Stream one answer to stdout, stripped as a whole answer is; Ctrl-C ends the answer early and keeps what was
    said. `one_shot` (--prompt): Ctrl-C is passed on once the line is ended, so that a script reading stdout gets a
    non-zero exit for a cut answer, and the notes go to stderr alone."""
    reply, stop, trim, interrupted = Reply(), threading.Event(), Trim(), False
    try:
        with _said_when_stopping(stop, lambda: trim.started):
            for piece in engine.stream(name, messages, settings, stop=stop, reply=reply):
                # Leading space (templates put one between prompt and answer) and trailing lines (held until more
                # text follows: a new turn cut after them would leave a blank line) are the screen's to drop.
                sys.stdout.write(trim.feed(piece))
                sys.stdout.flush()
    except KeyboardInterrupt:
        stop.set()
        if one_shot:
            sys.stdout.write("\n")
            sys.stdout.flush()
            raise
        sys.stdout.write(" [stopped]")
        interrupted = True
        reply.stopped = True  # by the user: nothing more to say about how it ended
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not (trim.started or interrupted):  # an empty line alone would look like a hang or a bug: say what happened (not on stdout,
        # which a script reads as the answer)
        print("(empty answer: the model ended its turn at once)", file=sys.stderr, flush=True)
    elif reply.new_turn or (not reply.stopped and reply.tokens >= settings.max_new_tokens):
        hint = " (/set max_new_tokens=N, or --max-new-tokens N)" if not reply.new_turn else ""
        print(f"({how_it_ended(reply, settings.max_new_tokens)}{hint})", file=sys.stderr, flush=True)
    return reply


def read_block(first: str) -> str:
    """A message of several lines, from `first` (which opens with BLOCK) to the line that ends with BLOCK: a
    pasted text otherwise reaches the model line by line, each line a question of its own."""
    lines = [first[len(BLOCK):]]
    while not (lines[-1].rstrip().endswith(BLOCK) and (len(lines) > 1 or len(first) >= 2 * len(BLOCK))):
        lines.append(input("... "))
    lines[-1] = lines[-1].rstrip()[:-len(BLOCK)]
    return "\n".join(lines).strip()


@contextlib.contextmanager
def _said_when_stopping(stop: threading.Event, answering: Callable[[], bool]) -> Iterator[None]:
    """Ctrl-C asks the generation to stop at once and, before the answer has begun, says so: the model stops only
    at its next token, and reading a long prompt (a big paste) can take most of a minute on a CPU."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupted(signum: int, frame) -> None:
        stop.set()
        if not answering():
            print("(stopping: the model stops once it has read the prompt)", file=sys.stderr, flush=True)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class Session:
    """One conversation in the terminal: the model talked to, the decoding settings and the turns kept."""

    def __init__(self, engine: Engine, name: str, settings: Settings):
        self.engine, self.name, self.settings = engine, name, settings
        self.messages: list[dict[str, str]] = []

    def run(self, label: str) -> None:
        mode = "multi-turn, chat template" if self.engine.template.is_chat else \
            f"one question at a time, {self.engine.template.name} template"
        print(f"Chatting with {label} ({mode}). {HELP}")
        if len(self.engine.names) > 2:
            print(f"(models: {self.models()}; /use NAME to switch)")
        with line_editing():
            self.loop()

    def loop(self) -> None:
        while True:
            # Ctrl-C can land anywhere (while typing, rendering, streaming): it never ends the session.
            try:
                text = input("> ").strip()
                if text.startswith(BLOCK):
                    text = read_block(text)
                if not is_text(text):
                    print("(error: that line is not valid UTF-8 text; type it again, or set your terminal to UTF-8)")
                    continue
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
            kept = "the conversation so far is kept" if self.engine.template.is_chat else "one question at a time"
            print(f"(now talking to {self.name}; {kept})")
        elif verb == "/settings":
            print(self.described_settings())
        elif verb == "/set" and rest.strip():
            settings = self.settings
            try:
                for pair in rest.split():
                    key, sep, value = pair.partition("=")
                    if not sep:
                        raise AffinerError(f"'{pair}' must look like key=value.")
                    settings = settings.updated(key, value)
            except AffinerError as exc:  # none of the line's values is taken: the settings stay as they were
                print(f"(error: {exc}; nothing changed)")
                return
            self.settings = settings
            print(f"({self.described_settings()})")
        else:
            print(f"({HELP})")

    def described_settings(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.settings).items())

    def models(self) -> str:
        return ", ".join(f"[{n}]" if n == self.name else n for n in self.engine.names)

    def ask(self, text: str) -> None:
        messages = [*self.messages, {"role": "user", "content": text}]
        try:
            reply = answer(self.engine, self.name, messages, self.settings)
        except AffinerError as exc:
            print(f"(error: {exc})")
            return
        except (RuntimeError, ValueError) as exc:  # the model failing on one question: the session goes on
            print(f"(error: the model could not answer: {first_line(exc)}; try other settings (/settings, /set))")
            return
        if not self.engine.template.is_chat:
            return  # text templates are single-turn: nothing to remember
        if reply.dropped_turns:
            print(f"(the {reply.dropped_turns} oldest messages no longer fit the context window and were left out)")
            messages = messages[reply.dropped_turns:]
        self.messages = [*messages, {"role": "assistant", "content": reply.text.strip()}]
