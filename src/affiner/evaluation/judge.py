"""LLM as a judge: a second model grades answers, through any OpenAI-compatible chat endpoint.

Exact-match scores miss correct answers phrased differently from the reference. A judge model
(served by Ollama, vLLM, OpenAI or any server speaking the chat-completions protocol) reads the
question, the reference and the answer, and says whether the answer is correct (absolute mode), or
which of the base and tuned answers is better (pairwise mode, asked in both orders so that a judge
that favours the first or second position cannot decide the result).

From the command line:

    affiner evaluate runs/quickstart-20261122-183000 --judge-endpoint http://127.0.0.1:11434/v1 --judge-model gemma3:27b

From Python:

    judge = Judge(EndpointSettings(url="http://127.0.0.1:11434/v1", model="gemma3:27b"))
    verdicts = judge.absolute([(question, reference, answer), ...])
    print(summarise_absolute(verdicts))

Replies are cached in sqlite (`$AFFINER_CACHE/judge`, default `~/.cache/affiner/judge`), keyed by
endpoint, model, prompt and response format, so evaluating again costs no request. The transport (retries,
cache, key handling) is `affiner.core.endpoint.ChatClient`, shared with `affiner synth`. Failed requests are
retried with exponential back-off when retrying can help (timeouts, connection errors, HTTP 429 and 5xx, garbled
bodies), and reported in `Verdict.error` otherwise. Verdicts are asked for as JSON by a schema (structured
output, which OpenAI, vLLM, Ollama >= 0.5 and llama.cpp's server enforce); a server that ignores it answers in
the prompt's `<result>` form, read by a tolerant parser, and one that refuses it is asked again without it, for
the rest of the run. A reply the parser cannot read is counted as unparseable, never guessed.
`unjudged(verdicts)` counts the answers left without a verdict and says why; an evaluation records it for every
model, so that a failing endpoint shows in the report (and in the exit code) instead of silently shrinking the
sample the judge's scores are over. The API key, if any, is read from the environment variable named by
`api_key_env`; it is sent in the Authorization header and nowhere else.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from affiner.core.endpoint import ChatClient, EndpointSettings, RequestFailed
from affiner.core.errors import AffinerError
from affiner.core.formatting import shorten

if TYPE_CHECKING:
    from affiner.core.config import JudgeConfig
    from affiner.core.templates import Example

# ---------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Verdict:
    score: int | None  # 1 correct, 0 incorrect, None unparseable or failed
    reason: str  # the judge's <explain> sentence, or ""
    raw: str  # the judge's reply ("" on failure)
    error: str | None = None  # why the request failed after all retries


@dataclass(frozen=True)
class PairVerdict:
    winner: str | None  # "tuned", "base", "tie", or None (unparseable or failed in either order)
    raw: tuple[str, str]  # replies with base shown first, then with tuned shown first
    error: str | None = None


# ---------------------------------------------------------------------------------------- prompts

ABSOLUTE_SYSTEM = (
    "You grade answers to questions. You are given a question, a reference answer that is known to be "
    "correct, and a candidate answer. The candidate is correct if it gives the same key facts as the "
    "reference; wording, length and harmless extra detail do not matter. It is incorrect if a key fact is "
    "missing, wrong or contradicted, or if it does not answer the question.\n"
    "Reply with <result>1</result> if the candidate is correct or <result>0</result> if it is incorrect, "
    "followed by <explain>one sentence saying why</explain>. Write nothing else."
)

PAIRWISE_SYSTEM = (
    "You compare two answers, A and B, to the same question. You are also given a reference answer that is "
    "known to be correct. The better answer is the one that agrees more with the reference; if both are "
    "equally correct, the clearer and more concise one is better. Say tie only if neither is better. The "
    "order in which the answers are shown and their length must not influence you.\n"
    "Reply with <result>A</result>, <result>B</result> or <result>tie</result>, followed by "
    "<explain>one sentence saying why</explain>. Write nothing else."
)


def _block(tag: str, text: str) -> str:
    # Tags delimit each text so that an answer containing its own headings cannot pose as another part.
    return f"<{tag}>\n{text.strip()}\n</{tag}>"


def absolute_messages(question: str, reference: str, answer: str) -> list[dict[str, str]]:
    user = "\n\n".join([_block("question", question), _block("reference", reference),
                        _block("candidate", answer)])
    return [{"role": "system", "content": ABSOLUTE_SYSTEM}, {"role": "user", "content": user}]


def pairwise_messages(question: str, reference: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    user = "\n\n".join([_block("question", question), _block("reference", reference),
                        _block("answer_A", answer_a), _block("answer_B", answer_b)])
    return [{"role": "system", "content": PAIRWISE_SYSTEM}, {"role": "user", "content": user}]


def _response_format(name: str, result: dict) -> dict:
    """Chat completions' structured output: a reply that is this JSON object and nothing else."""
    schema = {"type": "object", "properties": {"result": result, "explain": {"type": "string"}},
              "required": ["result", "explain"], "additionalProperties": False}
    return {"type": "json_schema", "json_schema": {"name": name, "strict": True, "schema": schema}}


