"""The OpenAI API's side of `affiner serve`, without HTTP: request bodies checked into a `Request` (or an
`ApiError` naming the field at fault), and the response bodies, whole or as stream chunks.

The shapes follow OpenAI's chat completions and (legacy) completions APIs, so that any OpenAI client works
unchanged. Fields are checked by pydantic models in strict mode (`true` is not a number); the first error
is a 400 whose `param` names the field (`messages[0].content`). `stop` (a string or up to 4) is honoured;
what this server cannot honour (tools, logprobs, n > 1) is refused with a 400, not silently ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse

from affiner.core.errors import AffinerError
from affiner.core.settings import Settings
from affiner.interfaces.engine import Engine, Reply

DEFAULT_MAX_TOKENS = 256
MAX_STOPS = 4  # as OpenAI's API
UNSUPPORTED = ("tools", "functions", "logit_bias", "suffix", "logprobs", "top_logprobs", "echo")


class ApiError(Exception):
    """A request the server refuses, answered with an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(self.status, "invalid_request_error")
        kind = "server_error" if self.status >= 500 else kind
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, self.headers)


def _text(value: object) -> object:
    """A message's text: a string, or an array of {"type": "text", "text": ...} parts, joined."""
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                       for p in value):
        return "\n".join(part["text"] for part in value)
    return value


def _stops(value: object) -> tuple[str, ...]:
    stops = [] if value is None else [value] if isinstance(value, str) else value
    if not (isinstance(stops, list) and len(stops) <= MAX_STOPS and all(isinstance(s, str) and s for s in stops)):
        raise ValueError(f"must be a non-empty string or an array of up to {MAX_STOPS} non-empty strings")
    return tuple(stops)


class _Fields(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # unknown fields are ignored, as OpenAI's servers do


class Message(_Fields):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, BeforeValidator(_text)]


class Options(_Fields):
    include_usage: bool = False


class Format(_Fields):
    type: Literal["text"]


class Body(_Fields):
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: Literal[1] | None = None
    best_of: Literal[1] | None = None
    response_format: Format | None = None
    stream: bool | None = None
    stream_options: Options | None = None
    stop: Annotated[tuple[str, ...], BeforeValidator(_stops)] = ()


class ChatBody(Body):
    messages: list[Message] = Field(min_length=1)


class CompletionBody(Body):  # a list of one prompt is a batch of one
    prompt: Annotated[str, BeforeValidator(lambda p: p[0] if isinstance(p, list) and len(p) == 1 else p),
                      Field(min_length=1)]


@dataclass(frozen=True)
class Request:
    """A validated generation request."""

    chat: bool  # /v1/chat/completions (messages) or /v1/completions (raw prompt)
    model: str
    messages: list[dict[str, str]] | None
    prompt: str | None
    settings: Settings
    stream: bool
    include_usage: bool
    stop: tuple[str, ...] = ()  # texts that end the answer, cut from it


def require_json(content_type: str | None) -> None:
    """Refuse (415) a body not declared as JSON: a cross-site page can POST text/plain or a form without the
    browser asking this server first, but not application/json, so only JSON bodies are read."""
    if (content_type or "").partition(";")[0].strip().lower() != "application/json":
        sent = f"not {content_type.strip()[:100]!r}" if content_type else "none was given"
        raise ApiError(415, f"The body must be sent with 'Content-Type: application/json' ({sent}).",
                       code="unsupported_media_type")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_body(data: bytes) -> dict:
    try:
        body = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise ApiError(400, f"The body is not valid JSON ({error}).", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"The body must be a JSON object, not {type(body).__name__}.", code="invalid_json")
    return body


def _validated(raw: dict, chat: bool) -> Body:
    refused = next((name for name in UNSUPPORTED if raw.get(name) not in (None, False, 0, "", [], {})), None)
    if refused:
        raise ApiError(400, f"'{refused}' is not supported by affiner serve.", param=refused,
                       code="unsupported_parameter")
    try:
        return (ChatBody if chat else CompletionBody).model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
        raise ApiError(400, f"'{param}': {first['msg'].removeprefix('Value error, ')}.", param=param or None,
                       code="missing_required_parameter" if first["type"] == "missing" else "invalid_value") from None


