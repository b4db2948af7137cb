"""One base model loaded once, any number of LoRA adapters on it, and streaming generation.

`chat`, `app` and `serve` talk to models through an `Engine`: prompts are rendered by the run's
saved template (the one used in training), adapters are switched by name without reloading the
base, and one generation runs at a time on the model (a lock), so concurrent callers queue instead
of interleaving on one model state.

    engine = Engine.from_runs([Path("runs/quickstart-20261122-183000")])
    for piece in engine.stream("tuned", [{"role": "user", "content": "What does QUILT stand for?"}]):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError

from affiner.core.errors import AffinerError, damaged
from affiner.core.decoding import decode_rows, last_position, left_pad, penalties, tokens_for
from affiner.core.settings import GREEDY, Settings
from affiner.core.stopping import RowEnds, TurnCutter, cut_at_turn, trim_unfinished_marker, turn_markers
from affiner.core.devices import device
from affiner.core.models import load_for, max_positions, tokenizer_for
from affiner.core.runfolder import RunFolder, model_names, require_adapter_weights, require_one_base
from affiner.core.templates import Example, Template, encode_prompt, encode_text

BASE = "base"
# Positions a prompt and its answer may take at most: a model's own window can be far larger (Gemma 3: 32,768), and
# attention over a prompt that long takes minutes on a CPU. Messages say which of the two limits a prompt ran into.
SERVED_WINDOW = 8192


@dataclass
class Reply:
    """What a generation produced, with its timings (time to first token, tokens per second)."""

    text: str = ""
    tokens: int = 0
    stopped: bool = False  # ended with a stop token, not at the limit or by a stop request
    new_turn: bool = False  # ran on into a new turn of the template, cut there (what a reader would stop at)
    prompt_tokens: int = 0
    first_token_seconds: float | None = None
    seconds: float = 0.0
    dropped_turns: int = 0  # oldest turns left out to fit the context window
    ids: list[int] = field(default_factory=list)  # the tokens generated, up to the stop token (left out)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def how_it_ended(reply: Reply, limit: int) -> str:
    """How an answer ended, as the evaluation report counts it: a base model cut at a new turn or at the limit
    otherwise looks, in a chat or side by side, as if it had answered and stopped."""
    if reply.new_turn:
        return "cut where the model began a new turn: it did not stop by itself"
    if reply.stopped:
        return "stopped by itself"
    if reply.tokens >= limit:
        return f"cut at the answer limit ({limit} tokens): it did not stop by itself"
    return "ended without its stop token"  # asked to stop (a Ctrl-C, a closed page), or the context window full


@dataclass(frozen=True)
class Ask:
    """One question of a batch (`Engine.complete_batch`): a conversation or a raw prompt, its token limit,
    the texts that end its answer (cut from it), and an event that drops it from the batch (a client gone)."""

    messages: list[dict[str, str]] | None = None
    raw_prompt: str | None = None
    max_new_tokens: int = 100
    stop: tuple[str, ...] = ()
    cancel: threading.Event = field(default_factory=threading.Event)


def _join_through_interrupts(worker: threading.Thread) -> None:
    """Wait for the generation thread even if Ctrl-C arrives meanwhile (it already asked it to stop)."""
    if worker.ident is None:  # interrupted before it started: nothing runs
        return
    while True:
        try:
            worker.join()
            return
        except KeyboardInterrupt:
            continue


def _answer_ids(output: dict, prompt_length: int, stop_ids: list[int]) -> tuple[list[int], int | None]:
    """The generation thread's new ids (its `output`; none after an error) and where its first stop token is."""
    new = output["ids"][0, prompt_length:].tolist() if "ids" in output else []
    return new, next((i for i, token in enumerate(new) if token in stop_ids), None)


