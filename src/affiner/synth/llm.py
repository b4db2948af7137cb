"""Conversations written by a model at any OpenAI-compatible endpoint (Ollama, vLLM, OpenAI, `affiner serve`).

One request per entry and language asks for its training and held-out conversations together; when
a reply falls short, the next request asks only for the missing ones and names the questions already
used. Every reply is checked (`replies.accept_reply`); useful replies are cached in
`$AFFINER_CACHE/generate`, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from affiner.core.endpoint import ChatClient, EndpointSettings, RequestFailed
from affiner.core.errors import AffinerError
from affiner.data.ledger import Ledger
from affiner.synth.banks import AVOID, CONTEXT, PROMPTS
from affiner.synth.replies import accept_reply, question_key
from affiner.synth.terms import Conversation, Entry, Pairs, Term

RETRY_BACKOFF = 1.0  # seconds before the first transport retry, doubled after each (tests make it tiny)
TRANSPORT_RETRIES = 3


@dataclass(frozen=True)
class LLMOptions:
    """The endpoint that writes the conversations, and how to ask it."""

    endpoint: EndpointSettings
    temperature: float = 0.7
    max_attempts: int = 3  # requests per entry and language when replies fall short


def endpoint_settings(url: str, model: str, api_key_env: str | None = None, timeout: float = 300.0,
                      concurrency: int = 4) -> EndpointSettings:
    """A writing endpoint's settings; the long timeout because a local model on a CPU writes for minutes."""
    return EndpointSettings(url=url, model=model, api_key_env=api_key_env, timeout=timeout,
                            max_retries=TRANSPORT_RETRIES, backoff=RETRY_BACKOFF, concurrency=concurrency)


@dataclass
class EndpointReport:
    """What asking the endpoint cost and dropped, for the summary."""

    drops: Ledger  # dropped conversations; each row is the entry and language asked for ("WHO (en)")
    short: list[str]  # "WHO (en) 1 of 3": entries and languages that got fewer conversations than asked for
    requests_sent: int = 0
    cache_hits: int = 0


def endpoint_messages(term: Term, language: str, count: int, attempt: int,
                      avoid: list[str] | tuple[str, ...] = ()) -> list[dict[str, str]]:
    """The request for `count` conversations; `attempt` and `avoid` make each retry a distinct request."""
    context = CONTEXT[language].format(term.description) if term.description else ""
    avoid_text = AVOID[language].format("\n".join(f"  - {q}" for q in avoid)) if avoid else ""
    prompt = PROMPTS[language].format(count=count, acronym=term.acronym, definition=term.definition,
                                      context=context, avoid=avoid_text, attempt=attempt)
    return [{"role": "user", "content": prompt}]


def llm_pairs(entries: list[Entry], languages: tuple[str, ...], per_entry: int, held_out: int,
              options: LLMOptions, say: Callable[[str], None] = print) -> tuple[Pairs, Pairs, EndpointReport]:
    """Training and held-out conversations for every entry and language, written by the endpoint.

    Raises AffinerError, having written nothing, when the endpoint fails or an entry gets no usable
    conversation at all.
    """
    endpoint = options.endpoint
    client = ChatClient(endpoint, cache_name="generate", label="generation endpoint", user_agent="affiner-synth",
                        fail_fast_unreachable=True)
    units = [_Unit(index, entry.in_language(language), language, per_entry + held_out)
             for index, entry in enumerate(entries) for language in languages]
    say(f"asking {endpoint.model} at {endpoint.url} for {per_entry + held_out} conversations for each of "
        f"{len(entries)} entries in {', '.join(languages)} ({len(units)} requests at least; "
        f"cached replies are reused)")
    _run_units(units, options, client)
    _refuse_empty(units, entries, options)
    train, test, report = _split(units, per_entry)
    _drop_trained_questions(entries, languages, train, test, report.drops)
    report.requests_sent, report.cache_hits = client.requests_sent, client.cache_hits
    return train, test, report


# ---------------------------------------------------------------------------------------- one entry in one language


@dataclass
class _Unit:
    """One entry in one language: the request(s) to make, and what came back."""

    entry: int  # index in the glossary's entries
    term: Term
    language: str
    need: int
    conversations: list[Conversation] = field(default_factory=list)
    drops: Ledger = field(default_factory=Ledger)

    @property
    def where(self) -> str:
        return f"{self.term.acronym} ({self.language})"


class _Stopped(Exception):
    """Another unit failed or the user pressed Ctrl-C: ask nothing more."""


def _run_unit(client: ChatClient, unit: _Unit, options: LLMOptions, stop: threading.Event) -> _Unit:
    seen: set[str] = set()
    for attempt in range(1, options.max_attempts + 1):
        missing = unit.need - len(unit.conversations)
        if missing <= 0:
            break
        if stop.is_set():
            raise _Stopped
        asked = [c[0]["content"] for c in unit.conversations]
        messages = endpoint_messages(unit.term, unit.language, missing, attempt, asked)

        def useful(reply: str) -> bool:  # only replies worth replaying are cached
            return bool(accept_reply(reply, unit.term.definition, set(seen)))

        try:
            reply = client.ask(messages, options.temperature, keep=useful)
        except Exception:
            stop.set()  # here, not in the main thread, so that this worker's next unit already sees it
            raise
        unit.conversations += accept_reply(reply, unit.term.definition, seen, unit.drops, unit.where)
    del unit.conversations[unit.need:]
    return unit


