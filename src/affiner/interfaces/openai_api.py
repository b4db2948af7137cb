"""The OpenAI API's side of `affiner serve`, without HTTP: request bodies checked field by field into a
`Request` (or an `ApiError` naming the field at fault), and the response bodies, whole or as stream chunks.

The shapes follow OpenAI's chat completions and (legacy) completions APIs, so that any OpenAI client
works unchanged; what this server cannot honour (stop sequences, tools, logprobs, n > 1) is refused
with a 400 rather than silently ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from affiner.core.errors import AffinerError
from affiner.core.settings import Settings
from affiner.interfaces.engine import Engine, Reply

DEFAULT_MAX_TOKENS = 256
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


# ---------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """A request the server refuses, answered with an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(self.status, "invalid_request_error")
        if self.status >= 500:
            kind = "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------- requests


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


_TYPE_NAMES = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "an array",
               dict: "an object"}


def _json_type(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _get(body: dict, name: str, kind: type, required: bool = False):
    """body[name] if it has the JSON type `kind`; None when absent or null (unless required)."""
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(400, f"'{name}' is required.", param=name, code="missing_required_parameter")
        return None
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ApiError(400, f"'{name}' must be {_TYPE_NAMES[kind]}, not {_json_type(value)}.", param=name,
                       code="invalid_type")
    return value


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ApiError(400, f"'{name}' is {value!r}; it must be {allowed}.", param=name, code="invalid_value")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def require_json(content_type: str | None) -> None:
    """Refuse (415) a body not declared as JSON: a cross-site page can POST text/plain or a form without the
    browser asking this server first, but not application/json, so only JSON bodies are read."""
    media_type = (content_type or "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        sent = f"not {content_type.strip()[:100]!r}" if content_type else "none was given"
        raise ApiError(415, f"The body must be sent with 'Content-Type: application/json' ({sent}).",
                       code="unsupported_media_type")


def parse_body(data: bytes) -> dict:
    try:
        body = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise ApiError(400, f"The body is not valid JSON ({error}).", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"The body must be a JSON object, not {_json_type(body)}.", code="invalid_json")
    return body


def _content(value: object, index: int) -> str:
    """A message's text: a string, or an array of {"type": "text", "text": ...} parts."""
    param = f"messages[{index}].content"
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ApiError(400, f"'{param}' may only hold text parts ({{\"type\": \"text\", \"text\": ...}}).",
                               param=param, code="invalid_value")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ApiError(400, f"'{param}' must be a string or an array of text parts, not {_json_type(value)}.",
                   param=param, code="invalid_type")


def _messages(body: dict) -> list[dict[str, str]]:
    raw = _get(body, "messages", list, required=True)
    if not raw:
        raise ApiError(400, "'messages' is empty; send at least one user message.", param="messages",
                       code="invalid_value")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise ApiError(400, f"'messages[{i}]' must be an object, not {_json_type(message)}.",
                           param=f"messages[{i}]", code="invalid_type")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise ApiError(400, f"'messages[{i}].role' is {role!r}; it must be one of system, user, assistant.",
                           param=f"messages[{i}].role", code="invalid_value")
        if ROLES[role] == "system" and i > 0:
            raise ApiError(400, "a system message may only come first.", param=f"messages[{i}].role",
                           code="invalid_value")
        messages.append({"role": ROLES[role], "content": _content(message.get("content"), i)})
    if messages[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's.", param="messages", code="invalid_value")
    return messages


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one
    if prompt is None:
        raise ApiError(400, "'prompt' is required.", param="prompt", code="missing_required_parameter")
    if not isinstance(prompt, str):
        raise ApiError(400, f"'prompt' must be a string (one prompt per request), not {_json_type(prompt)}.",
                       param="prompt", code="invalid_type")
    return prompt


def _refuse_unsupported(body: dict) -> None:
    """Options that would change the answer's meaning, which this server cannot honour, are refused, not ignored."""
    for name in ("stop", "tools", "functions", "logit_bias", "suffix"):
        if body.get(name):
            raise ApiError(400, f"'{name}' is not supported by affiner serve.", param=name, code="unsupported_parameter")
    for name in ("logprobs", "top_logprobs", "echo"):
        if body.get(name) not in (None, False, 0):
            raise ApiError(400, f"'{name}' is not supported by affiner serve.", param=name, code="unsupported_parameter")
    best_of = body.get("best_of")
    if best_of not in (None, 1):
        raise ApiError(400, "'best_of' must be 1: one answer is generated per request.", param="best_of",
                       code="unsupported_parameter")
    response_format = body.get("response_format")
    if response_format is not None and not (isinstance(response_format, dict) and response_format.get("type") == "text"):
        raise ApiError(400, "'response_format' other than text is not supported by affiner serve.",
                       param="response_format", code="unsupported_parameter")


def parse_request(engine: Engine, body: dict, chat: bool) -> Request:
    """Validate a request body against the engine's models; raises ApiError (400/404) with the field at fault."""
    model = _get(body, "model", str, required=True)
    messages = _messages(body) if chat else None
    prompt = None if chat else _prompt(body)
    if model not in engine.names:
        raise ApiError(404, f"The model '{model}' does not exist; this server has: {', '.join(engine.names)}.",
                       param="model", code="model_not_found")
    defaults = Settings()
    temperature = _get(body, "temperature", float)
    _check(temperature is None or 0 <= temperature <= 2, "temperature", temperature, "between 0 and 2")
    top_p = _get(body, "top_p", float)
    _check(top_p is None or 0 < top_p <= 1, "top_p", top_p, "above 0 and at most 1")
    top_k = _get(body, "top_k", int)
    _check(top_k is None or top_k >= 0, "top_k", top_k, "0 (no limit) or more")
    seed = _get(body, "seed", int)
    _check(seed is None or 0 <= seed < 2**63, "seed", seed, "between 0 and 2**63 - 1")
    max_tokens = _get(body, "max_tokens", int)
    max_completion_tokens = _get(body, "max_completion_tokens", int)
    if max_tokens is not None and max_completion_tokens is not None and max_tokens != max_completion_tokens:
        raise ApiError(400, "'max_tokens' and 'max_completion_tokens' disagree; send one of them.",
                       param="max_completion_tokens", code="invalid_value")
    if max_completion_tokens is not None:
        max_tokens = max_completion_tokens
    _check(max_tokens is None or max_tokens >= 1, "max_tokens", max_tokens, "1 or more")
    n = _get(body, "n", int)
    _check(n is None or n == 1, "n", n, "1 (one answer per request)")
    stream = _get(body, "stream", bool) or False
    options = _get(body, "stream_options", dict) or {}
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError(400, "'stream_options.include_usage' must be a boolean.", param="stream_options",
                       code="invalid_type")
    _refuse_unsupported(body)
    settings = Settings(temperature=defaults.temperature if temperature is None else float(temperature),
                        top_p=defaults.top_p if top_p is None else float(top_p),
                        top_k=defaults.top_k if top_k is None else top_k,
                        max_new_tokens=fit_max_tokens(engine, messages, prompt, max_tokens), seed=seed)
    return Request(chat=chat, model=model, messages=messages, prompt=prompt, settings=settings, stream=stream,
                   include_usage=stream and include_usage)


def fit_max_tokens(engine: Engine, messages: list[dict[str, str]] | None, prompt: str | None,
                   max_tokens: int | None) -> int:
    """The answer's token limit: the request's, which must fit the context window with the prompt, or else
    DEFAULT_MAX_TOKENS, shortened to what the window leaves. Checked before answering, so that a stream
    never starts for a request that cannot be served."""
    try:
        if prompt is not None:
            length = len(engine.tokenizer(prompt)["input_ids"])
            if length == 0:
                raise ApiError(400, "'prompt' is empty.", param="prompt", code="invalid_value")
        else:
            # What the engine will render: oldest turns are dropped first if the answer would not fit.
            length = len(engine.prompt_ids(messages or [], max_tokens or 1))
    except AffinerError as error:  # too long even without the earlier turns
        raise ApiError(400, str(error), param="messages" if max_tokens is None else "max_tokens",
                       code="context_length_exceeded") from None
    except ApiError:
        raise
    except Exception as error:  # the run's chat template refusing these messages (roles out of order, ...)
        raise ApiError(400, f"the run's prompt template cannot render these messages: {error}", param="messages",
                       code="invalid_value") from None
    room = engine.context_window - length
    if max_tokens is None:
        if room < 1:
            raise ApiError(400, f"the prompt has {length} tokens, which fill the model's {engine.context_window}-token "
                           "context window.", param="messages" if prompt is None else "prompt",
                           code="context_length_exceeded")
        return min(DEFAULT_MAX_TOKENS, room)
    if max_tokens > room:
        raise ApiError(400, f"the prompt has {length} tokens: with max_tokens={max_tokens} it does not fit the "
                       f"model's {engine.context_window}-token context window (at most {max(room, 0)} new tokens).",
                       param="max_tokens", code="context_length_exceeded")
    return max_tokens


# ---------------------------------------------------------------------------------------- responses


def completion_id(request: Request) -> str:
    return f"{'chatcmpl' if request.chat else 'cmpl'}-{uuid.uuid4().hex}"


def usage(reply: Reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.tokens,
            "total_tokens": reply.prompt_tokens + reply.tokens}


def finish_reason(reply: Reply) -> str:
    return "stop" if reply.stopped or reply.new_turn else "length"  # a new turn is cut like a stop sequence


def completion_body(request: Request, reply: Reply) -> dict:
    """The whole answer: a chat completion (stripped, as `Engine.complete` strips) or a raw text completion."""
    text = reply.text.strip() if request.chat else reply.text
    choice: dict = {"index": 0, "logprobs": None, "finish_reason": finish_reason(reply)}
    if request.chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": completion_id(request), "object": "chat.completion" if request.chat else "text_completion",
            "created": int(time.time()), "model": request.model, "choices": [choice], "usage": usage(reply)}


class StreamChunks:
    """The chunks of one streamed answer, all with the same id and creation time."""

    def __init__(self, request: Request):
        self.request = request
        self.ident, self.created = completion_id(request), int(time.time())
        self.kind = "chat.completion.chunk" if request.chat else "text_completion"

    def chunk(self, choice: dict | None, **extra) -> dict:
        base = {"id": self.ident, "object": self.kind, "created": self.created, "model": self.request.model}
        return base | {"choices": [] if choice is None else [{"index": 0, "logprobs": None, **choice}]} | extra

    def piece(self, text: str | None = None, finish: str | None = None, role: bool = False) -> dict:
        """A piece of the answer (or, for chat, the opening role chunk, or the closing finish chunk)."""
        if self.request.chat:
            delta = {"role": "assistant"} if role else ({"content": text} if text else {})
            return self.chunk({"delta": delta, "finish_reason": finish})
        return self.chunk({"text": text or "", "finish_reason": finish})

    def usage_chunk(self, reply: Reply) -> dict:
        """The last chunk when the client asked for stream_options.include_usage: no choice, only counts."""
        return self.chunk(None, usage=usage(reply))


class Trim:
    """Strips a streamed answer as `Engine.complete` strips a whole one: leading whitespace is dropped and
    trailing whitespace held back until more text follows, so the pieces add up to the stripped answer."""

    def __init__(self) -> None:
        self.started = False
        self.pending = ""

    def feed(self, piece: str) -> str:
        text = self.pending + piece
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        kept = text.rstrip()
        self.pending = text[len(kept):]
        return kept