class _StopOnEvent:
    """Stopping criterion: ends generation at the next token once the event is set (Ctrl-C, a client gone)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class Engine:
    template: Template
    tokenizer: object
    model: object  # a PeftModel when adapters are loaded, else the plain base model
    adapters: list[str] = field(default_factory=list)
    context_window: int = 2048
    model_window: int | None = None  # the model's own, when larger than the context_window served
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Each model's repetition penalty when a request sets none: its run's eval.repetition_penalty, so that it answers
    # as the report's answers were made (the base as the first run's evaluation decoded it).
    penalties: dict[str, float] = field(default_factory=dict)

    # ------------------------------------------------------------------------------------ loading

    @classmethod
    def from_runs(cls, folders: list[Path], names: list[str] | None = None) -> "Engine":
        """The base of the runs, loaded once, with each run's adapter under its name ("tuned" for a single run)."""
        runs = [RunFolder.open(f).require_finished("talk to it") for f in folders]
        configs = require_one_base(runs, "adapters must share one base to be switched on it.")
        full = next((run for run, config in zip(runs, configs) if config.method == "full"), None)
        if full is not None:
            raise AffinerError(f"{full} is a full fine-tune: there is no adapter to put on a base; "
                               "pass its folder as the base model instead.")
        names = names or model_names([r.path for r in runs])
        for run in runs:  # before a minute of loading the base
            require_adapter_weights(run.path)
        engine = cls.on_base(load_for(configs[0]), tokenizer_for(configs[0], runs[0].path), runs[0].template(),
                             dict(zip(names, [r.path for r in runs])))
        engine.penalties = {BASE: configs[0].eval.repetition_penalty,
                            **{name: config.eval.repetition_penalty for name, config in zip(names, configs)}}
        return engine

    @classmethod
    def on_base(cls, base, tokenizer, template: Template, adapters: dict[str, Path]) -> "Engine":
        from peft import PeftModel

        model = base
        for i, (name, folder) in enumerate(adapters.items()):
            if name == BASE:
                raise AffinerError("'base' names the model without adapter; give the adapter another name.")
            require_adapter_weights(Path(folder))
            try:
                if i == 0:
                    model = PeftModel.from_pretrained(base, str(folder), adapter_name=name)
                else:
                    model.load_adapter(str(folder), adapter_name=name)
            except (OSError, ValueError, SafetensorError) as exc:
                raise damaged("LoRA adapter", Path(folder), exc) from None
        model.eval()
        window = max_positions(base) or 2048
        return cls(template=template, tokenizer=tokenizer, model=model, adapters=list(adapters),
                   context_window=min(window, SERVED_WINDOW), model_window=window if window > SERVED_WINDOW else None)

    @property
    def names(self) -> list[str]:
        return [BASE, *self.adapters]

    def repetition_penalty(self, name: str) -> float:
        return self.penalties.get(name, 1.0)

    # ------------------------------------------------------------------------------------ prompts

    def example(self, messages: list[dict[str, str]], max_new_tokens: int | None) -> tuple[Example, int]:
        """The conversation as an example whose prompt fits the context window with `max_new_tokens` (None: with
        room for one); oldest turns dropped first.

        Returns the example and how many earlier messages were dropped. Text templates are
        single-turn: they keep only the last user message (and no history).
        """
        if not messages or messages[-1].get("role") != "user":
            raise AffinerError("a conversation must end with a user message.")
        system = [m for m in messages[:1] if m.get("role") == "system"]
        history = [(m["role"], m["content"]) for m in messages[len(system):-1]]
        if not self.template.is_chat:
            history = []
        template = replace(self.template, system_prompt=system[0]["content"]) if system else self.template
        dropped = 0
        while True:
            example = Example(instruction=messages[-1]["content"], input=messages[-1].get("input", ""),
                              history=tuple(history))
            length = len(encode_prompt(template, self.tokenizer, example))
            if length + (max_new_tokens or 1) <= self.context_window or not history:
                break
            # The oldest message, and any answers after it: the history kept opens with a user turn, even when a
            # client sent two messages of one role in a row (pairs would then cut between a question and its answer).
            kept = next((i for i, (role, _) in enumerate(history) if i > 0 and role == "user"), len(history))
            history, dropped = history[kept:], dropped + kept
        self.check_fits(length, max_new_tokens)
        return example, dropped if self.template.is_chat else len(messages) - 1 - len(system)

    def check_fits(self, length: int, max_new_tokens: int | None) -> None:
        """Refuse a prompt of `length` tokens that leaves too little of the context window for `max_new_tokens` (None:
        for an answer at all), saying how much room there is and whose limit it is."""
        room = self.context_window - length
        window = (f"the {self.context_window}-token context window this server keeps (the model's own is "
                  f"{self.model_window}; longer prompts take minutes on a CPU)" if self.model_window else
                  f"the model's {self.context_window}-token context window")
        if room < 1:
            raise AffinerError(f"the prompt has {length} tokens: it leaves no room for an answer in {window}; "
                               f"shorten it to at most {self.context_window - 1} tokens.")
        if max_new_tokens is not None and room < max_new_tokens:
            raise AffinerError(f"the prompt has {length} tokens: with {max_new_tokens} new tokens it does not fit "
                               f"{window} (at most {room} new tokens).")

    def prompt_ids(self, messages: list[dict[str, str]] | None, max_new_tokens: int | None = 100,
                   raw_prompt: str | None = None, reply: Reply | None = None) -> list[int]:
        """The token ids the model is conditioned on, as in training: the conversation rendered by the run's
        template (oldest turns dropped to fit), or a `raw_prompt` as it is; refused (AffinerError) when it leaves
        less than `max_new_tokens` (None: one) of the context window. `reply` learns the prompt's length and how
        many turns were dropped."""
        if raw_prompt is not None:
            prompt, dropped = self.raw_prompt_ids(raw_prompt), 0
            self.check_fits(len(prompt), max_new_tokens)
        else:
            example, dropped = self.example(messages or [], max_new_tokens)
            prompt = encode_prompt(self._template(messages), self.tokenizer, example)
        if reply is not None:
            reply.prompt_tokens, reply.dropped_turns = len(prompt), dropped
        return prompt

    def prompt_text(self, messages: list[dict[str, str]], max_new_tokens: int = 100) -> str:
        """The exact text the model sees for this conversation (for `show the prompt`)."""
        return self.tokenizer.decode(self.prompt_ids(messages, max_new_tokens))

    def raw_prompt_ids(self, text: str) -> list[int]:
        """A raw prompt's token ids (/v1/completions): one BOS, also when the text begins with it, as a prompt
        copied from the app's "prompt the model saw" or the model card does (encode_prompt adds none then either)."""
        return encode_text(self.tokenizer, text)

    def _template(self, messages: list[dict[str, str]]) -> Template:
        if messages and messages[0].get("role") == "system":
            return replace(self.template, system_prompt=messages[0]["content"])
        return self.template

    # ------------------------------------------------------------------------------------ generation

    def stream(self, name: str, messages: list[dict[str, str]] | None, settings: Settings = Settings(),
               stop: threading.Event | None = None, reply: Reply | None = None,
               raw_prompt: str | None = None, stop_texts: tuple[str, ...] = ()) -> Iterator[str]:
        """Yield the answer's text as it is generated; `reply` (when given) is filled with counts and timings.

        `messages` are rendered by the run's template (the last user message may carry an "input"
        for templates with an input field); `raw_prompt` is continued as it is, without template.
        The answer ends at a new turn of the template or at one of the `stop_texts` (found anywhere, cut from it,
        as `complete_batch` cuts them). Holds the engine's lock until the answer ends, so concurrent callers are
        served one after another.
        """
        reply = reply if reply is not None else Reply()
        self._require(name)
        prompt = self.prompt_ids(messages, settings.max_new_tokens, raw_prompt, reply)
        markers = () if raw_prompt is not None else turn_markers(self.template)  # a raw prompt is the caller's
        with self.lock:
            yield from self._generate(name, prompt, settings, stop or threading.Event(), reply, markers, stop_texts)

    def _require(self, name: str) -> None:
        if name not in self.names:
            raise AffinerError(f"unknown model '{name}' (models: {', '.join(self.names)}).")

    def _generate(self, name: str, prompt: list[int], settings: Settings, stop: threading.Event,
                  reply: Reply, markers: tuple[str, ...], stop_texts: tuple[str, ...]) -> Iterator[str]:
        """Generate in a thread and yield what it streams; called with the lock held, and returns only once
        the thread has ended, whatever ends the iteration (the answer, an error, Ctrl-C, a caller gone)."""
        from transformers import TextIteratorStreamer

        stop_ids = list(self.template.stop_token_ids) or [self.tokenizer.eos_token_id]
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        ids = torch.tensor([prompt], device=device())
        output: dict = {}
        started = time.perf_counter()
        # Not a daemon: the interpreter waits for it at exit instead of killing it inside torch (an abort).
        worker = threading.Thread(target=self._run_generation, daemon=False,
                                  args=(name, ids, settings, stop, stop_ids, streamer, output))
        # Stop texts are looked for in the raw text, as a batch row looks for them (RowEnds), then the template's turn
        # in what they leave: a stop text that is part of a marker ("###") ends the answer as it does in a batch.
        texts, turn = TurnCutter(stop_texts, anywhere=True), TurnCutter(markers)
        try:
            worker.start()
            for piece in itertools.chain(streamer, [None]):  # None: the end, what the cutters held back
                if piece is None:  # the generation is over: whether a stop token ended it decides the flush
                    _join_through_interrupts(worker)
                    new, cut = _answer_ids(output, len(prompt), stop_ids)  # the loop always ends here
                    piece = turn.feed(texts.flush()) + turn.flush(trim=cut is None and not texts.cut)
                else:
                    piece = turn.feed(texts.feed(piece))
                if turn.cut or texts.cut:
                    stop.set()  # a new turn began, or a stop text was written: the answer wanted is complete
                if not piece:
                    continue
                if piece.strip() and reply.first_token_seconds is None:  # the first visible word, not a space
                    reply.first_token_seconds = time.perf_counter() - started
                reply.text += piece
                yield piece
        finally:
            stop.set()  # a caller that stops iterating (client gone, Ctrl-C) ends the generation too
            _join_through_interrupts(worker)  # the lock must not be released while the model still runs
            reply.seconds = time.perf_counter() - started
        if "error" in output:
            raise output["error"]
        reply.new_turn, reply.ids = turn.cut, new if cut is None else new[:cut]
        reply.stopped = (texts.cut or cut is not None) and not turn.cut  # a turn seen first is what ended it
        reply.tokens = tokens_for(reply.text, reply.ids, self.tokenizer) if turn.cut or texts.cut else len(reply.ids)

    def _run_generation(self, name: str, ids: torch.Tensor, settings: Settings, stop: threading.Event,
                        stop_ids: list[int], streamer, output: dict) -> None:
        """The generation thread: the output ids, or the error, land in `output` for the caller's thread."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        try:  # everything inside: an error that ended this thread early would leave the caller waiting for ever
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
            with self._adapter(name), torch.no_grad():
                output["ids"] = self.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=settings.max_new_tokens,
                    eos_token_id=stop_ids, pad_token_id=self.tokenizer.pad_token_id, streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop)]),
                    logits_processor=LogitsProcessorList(penalties(settings, ids.shape[1])),
                    logits_to_keep=last_position(ids.device), **settings.generate_kwargs())
        except Exception as exc:  # surfaced in the caller's thread by _generate
            output["error"] = exc
            streamer.end()

    def complete(self, name: str, messages: list[dict[str, str]] | None, settings: Settings = Settings(),
                 raw_prompt: str | None = None) -> Reply:
        reply = Reply()
        for _ in self.stream(name, messages, settings, reply=reply, raw_prompt=raw_prompt):
            pass
        reply.text = reply.text.strip()
        return reply

    def complete_batch(self, name: str, asks: list[Ask]) -> list[Reply]:
        """Greedy answers to several questions decoded together, each row leaving the batch at its own stop
        token, new turn, stop text, limit or cancel; the replies are those `stream` gives one at a time
        (text unstripped, cut at the first new turn or stop text, tokens counted up to the cut), token for
        token in fp32 (in bf16 the batch's shapes round differently and can flip a near-tie)."""
        replies = [Reply() for _ in asks]
        self._require(name)
        prompts = [self.prompt_ids(a.messages, a.max_new_tokens, a.raw_prompt, r) for a, r in zip(asks, replies)]
        markers = [() if a.raw_prompt is not None else turn_markers(self.template) for a in asks]
        stop_ids = list(self.template.stop_token_ids) or [self.tokenizer.eos_token_id]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else stop_ids[0]
        ids, attention = left_pad(prompts, pad)
        done = RowEnds(self.tokenizer, [a.max_new_tokens for a in asks], markers, [a.stop for a in asks],
                       [a.cancel for a in asks])
        started = time.perf_counter()
        with self.lock, self._adapter(name):
            new = decode_rows(self.model, ids.to(device()), attention.to(device()), max(a.max_new_tokens for a in asks),
                              stop_ids, GREEDY, done)
        for tokens, reply, ask, row_markers in zip(new, replies, asks, markers):
            self._fill(reply, tokens, stop_ids, row_markers, ask.stop)
            reply.seconds = time.perf_counter() - started
        return replies

    def _fill(self, reply: Reply, tokens: list[int], stop_ids: list[int], markers: tuple[str, ...],
              stops: tuple[str, ...]) -> None:
        """A batch row's reply as `stream` makes it: the text its streamer yields (decoded word by word and line
        by line, which can differ from decoding the whole), cut at a new turn, then at a stop text."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_special_tokens=True)
        for token in tokens:
            streamer.put(torch.tensor([token]))
        streamer.end()
        text, new_turn = cut_at_turn("".join(streamer), markers)
        reply.text, by_stop = cut_at_turn(text, stops, anywhere=True)
        cut = next((i for i, t in enumerate(tokens) if t in stop_ids), None)
        if not (new_turn or by_stop) and cut is None:  # ended by the limit: as `stream` flushes it
            reply.text = trim_unfinished_marker(reply.text, markers)
        reply.new_turn, reply.stopped = new_turn, by_stop or (cut is not None and not new_turn)
        reply.ids = tokens if cut is None else tokens[:cut]
        reply.tokens = tokens_for(reply.text, reply.ids, self.tokenizer) if new_turn or by_stop else len(reply.ids)

    def _adapter(self, name: str):
        """The named adapter active for one generation; "base" runs with every adapter disabled."""
        import contextlib

        if name == BASE:
            return self.model.disable_adapter() if self.adapters else contextlib.nullcontext()
        self.model.set_adapter(name)
        return contextlib.nullcontext()