# ---------------------------------------------------------------------------------------- all of them


def _run_units(units: list[_Unit], options: LLMOptions, client: ChatClient) -> None:
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=options.endpoint.concurrency, thread_name_prefix="generate")
    futures: list[Future] = [pool.submit(_run_unit, client, unit, options, stop) for unit in units]
    interrupted = False
    try:
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        if any(f.exception() is not None for f in done):
            stop.set()
            for future in futures:
                future.cancel()
            wait(futures)  # the requests under way finish, so their replies are cached
            error = _first_failure(futures)
            if isinstance(error, RequestFailed):
                raise AffinerError(_transport_message(options.endpoint, error, client)) from None
            raise error
    except KeyboardInterrupt:
        interrupted = True
        under_way = sum(future.running() for future in futures)
        print(f"\ninterrupted: the finished replies are cached in {client.cache_path}; run the same command "
              "again to resume where this one stopped." + (
                  f" Waiting for the {under_way} request(s) under way (up to {options.endpoint.timeout:g} s), so that "
                  "their replies are cached too; Ctrl-C again quits at once." if under_way else ""),
              file=sys.stderr, flush=True)
        if threading.current_thread() is threading.main_thread():
            # Python waits for the requests' threads on its way out; a second Ctrl-C would print a traceback from
            # inside that wait. The cache is SQLite's: a request cut off loses only its own reply.
            signal.signal(signal.SIGINT, lambda *_: os._exit(130))
        raise
    finally:
        stop.set()  # requests under way finish (and are cached); no new one starts
        pool.shutdown(wait=not interrupted, cancel_futures=True)


def _first_failure(futures: list[Future]) -> BaseException:
    """The first real failure, not the units that stopped because of it."""
    return next(e for f in futures if not f.cancelled() and (e := f.exception()) is not None
                and not isinstance(e, _Stopped))


def _transport_message(endpoint: EndpointSettings, error: Exception, client: ChatClient) -> str:
    status = getattr(error, "status", None)
    if status in (401, 403):
        hint = (f" The server refused the API key from {endpoint.api_key_env}; check it." if endpoint.api_key_env
                else " The server wants an API key: put it in an environment variable and name it with "
                     "--api-key-env.")
    elif status == 404:
        hint = f" Check the URL (it should end in /v1 for most servers) and the model name {endpoint.model!r}."
    elif status is None:
        hint = " Is the server running, and is the URL right?"
    else:
        hint = ""
    return (f"the generation endpoint {endpoint.url} failed: {error}.{hint} Nothing was written; replies already "
            f"received are cached in {client.cache_path}, so running the same command again resumes where this "
            f"one stopped.")


def _refuse_empty(units: list[_Unit], entries: list[Entry], options: LLMOptions) -> None:
    """Writing nothing for an entry would quietly leave it out of training: that is an error."""
    empty = [unit for unit in units if not unit.conversations]
    if not empty:
        return
    endpoint = options.endpoint
    listed = "; ".join(f"{u.where} from {entries[u.entry].where}: {u.drops.describe() or 'no reply'}"
                       for u in empty[:10])
    more = f" (and {len(empty) - 10} more)" if len(empty) > 10 else ""
    raise AffinerError(f"after {options.max_attempts} attempt(s), {endpoint.model} at {endpoint.url} gave no "
                       f"usable conversation for {len(empty)} entry/language pair(s): {listed}{more}. Nothing "
                       f"was written; the good replies are cached, so running the same command again asks only "
                       f"for the missing ones (raise --max-attempts, or try another --model).")


def _split(units: list[_Unit], per_entry: int) -> tuple[Pairs, Pairs, EndpointReport]:
    """Each unit's first `per_entry` conversations for training, the rest held out."""
    train, test, report = {}, {}, EndpointReport(Ledger(), [])
    for unit in units:
        report.drops.merge(unit.drops)
        train[unit.entry, unit.language] = unit.conversations[:per_entry]
        test[unit.entry, unit.language] = unit.conversations[per_entry:]
        if len(unit.conversations) < unit.need:
            report.short.append(f"{unit.where} {len(unit.conversations)} of {unit.need}")
    return train, test, report


def _drop_trained_questions(entries: list[Entry], languages: tuple[str, ...], train: Pairs, test: Pairs,
                            drops: Ledger) -> None:
    """A question written for one language may come back in another; held-out questions stay unseen anyway."""
    for index, entry in enumerate(entries):
        trained = {question_key(c[0]["content"]) for lang in languages for c in train[index, lang]}
        for lang in languages:
            kept = [c for c in test[index, lang] if question_key(c[0]["content"]) not in trained]
            removed = len(test[index, lang]) - len(kept)
            if removed:
                drops.drop(f"{entry.term.acronym} ({lang})", "held-out question also in training", times=removed)
            test[index, lang] = kept