def parse_request(engine: Engine, raw: dict, chat: bool) -> Request:
    """Validate a request body against the engine's models; raises ApiError (400/404) with the field at fault."""
    body = _validated(raw, chat)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                for m in getattr(body, "messages", [])] or None
    if messages and (messages[-1]["role"] != "user" or any(m["role"] == "system" for m in messages[1:])):
        raise ApiError(400, "a system message may only come first, and the last message must be the user's.",
                       param="messages", code="invalid_value")
    if body.model not in engine.names:
        raise ApiError(404, f"The model '{body.model}' does not exist; this server has: {', '.join(engine.names)}.",
                       param="model", code="model_not_found")
    if None not in (body.max_tokens, body.max_completion_tokens) and body.max_tokens != body.max_completion_tokens:
        raise ApiError(400, "'max_tokens' and 'max_completion_tokens' disagree; send one of them.",
                       param="max_completion_tokens", code="invalid_value")
    given = {k: v for k in ("temperature", "top_p", "top_k") if (v := getattr(body, k)) is not None}
    prompt = getattr(body, "prompt", None)
    settings = Settings(**given, seed=body.seed, max_new_tokens=fit_max_tokens(
        engine, messages, prompt, body.max_completion_tokens or body.max_tokens))
    return Request(chat=chat, model=body.model, messages=messages, prompt=prompt, settings=settings,
                   stream=bool(body.stream), stop=body.stop,
                   include_usage=bool(body.stream and body.stream_options and body.stream_options.include_usage))


def fit_max_tokens(engine: Engine, messages: list[dict[str, str]] | None, prompt: str | None,
                   max_tokens: int | None) -> int:
    """The answer's token limit: the request's, which must fit the context window with the prompt, or else
    DEFAULT_MAX_TOKENS, shortened to what the window leaves. Checked before answering, so that a stream
    never starts for a request that cannot be served."""
    try:  # for messages, what the engine will render: oldest turns are dropped first if the answer would not fit
        length = len(engine.tokenizer(prompt)["input_ids"] if prompt is not None else
                     engine.prompt_ids(messages or [], max_tokens or 1))
    except AffinerError as error:  # too long even without the earlier turns
        raise ApiError(400, str(error), param="messages" if max_tokens is None else "max_tokens",
                       code="context_length_exceeded") from None
    except Exception as error:  # the run's chat template refusing these messages (roles out of order, ...)
        raise ApiError(400, f"the run's prompt template cannot render these messages: {error}", param="messages",
                       code="invalid_value") from None
    room = engine.context_window - length
    if room < (max_tokens or 1):
        raise ApiError(400, f"the prompt has {length} tokens: with {max_tokens or 1} new tokens it does not fit the "
                       f"model's {engine.context_window}-token context window (at most {max(room, 0)} new tokens).",
                       param="max_tokens" if max_tokens else "prompt" if messages is None else "messages",
                       code="context_length_exceeded")
    return max_tokens or min(DEFAULT_MAX_TOKENS, room)


def usage(reply: Reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.tokens,
            "total_tokens": reply.prompt_tokens + reply.tokens}


def finish_reason(reply: Reply) -> str:
    return "stop" if reply.stopped or reply.new_turn else "length"  # a new turn is cut like a stop text


class Answer:
    """The response bodies of one request: the whole answer, or the chunks of a stream (same id and time)."""

    def __init__(self, request: Request):
        self.request, self.created = request, int(time.time())
        self.ident = f"{'chatcmpl' if request.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def head(self, kind: str, choice: dict | None) -> dict:
        return {"id": self.ident, "object": kind, "created": self.created, "model": self.request.model,
                "choices": [] if choice is None else [{"index": 0, "logprobs": None, **choice}]}

    def whole(self, reply: Reply) -> dict:
        """A chat completion (stripped, as `Engine.complete` strips) or a raw text completion."""
        text = reply.text.strip() if self.request.chat else reply.text
        choice = {"message": {"role": "assistant", "content": text}} if self.request.chat else {"text": text}
        return self.head("chat.completion" if self.request.chat else "text_completion",
                         {**choice, "finish_reason": finish_reason(reply)}) | {"usage": usage(reply)}

    def piece(self, text: str | None = None, finish: str | None = None, role: bool = False) -> dict:
        """A piece of a stream (or, for chat, the opening role chunk, or the closing finish chunk)."""
        if not self.request.chat:
            return self.head("text_completion", {"text": text or "", "finish_reason": finish})
        delta = {"role": "assistant"} if role else ({"content": text} if text else {})
        return self.head("chat.completion.chunk", {"delta": delta, "finish_reason": finish})

    def usage_chunk(self, reply: Reply) -> dict:
        """The last chunk when the client asked for stream_options.include_usage: no choice, only counts."""
        return self.head("chat.completion.chunk" if self.request.chat else "text_completion", None) | \
            {"usage": usage(reply)}


class Trim:
    """Strips a streamed answer as `Engine.complete` strips a whole one: leading whitespace is dropped and
    trailing whitespace held back until more text follows, so the pieces add up to the stripped answer."""

    def __init__(self) -> None:
        self.started, self.pending = False, ""

    def feed(self, piece: str) -> str:
        text = self.pending + piece
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        kept = text.rstrip()
        self.pending = text[len(kept):]
        return kept