# The verdict comes before its explanation, as the prompts ask: constrained decoding follows this order.
ABSOLUTE_FORMAT = _response_format("absolute_verdict", {"type": "integer", "enum": [0, 1]})
PAIRWISE_FORMAT = _response_format("pairwise_verdict", {"type": "string", "enum": ["A", "B", "tie"]})


# ---------------------------------------------------------------------------------------- parsing

# Reasoning models may think aloud before answering, and may quote the reply format while doing so.
_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.IGNORECASE | re.DOTALL)
_EXPLAIN = re.compile(r"<\s*explain\s*>(.*?)(?:<\s*/\s*explain\s*>|(?=<\s*result\s*>)|\Z)",
                      re.IGNORECASE | re.DOTALL)
# The value runs to the next tag, so a missing </result> still ends at <explain> or at the end.
_RESULT_TAG = re.compile(r"<\s*result\s*>([^<]*)", re.IGNORECASE)
_RESULT_LINE = re.compile(r"^[\s>#*_`-]*(?:final\s+)?(?:result|verdict)[\s*_`]*[:=](.*)$",
                          re.IGNORECASE | re.MULTILINE)
_DECORATION = " \t\r\n*_`'\".:!"  # markdown emphasis, code ticks, quotes, trailing punctuation

_ABSOLUTE_VALUES: dict[str, int] = {"1": 1, "0": 0}
# The prompt labels the answers answer_A and answer_B, and judges sometimes echo the label.
_PAIRWISE_VALUES: dict[str, str] = {"a": "A", "b": "B", "tie": "tie", "answer a": "A", "answer b": "B",
                                    "answer_a": "A", "answer_b": "B"}


def _value(text: str, allowed: dict[str, object]) -> object | None:
    key = text.strip(_DECORATION).lower()
    return allowed.get(key)


def _agreed(values: list[object | None]) -> object | None:
    # Several verdicts are only trusted if they all say the same thing; anything else would be a guess.
    if not values or any(v is None for v in values) or len(set(values)) > 1:
        return None
    return values[0]


def _structured(text: str, response_format: dict) -> dict | None:
    """The reply as the schema's object, or None when it is anything else (the text form, or JSON that differs)."""
    try:
        reply = json.loads(_THINK.sub("", text))
    except (ValueError, RecursionError):  # a glitching judge may nest brackets past Python's limit
        return None
    schema = response_format["json_schema"]["schema"]
    if not isinstance(reply, dict) or set(reply) != set(schema["required"]) or not isinstance(reply["explain"], str):
        return None
    # By type too: JSON's true is no 1, and 1.0 is no integer.
    allowed = schema["properties"]["result"]["enum"]
    return reply if any(type(reply["result"]) is type(v) and reply["result"] == v for v in allowed) else None


def _verdict(text: str, allowed: dict[str, object]) -> object | None:
    text = _THINK.sub("", text)
    tags = _RESULT_TAG.findall(text)
    if tags:
        # The first line only: without </result>, prose may follow the value on later lines.
        return _agreed([_value((t.strip().splitlines() or [""])[0], allowed) for t in tags])
    lines = _RESULT_LINE.findall(text)
    if lines:
        return _agreed([_value(line, allowed) for line in lines])
    return _value(_EXPLAIN.sub("", text), allowed)


def parse_absolute(text: str) -> tuple[int | None, str]:
    """(1 or 0, reason), or (None, reason) when the reply holds no clear verdict."""
    if structured := _structured(text, ABSOLUTE_FORMAT):
        return structured["result"], " ".join(structured["explain"].split())
    explain = _EXPLAIN.search(_THINK.sub("", text))
    reason = " ".join(explain.group(1).split()) if explain else ""
    score = _verdict(text, _ABSOLUTE_VALUES)
    return (score if isinstance(score, int) else None), reason


def parse_pairwise(text: str) -> str | None:
    """"A", "B" or "tie", or None when the reply holds no clear verdict."""
    if structured := _structured(text, PAIRWISE_FORMAT):
        return structured["result"]
    winner = _verdict(text, _PAIRWISE_VALUES)
    return winner if isinstance(winner, str) else None


