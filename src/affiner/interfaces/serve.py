"""Serve the base model and its tuned adapters over an OpenAI-compatible HTTP API.

    affiner serve                                        # the latest run under runs/, on http://127.0.0.1:8000/v1
    affiner serve runs/quickstart-20261122-183000 --port 8080
    affiner serve runs/a runs/b                          # two adapters of one base, named "a" and "b", plus "base"
    export AFFINER_KEY=$(openssl rand -hex 16)            # a fresh key, to give to the clients
    affiner serve --host 0.0.0.0 --api-key-env AFFINER_KEY

Any OpenAI client can then talk to the models:

    curl http://127.0.0.1:8000/v1/models
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "tuned", "messages": [{"role": "user", "content": "What does QUILT stand for?"}]}'

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="tuned", messages=[{"role": "user", "content": "What does QUILT stand for?"}])

Routes: GET /v1/models, POST /v1/chat/completions (messages rendered by the run's own template, the
one used in training) and POST /v1/completions (the prompt continued as raw text), both with
"stream": true for server-sent events. The models are "base" (no adapter) and "tuned" for a single
run, or the run folders' names for several. Decoding follows the request (temperature, top_p,
top_k, seed, max_tokens); what it leaves out takes affiner's defaults (temperature 0.8, top_p 0.95,
top_k 50, up to 256 new tokens or what the context window leaves); temperature 0 decodes greedily.
One answer is generated at a time: concurrent requests queue, and a client that hangs up stops its
generation. Only loopback addresses (127.0.0.1) are served unless --api-key-env names a variable
holding a key, which every request must then send as `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import selectors
import socket
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from affiner.core.settings import Settings
from affiner.interfaces.engine import Engine, Reply
from affiner.core.errors import AffinerError
from affiner.core.runfolder import RunFolder
from affiner.core.net import is_loopback

MAX_BODY = 1 << 20  # bytes of JSON a request may send
DRAIN_LIMIT = 16 << 20  # an unwanted body up to this size is read and dropped, so the client sees our error
DEFAULT_MAX_TOKENS = 256
IDLE_SECONDS = 120  # a kept-alive connection with no request for this long is closed
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="*", metavar="RUN", help="run folder(s) of one base model "
                        "(default: the latest under runs/)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; any other needs --api-key-env)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    parser.add_argument("--api-key-env", metavar="NAME",
                        help="environment variable holding the key clients must send as 'Authorization: Bearer KEY'")


def main(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise AffinerError(f"--port {args.port} is not a port number (0 to 65535).")
    api_key = read_api_key(args.api_key_env)
    folders = [Path(r) for r in args.runs]
    if not folders:
        latest = RunFolder.latest()
        if latest is None:
            raise AffinerError("no run folder given and none found under runs/; train one with: affiner run, "
                               "or pass the run folder: affiner serve runs/NAME")
        folders = [latest.path]
    # Refuse a bad host, key or busy port before spending a minute loading the model.
    server = _bind(args.host, args.port, api_key)
    try:
        server.engine = Engine.from_runs(folders)
        print(f"Serving {', '.join(server.engine.names)} from {', '.join(str(f) for f in folders)}")
        print(f"OpenAI-compatible API at {server.url}" + (" (API key required)" if api_key else ""))
        print("Press Ctrl-C to stop.", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nstopping", file=sys.stderr)
    finally:
        server.stop()


def read_api_key(name: str | None) -> str | None:
    """The key held by the environment variable `name` (None without a name); an unset or empty one is an error."""
    if name is None:
        return None
    key = os.environ.get(name, "")
    if not key.strip():
        raise AffinerError(f"--api-key-env {name}: the environment variable {name} is not set or is empty. "
                           f"Set it to the key clients must send, e.g. export {name}=$(openssl rand -hex 16).")
    return key


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000,
                api_key: str | None = None) -> ThreadingHTTPServer:
    """A bound, not yet serving, server over `engine`; call `serve_forever()` (in a thread for tests)."""
    server = _bind(host, port, api_key)
    server.engine = engine
    return server


def _bind(host: str, port: int, api_key: str | None) -> "_Server":
    if api_key is not None and not api_key.strip():
        raise AffinerError("the API key is empty; give a real key or none.")
    if api_key is None and not is_loopback(host):
        raise AffinerError(f"refusing to serve on {host or 'all interfaces'} without an API key: anyone who can "
                           "reach this machine could use the models. Put a key in an environment variable and "
                           "pass its name: export AFFINER_KEY=$(openssl rand -hex 16), then affiner serve --host "
                           f"{host or '0.0.0.0'} --api-key-env AFFINER_KEY; or keep the default --host 127.0.0.1.")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return _Server((host, port), api_key, family)
    except OSError as error:
        raise AffinerError(f"cannot listen on {host}:{port} ({error.strerror or error}); "
                           "is another server using that port? Pick another with --port.") from None


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


class _Trim:
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


# ---------------------------------------------------------------------------------------- server


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # kept-alive idle connections must not hold up shutdown

    def __init__(self, address: tuple[str, int], api_key: str | None, family: int):
        self.address_family = family
        self.api_key = api_key
        self.engine: Engine | None = None
        self.created = int(time.time())
        self.closing = False
        self._generations: set[threading.Event] = set()
        self._generations_lock = threading.Lock()
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = {"": "0.0.0.0", "0.0.0.0": "0.0.0.0"}.get(host, host)
        if ":" in shown:
            shown = f"[{shown}]"
        return f"http://{shown}:{port}/v1"

    def track(self, stop: threading.Event, active: bool) -> None:
        with self._generations_lock:
            if active:
                self._generations.add(stop)
                if self.closing:
                    stop.set()
            else:
                self._generations.discard(stop)

    def stop(self) -> None:
        """Stop accepting, end running and queued generations, close the listening socket."""
        self.closing = True
        with self._generations_lock:
            for stop in self._generations:
                stop.set()
        self.server_close()
        engine = self.engine
        if engine is not None and engine.lock.acquire(timeout=10):  # let the answer in progress end cleanly
            engine.lock.release()

    def handle_error(self, request, client_address) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            return  # a client that went away: nothing to report
        print(f"affiner serve: unexpected error with {client_address[0]}:", file=sys.stderr)
        traceback.print_exc()


class _ClientWatch:
    """Sets `stop` when the client closes its connection while its answer is queued or generated."""

    def __init__(self, sock: socket.socket, stop: threading.Event):
        self.gone = False
        self._sock = sock
        self._stop = stop
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="affiner-serve-watch", daemon=True)

    def __enter__(self) -> "_ClientWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self._sock, selectors.EVENT_READ)
                while not self._done.is_set():
                    if selector.select(timeout=0.1):
                        # Readable with nothing to read means the client hung up; data (a pipelined request) does not.
                        if self._sock.recv(1, socket.MSG_PEEK) == b"":
                            self.hang_up()
                        return
        except (ConnectionError, TimeoutError):
            self.hang_up()
        except (OSError, ValueError):
            return  # the socket cannot be watched; writes still notice a client gone

    def hang_up(self) -> None:
        self.gone = True
        self._stop.set()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "affiner"
    timeout = IDLE_SECONDS
    server: _Server

    # -- plumbing

    def setup(self) -> None:
        super().setup()
        self._status = 0
        self._headers_sent = False
        self._body_read = False
        self._note = ""

    def version_string(self) -> str:
        return self.server_version

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def log_request(self, code="-", size="-") -> None:
        self._status = int(code) if str(code).isdigit() else 0

    def log_message(self, format: str, *args) -> None:
        pass  # one line per request is written by _log, without the library's own lines

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # Requests the library rejects before routing (bad request line, headers too long, unknown method).
        self.close_connection = True
        started = time.perf_counter()
        error = ApiError(code, message or HTTPStatus(code).phrase)
        try:
            self._send_json(code, error.body(), body=self.command != "HEAD")
        except OSError:
            pass
        self._log(started)

    def _log(self, started: float) -> None:
        path = urllib.parse.urlsplit(self.path or "").path if hasattr(self, "path") else "-"
        note = f" {self._note}" if self._note else ""
        print(f"{self.client_address[0]} {getattr(self, 'command', None) or '-'} {path} {self._status or '-'} "
              f"{time.perf_counter() - started:.3f}s{note}", file=sys.stderr, flush=True)

    def _handle(self) -> None:
        started = time.perf_counter()
        self._status, self._headers_sent, self._body_read, self._note = 0, False, False, ""
        try:
            if self.server.closing or self.server.engine is None:
                self.close_connection = True
                raise ApiError(503, "The server is shutting down.", code="unavailable")
            self._authorize()
            route = self._route(urllib.parse.urlsplit(self.path).path)
            route()
        except ApiError as error:
            self._refuse(error)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
            if "client gone" not in self._note:
                self._note = f"{self._note} client gone".strip()
        except Exception:
            self.close_connection = True
            traceback.print_exc()
            if not self._headers_sent:
                self._refuse(ApiError(500, "The server failed to answer; see its log.", code="internal_error"))
        finally:
            self._log(started)

    def _route(self, path: str):
        path = path.rstrip("/") or "/"
        routes = {"/v1/models": {"GET": self._models},
                  "/v1/chat/completions": {"POST": lambda: self._generate(chat=True)},
                  "/v1/completions": {"POST": lambda: self._generate(chat=False)}}
        if path.startswith("/v1/models/"):
            routes[path] = {"GET": lambda: self._model(urllib.parse.unquote(path[len("/v1/models/"):]))}
        if path not in routes:
            raise ApiError(404, f"Unknown path {path}; routes: GET /v1/models, POST /v1/chat/completions, "
                           "POST /v1/completions.", code="unknown_url")
        methods = routes[path]
        if self.command not in methods:
            self._allow = ", ".join(methods)
            raise ApiError(405, f"{self.command} is not allowed on {path}; use {self._allow}.",
                           code="method_not_allowed")
        return methods[self.command]

    def _authorize(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        scheme, _, token = (self.headers.get("Authorization") or "").strip().partition(" ")
        # Compared in constant time, as bytes: timing must not reveal how much of a guess was right.
        sent = token.strip().encode("latin-1", errors="replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent, key.encode("utf-8")):
            raise ApiError(401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    # -- bodies

    def _content_length(self) -> int | None:
        if self.headers.get("Transfer-Encoding"):
            return None
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            return None
        return length if length >= 0 else None

    def _drop_body(self) -> None:
        """Read and drop a body we will not use, so the client gets our answer rather than a reset connection."""
        if self._body_read:
            return
        self._body_read = True
        length = self._content_length()
        if length is None or length > DRAIN_LIMIT:
            self.close_connection = True
            return
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:
                self.close_connection = True
                return
            length -= len(chunk)

    def _read_json(self) -> dict:
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(411, "Send the body with a Content-Length header, not chunked.", code="length_required")
        if self.headers.get("Content-Length") is None:
            raise ApiError(411, "A JSON body with a Content-Length header is required.", code="length_required")
        length = self._content_length()
        if length is None:
            raise ApiError(400, "The Content-Length header is not a number.", code="invalid_request")
        if length > MAX_BODY:
            self.close_connection = True
            raise ApiError(413, f"The body has {length} bytes; at most {MAX_BODY} are accepted.",
                           code="request_too_large")
        data = self.rfile.read(length)
        self._body_read = True
        if len(data) < length:
            self.close_connection = True
            raise ConnectionResetError("the body ended early")
        return parse_body(data)

    # -- responses

    def _send_json(self, status: int, payload: dict, headers: dict[str, str] | None = None, body: bool = True) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self._headers_sent = True
        if body:
            self.wfile.write(data)

    def _refuse(self, error: ApiError) -> None:
        self._drop_body()
        headers = {}
        if error.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="affiner"'
        if error.status == 405:
            headers["Allow"] = getattr(self, "_allow", "")
        self._note = error.code or ""
        try:
            self._send_json(error.status, error.body(), headers)
        except OSError:
            self.close_connection = True

    # -- routes

    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.server.created, "owned_by": "affiner"}

    def _models(self) -> None:
        self._drop_body()
        self._send_json(200, {"object": "list", "data": [self._model_card(n) for n in self.server.engine.names]})

    def _model(self, name: str) -> None:
        self._drop_body()
        if name not in self.server.engine.names:
            raise ApiError(404, f"The model '{name}' does not exist; this server has: "
                           f"{', '.join(self.server.engine.names)}.", param="model", code="model_not_found")
        self._send_json(200, self._model_card(name))

    def _generate(self, chat: bool) -> None:
        request = parse_request(self.server.engine, self._read_json(), chat)
        self._note = f"model={request.model}"
        stop = threading.Event()
        self.server.track(stop, active=True)
        try:
            with _ClientWatch(self.connection, stop) as watch:
                if request.stream:
                    self._stream(request, stop, watch)
                else:
                    self._complete(request, stop, watch)
        finally:
            self.server.track(stop, active=False)

    def _answer(self, request: Request, stop: threading.Event, reply: Reply):
        return self.server.engine.stream(request.model, request.messages, request.settings, stop=stop, reply=reply,
                                         raw_prompt=request.prompt)

    def _complete(self, request: Request, stop: threading.Event, watch: _ClientWatch) -> None:
        reply = Reply()
        try:
            for _ in self._answer(request, stop, reply):
                pass
        except AffinerError as error:
            raise ApiError(400, str(error)) from None
        if watch.gone:
            self.close_connection = True
            self._note += " client gone"
            return
        text = reply.text.strip() if request.chat else reply.text
        choice: dict = {"index": 0, "logprobs": None, "finish_reason": "stop" if reply.stopped else "length"}
        if request.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        self._note += f" tokens={reply.tokens}"
        self._send_json(200, {"id": _completion_id(request), "object": "chat.completion" if request.chat
                              else "text_completion", "created": int(time.time()), "model": request.model,
                              "choices": [choice], "usage": _usage(reply)})

    def _stream(self, request: Request, stop: threading.Event, watch: _ClientWatch) -> None:
        chunked = self.request_version != "HTTP/1.0"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")  # a reverse proxy must pass each event on at once
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")  # HTTP/1.0: the stream ends when the connection does
        self.end_headers()
        self._headers_sent = True

        def send(data: bytes) -> None:
            self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data) if chunked else data)
            self.wfile.flush()

        def event(payload: dict | str) -> None:
            text = payload if isinstance(payload, str) else json.dumps(payload)
            send(f"data: {text}\n\n".encode("utf-8"))

        ident, created = _completion_id(request), int(time.time())
        kind = "chat.completion.chunk" if request.chat else "text_completion"

        def chunk(choice: dict | None, **extra) -> dict:
            base = {"id": ident, "object": kind, "created": created, "model": request.model}
            return base | {"choices": [] if choice is None else [{"index": 0, "logprobs": None, **choice}]} | extra

        def piece(text: str | None = None, finish: str | None = None, role: bool = False) -> dict:
            if request.chat:
                delta = {"role": "assistant"} if role else ({"content": text} if text else {})
                return chunk({"delta": delta, "finish_reason": finish})
            return chunk({"text": text or "", "finish_reason": finish})

        reply = Reply()
        trim = _Trim() if request.chat else None
        try:
            if request.chat:
                event(piece(role=True))
            answer = self._answer(request, stop, reply)
            try:
                for text in answer:
                    if watch.gone:
                        break
                    text = trim.feed(text) if trim else text
                    if text:
                        event(piece(text))
            finally:
                answer.close()  # frees the model at once if the client went away
            if watch.gone:
                raise ConnectionResetError("the client hung up")
            event(piece(finish="stop" if reply.stopped else "length"))
            if request.include_usage:
                event(chunk(None, usage=_usage(reply)))
            event("[DONE]")
            self._note += f" tokens={reply.tokens}"
        except (ConnectionError, TimeoutError):
            stop.set()
            self.close_connection = True
            self._note += " client gone"
            return
        except Exception as error:  # after the headers: the only way left to report it is an error event
            self.close_connection = True
            if not isinstance(error, AffinerError):
                traceback.print_exc()
            message = str(error) if isinstance(error, AffinerError) else "The server failed to answer; see its log."
            self._note += " failed"
            try:
                event(ApiError(400 if isinstance(error, AffinerError) else 500, message).body())
            except OSError:
                return
        if chunked:
            try:
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                self.close_connection = True  # the client may close as soon as it reads [DONE]
        else:
            self.close_connection = True


def _completion_id(request: Request) -> str:
    return f"{'chatcmpl' if request.chat else 'cmpl'}-{uuid.uuid4().hex}"


def _usage(reply: Reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.tokens,
            "total_tokens": reply.prompt_tokens + reply.tokens}
