"""The OpenAI API's side of `affiner serve`, without HTTP: a request body checked (or an `ApiError` naming the
field at fault, `messages[0].content`), and the response bodies, whole or streamed, shaped as OpenAI's chat
completions and (legacy) completions so that any OpenAI client works unchanged. pydantic checks the fields
strictly (`true` is no number); what this server cannot honour (tools, logprobs, n > 1) is refused, not ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import from_json
from starlette.responses import JSONResponse

from affiner.core.errors import AffinerError
from affiner.core.settings import RULES, Settings
from affiner.interfaces.engine import Engine, Reply

DEFAULT_MAX_TOKENS = 256
MAX_STOPS = 4  # as OpenAI's API
# Refused unless sent empty: answering without them would pass another decoding off as the one asked for.
UNSUPPORTED = ("tools", "functions", "logit_bias", "suffix", "logprobs", "top_logprobs", "echo", "frequency_penalty",
               "presence_penalty")
EMPTY = (None, False, 0, "", [], {})  # an unsupported field sent with one of these asks for nothing


class ApiError(Exception):
    """A request the server refuses, answered with an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        # OpenAI's own: "invalid_request_error" for every refusal, a wrong key (code invalid_api_key) and an unknown
        # model (model_not_found) included; clients that branch on `type` read it as they read OpenAI's.
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind,
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, self.headers)


def _text(value: object) -> object:
    """A message's text: a string, or an array of {"type": "text", "text": ...} parts, joined."""
    if isinstance(value, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                       and isinstance(part.get("text"), str) for part in value):
        return "\n".join(part["text"] for part in value)
    return value


def _rule(key: str, value):
    """A decoding setting as every door accepts it (core.settings.RULES); None: not sent."""
    valid, expected = RULES[key]
    if value is not None and not valid(value):
        raise ValueError(f"must be {expected}")
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


def _turns(messages: list[Message]) -> list[dict[str, str]]:
    """The messages as the engine takes them (a developer message is a system one), in an order it can render."""
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in messages]
    if turns[-1]["role"] != "user" or any(turn["role"] == "system" for turn in turns[1:]):
        raise ValueError("a system message may only come first, and the last message must be the user's")
    return turns


class Options(_Fields):
    include_usage: bool = False


class Format(_Fields):
    type: Literal["text"]


class Body(_Fields):
    """What both routes take. `chat`, `messages` and `prompt` are read alike: each route's model has one text."""

    model: str
    temperature: Annotated[float | None, AfterValidator(lambda v: _rule("temperature", v))] = None
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    # vLLM's extension of the OpenAI API, same meaning.
    repetition_penalty: Annotated[float | None, AfterValidator(lambda v: _rule("repetition_penalty", v))] = None
    seed: Annotated[int | None, AfterValidator(lambda v: _rule("seed", v))] = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: Literal[1] | None = None
    best_of: Literal[1] | None = None
    response_format: Format | None = None
    stream: bool | None = None
    stream_options: Options | None = None
    stop: Annotated[tuple[str, ...], BeforeValidator(_stops)] = ()  # texts that end the answer, cut from it

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatBody(Body):  # /v1/chat/completions: messages rendered by the run's template
    chat: ClassVar[bool] = True
    prompt: ClassVar[None] = None
    messages: Annotated[list[Message], Field(min_length=1), AfterValidator(_turns)]


class CompletionBody(Body):  # /v1/completions: a raw prompt continued (a list of one prompt is a batch of one)
    chat: ClassVar[bool] = False
    messages: ClassVar[None] = None
    prompt: Annotated[str, BeforeValidator(lambda p: p[0] if isinstance(p, list) and len(p) == 1 else p),
                      Field(min_length=1)]


def require_model(engine: Engine, name: str) -> None:
    if name not in engine.names:
        raise ApiError(404, f"The model '{name}' does not exist; this server has: {', '.join(engine.names)}.",
                       param="model", code="model_not_found")