# ---------------------------------------------------------------------------------------- summaries


def summarise_absolute(verdicts: Sequence[Verdict]) -> dict:
    failed = sum(v.error is not None for v in verdicts)
    scores = [v.score for v in verdicts if v.score is not None]
    return {"judged": len(verdicts), "parsed": len(scores), "unparseable": len(verdicts) - len(scores) - failed,
            "failed": failed, "accuracy": sum(scores) / len(scores) if scores else None}


def summarise_pairwise(verdicts: Sequence[PairVerdict]) -> dict:
    failed = sum(v.error is not None for v in verdicts)
    winners = [v.winner for v in verdicts if v.winner is not None]
    wins, losses, ties = winners.count("tuned"), winners.count("base"), winners.count("tie")
    return {"judged": len(verdicts), "parsed": len(winners), "unparseable": len(verdicts) - len(winners) - failed,
            "failed": failed, "wins": wins, "losses": losses, "ties": ties,
            "win_rate": (wins + 0.5 * ties) / len(winners) if winners else None}


UNPARSEABLE = "no verdict in the judge's reply"
NO_STRUCTURED_OUTPUT = "note: the judge endpoint does not support structured output; using text verdicts"
REASON_WIDTH = 160  # an error message, e.g. the server's own explanation, cut to fit one line
MAX_REASONS = 3


def _unjudged_reason(verdict: Verdict | PairVerdict) -> tuple[str, str] | None:
    """(what groups it, what to show) for a verdict that is missing; None for one that was given."""
    if verdict.error is not None:
        text = shorten(verdict.error, REASON_WIDTH)
        return text, text
    if isinstance(verdict, Verdict):
        unread = [verdict.raw] if verdict.score is None else []
    else:
        unread = [raw for raw in verdict.raw if parse_pairwise(raw) is None] if verdict.winner is None else []
    if not unread:
        return None
    # Unreadable replies differ word for word but share one cause; the first one shows what they look like.
    return UNPARSEABLE, f"{UNPARSEABLE}, e.g. {shorten(unread[0], 80)!r}"


def unjudged(verdicts: Sequence[Verdict | PairVerdict]) -> dict:
    """{"unjudged": count, "reasons": [{"reason", "count"}, ...]}: the most common reasons first, at most
    MAX_REASONS of them, equal counts in the order they first occurred."""
    counts: dict[str, int] = {}
    texts: dict[str, str] = {}
    for verdict in verdicts:
        reason = _unjudged_reason(verdict)
        if reason is not None:
            key, text = reason
            counts[key] = counts.get(key, 0) + 1
            texts.setdefault(key, text)
    ranked = sorted(counts, key=lambda key: -counts[key])
    return {"unjudged": sum(counts.values()),
            "reasons": [{"reason": texts[key], "count": counts[key]} for key in ranked[:MAX_REASONS]]}


def _pair_winner(base_first: str | None, tuned_first: str | None) -> str | None:
    if base_first is None or tuned_first is None:
        return None
    one = {"A": "base", "B": "tuned", "tie": "tie"}[base_first]
    two = {"A": "tuned", "B": "base", "tie": "tie"}[tuned_first]
    # Orders that disagree mean the position, not the answer, decided: that is no win for either side.
    return one if one == two else "tie"


# ---------------------------------------------------------------------------------------- the client


@dataclass(frozen=True)
class _Reply:
    text: str | None
    error: str | None = None


class Judge:
    """Sends judging prompts to the endpoint, in parallel, with retries and a cache."""

    def __init__(self, settings: EndpointSettings):
        self.settings = settings
        # Replies are cached in settings.cache_dir, else $AFFINER_CACHE/judge (default ~/.cache/affiner/judge).
        self._client = ChatClient(settings, cache_name="judge", label="judge", user_agent="affiner-judge")
        self.endpoint = self._client.endpoint
        self.structured_output = True  # until the endpoint refuses it: then text verdicts for the rest of the run
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Judge({self.endpoint!r}, model={self.settings.model!r})"

    # -- public

    def absolute(self, items: list[tuple[str, str, str]]) -> list[Verdict]:
        """One verdict per (question, reference, answer), in input order."""
        replies = self._ask_all([absolute_messages(q, ref, answer) for q, ref, answer in items], ABSOLUTE_FORMAT)
        verdicts = []
        for reply in replies:
            if reply.text is None:
                verdicts.append(Verdict(score=None, reason="", raw="", error=reply.error))
            else:
                score, reason = parse_absolute(reply.text)
                verdicts.append(Verdict(score=score, reason=reason, raw=reply.text))
        return verdicts

    def pairwise(self, items: list[tuple[str, str, str, str]]) -> list[PairVerdict]:
        """One verdict per (question, reference, base_answer, tuned_answer), in input order."""
        prompts = []
        for question, reference, base, tuned in items:
            prompts.append(pairwise_messages(question, reference, base, tuned))
            prompts.append(pairwise_messages(question, reference, tuned, base))
        replies = self._ask_all(prompts, PAIRWISE_FORMAT)
        return [_pair_verdict(replies[i], replies[i + 1]) for i in range(0, len(replies), 2)]

    # -- requests

    def _ask_all(self, prompts: list[list[dict[str, str]]], response_format: dict) -> list[_Reply]:
        keys = [self._client.key(m) for m in prompts]
        # Identical prompts in one batch are asked once: the cache only helps after a reply has arrived.
        unique = {key: messages for key, messages in zip(keys, prompts)}
        if not unique:
            return []
        with ThreadPoolExecutor(max_workers=self.settings.concurrency, thread_name_prefix="judge") as pool:
            futures = {key: pool.submit(self._ask, messages, response_format) for key, messages in unique.items()}
            replies = {key: future.result() for key, future in futures.items()}
        return [replies[key] for key in keys]

    def _ask(self, messages: list[dict[str, str]], response_format: dict) -> _Reply:
        try:
            if self.structured_output:
                try:
                    return _Reply(self._client.ask(messages, temperature=0, response_format=response_format))
                except RequestFailed as failure:
                    if not _refuses_structured_output(failure):
                        raise
                    self._without_structured_output()
            return _Reply(self._client.ask(messages, temperature=0))
        except RequestFailed as failure:
            return _Reply(None, error=str(failure))

    def _without_structured_output(self) -> None:
        # Requests already in flight may be refused too; the user reads the note once.
        with self._lock:
            if self.structured_output:
                self.structured_output = False
                print(NO_STRUCTURED_OUTPUT, file=sys.stderr)


def _refuses_structured_output(failure: RequestFailed) -> bool:
    """A server without structured output: its 400 names the field (llama.cpp, `affiner serve`), or its
    request validation answers 422 (FastAPI servers)."""
    said = str(failure).lower()
    return failure.status == 422 or (failure.status == 400 and ("response_format" in said or "json_schema" in said))


def _pair_verdict(base_first: _Reply, tuned_first: _Reply) -> PairVerdict:
    raw = (base_first.text or "", tuned_first.text or "")
    if base_first.error and base_first.error == tuned_first.error:
        # One cause (the endpoint is down, the key is wrong) reads once, and groups with the absolute failures.
        return PairVerdict(winner=None, raw=raw, error=base_first.error)
    errors = [f"{label}: {reply.error}" for label, reply in
              (("base shown first", base_first), ("tuned shown first", tuned_first)) if reply.error]
    if errors:
        return PairVerdict(winner=None, raw=raw, error="; ".join(errors))
    return PairVerdict(winner=_pair_winner(parse_pairwise(raw[0]), parse_pairwise(raw[1])), raw=raw)


# ---------------------------------------------------------------------------------------- in an evaluation


def judge_settings(config: JudgeConfig) -> EndpointSettings:
    """The endpoint of the config's `eval.judge` (or the --judge-* flags)."""
    if not config.model:
        raise AffinerError("the judge needs a model name: --judge-model NAME (or eval.judge.model).")
    return EndpointSettings(url=config.url, model=config.model, api_key_env=config.api_key_env,
                            concurrency=config.concurrency)


def judge_answers(judge: Judge, config: JudgeConfig, examples: list[Example], answers: dict, scores: dict) -> dict:
    """Each model's answers judged as `config.mode` says; absolute verdicts also go into `scores` as "judge".

    Each summary also counts the answers left without a verdict and says why (`unjudged`)."""
    result: dict = {"model": config.model, "absolute": {}, "pairwise": {}}
    models = list(answers)
    if config.mode in {"absolute", "both"}:
        for m in models:
            verdicts = judge.absolute([(e.asked, e.expected, a.text) for e, a in zip(examples, answers[m])])
            for row, verdict in zip(scores[m], verdicts):
                if verdict.score is not None:
                    row["judge"] = float(verdict.score)
            result["absolute"][m] = summarise_absolute(verdicts) | unjudged(verdicts)
    if config.mode in {"pairwise", "both"}:
        for m in models[1:]:
            verdicts = judge.pairwise([(e.asked, e.expected, b.text, t.text)
                                       for e, b, t in zip(examples, answers["base"], answers[m])])
            result["pairwise"][m] = summarise_pairwise(verdicts) | unjudged(verdicts)
    return result