def parse_request(engine: Engine, data: bytes, chat: bool) -> tuple[Body, Settings]:
    """The body checked against the engine's models and context window, and the decoding it asks for; an
    ApiError (400, 404) names the field at fault."""
    try:
        raw = from_json(data, allow_inf_nan=False)  # NaN and Infinity are no JSON, though Python's json reads them
    except ValueError as error:
        raise ApiError(400, f"The body is not valid JSON ({error}).", code="invalid_json") from None
    if not isinstance(raw, dict):
        raise ApiError(400, f"The body must be a JSON object, not {type(raw).__name__}.", code="invalid_json")
    refused = [name for name in UNSUPPORTED if raw.get(name) not in EMPTY]
    if refused:
        instead = " (repetition_penalty is, as in vLLM)" if refused[0].endswith("_penalty") else ""
        raise ApiError(400, f"'{refused[0]}' is not supported by affiner serve{instead}.", param=refused[0],
                       code="unsupported_parameter")
    try:
        body = (ChatBody if chat else CompletionBody).model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
        raise ApiError(400, f"'{param}': {first['msg'].removeprefix('Value error, ')}.", param=param or None,
                       code="missing_required_parameter" if first["type"] == "missing" else "invalid_value") from None
    require_model(engine, body.model)
    if None not in (body.max_tokens, body.max_completion_tokens) and body.max_tokens != body.max_completion_tokens:
        raise ApiError(400, "'max_tokens' and 'max_completion_tokens' disagree; send one of them.",
                       param="max_completion_tokens", code="invalid_value")
    given = {k: v for k in ("temperature", "top_p", "top_k", "repetition_penalty") if (v := getattr(body, k)) is not None}
    given.setdefault("repetition_penalty", engine.repetition_penalty(body.model))  # as the run's evaluation decoded
    limit = fit_max_tokens(engine, body.messages, body.prompt, body.max_completion_tokens or body.max_tokens)
    return body, Settings(**given, seed=body.seed, max_new_tokens=limit)


def fit_max_tokens(engine: Engine, messages: list[dict[str, str]] | None, prompt: str | None,
                   max_tokens: int | None) -> int:
    """The answer's token limit: the request's, which must fit the context window with the prompt, or else
    DEFAULT_MAX_TOKENS, shortened to what the window leaves. Checked before answering, so that a stream
    never starts for a request that cannot be served."""
    try:  # for messages, what the engine will render (oldest turns dropped first)
        length = len(engine.prompt_ids(messages, max_tokens, prompt))
    except AffinerError as error:  # too long (for messages: even without the earlier turns)
        raise ApiError(400, str(error), param="max_tokens" if max_tokens else "prompt" if messages is None else
                       "messages", code="context_length_exceeded") from None
    except Exception as error:  # the run's chat template refusing these messages (roles out of order, ...)
        raise ApiError(400, f"the run's prompt template cannot render these messages: {error}", param="messages",
                       code="invalid_value") from None
    room = engine.context_window - length
    return max_tokens or min(DEFAULT_MAX_TOKENS, room)


def finish_reason(reply: Reply) -> str:
    return "stop" if reply.stopped or reply.new_turn else "length"  # a new turn is cut like a stop text


class Answer:
    """The response bodies of one request: the whole answer, or the chunks of a stream (same id and time)."""

    def __init__(self, request: Body):
        self.request, self.created = request, int(time.time())
        self.ident = f"{'chatcmpl' if request.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.kind = "chat.completion.chunk" if request.chat else "text_completion"  # of stream chunks

    def head(self, kind: str, choice: dict | None, reply: Reply | None = None) -> dict:
        """A body of `kind` with this choice (none in a stream's usage chunk), and the usage once it is known."""
        usage = {} if reply is None else {"usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens":
                                                    reply.tokens, "total_tokens": reply.prompt_tokens + reply.tokens}}
        return {"id": self.ident, "object": kind, "created": self.created, "model": self.request.model,
                "choices": [] if choice is None else [{"index": 0, "logprobs": None, **choice}]} | usage

    def whole(self, reply: Reply) -> dict:
        """A chat completion (stripped, as `Engine.complete` strips) or a raw text completion."""
        if not self.request.chat:
            return self.head("text_completion", {"text": reply.text, "finish_reason": finish_reason(reply)}, reply)
        message = {"role": "assistant", "content": reply.text.strip()}
        return self.head("chat.completion", {"message": message, "finish_reason": finish_reason(reply)}, reply)

    def piece(self, text: str | None = None, finish: str | None = None, role: bool = False) -> dict:
        """A piece of a stream (or, for chat, the opening role chunk, or the closing finish chunk)."""
        if not self.request.chat:
            return self.head(self.kind, {"text": text or "", "finish_reason": finish})
        delta = {"role": "assistant"} if role else ({"content": text} if text else {})
        return self.head(self.kind, {"delta": delta, "finish_reason": finish})
