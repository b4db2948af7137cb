"""One HTTP request to `affiner serve`, from the socket to the answer: routing, the API key, reading the
body, and writing the JSON answer or the server-sent events of a streamed one.

What the request and the answer mean (fields, defaults, errors, chunks) is `openai_api`'s; this module
only speaks HTTP/1.1 (keep-alive, chunked streams, HTTP/1.0 clients, clients that hang up).
"""

from __future__ import annotations

import hmac
import json
import selectors
import socket
import sys
import threading
import time
import traceback
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Callable, Generator, Protocol

from affiner.core.errors import AffinerError
from affiner.interfaces.engine import Engine, Reply
from affiner.interfaces.openai_api import ApiError, Request, StreamChunks, Trim, completion_body, finish_reason, \
    parse_body, parse_request, require_json

MAX_BODY = 1 << 20  # bytes of JSON a request may send
DRAIN_LIMIT = 16 << 20  # an unwanted body up to this size is read and dropped, so the client sees our error
IDLE_SECONDS = 120  # a kept-alive connection with no request for this long is closed


class ServerState(Protocol):
    """What a handler needs of its server (`serve.Server`): the engine, the key, and the generations to track."""

    engine: Engine | None
    api_key: str | None
    created: int
    closing: bool

    def check_host(self, headers: list[str]) -> None: ...

    def track(self, stop: threading.Event, active: bool) -> None: ...


class ClientWatch:
    """Sets `stop` when the client closes its connection while its answer is queued or generated."""

    def __init__(self, sock: socket.socket, stop: threading.Event):
        self.gone = False
        self._sock = sock
        self._stop = stop
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="affiner-serve-watch", daemon=True)

    def __enter__(self) -> "ClientWatch":
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


class Handler(BaseHTTPRequestHandler):
    """One connection: its requests, one after another (keep-alive), each logged in one line."""

    protocol_version = "HTTP/1.1"
    server_version = "affiner"
    timeout = IDLE_SECONDS
    server: ServerState

    # -- plumbing

    def setup(self) -> None:
        super().setup()
        self._status = 0
        self._headers_sent = False
        self._body_read = False
        self._note = ""
        self._chunked = False  # whether the events of a streamed answer are sent as HTTP chunks

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
            self.server.check_host(self.headers.get_all("Host") or [])  # first: a foreign page learns nothing
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

    def _route(self, path: str) -> Callable[[], None]:
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
        require_json(self.headers.get("Content-Type"))
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
            with ClientWatch(self.connection, stop) as watch:
                if request.stream:
                    self._stream(request, stop, watch)
                else:
                    self._complete(request, stop, watch)
        finally:
            self.server.track(stop, active=False)

    def _answer(self, request: Request, stop: threading.Event, reply: Reply) -> Generator[str, None, None]:
        return self.server.engine.stream(request.model, request.messages, request.settings, stop=stop, reply=reply,
                                         raw_prompt=request.prompt)

    def _complete(self, request: Request, stop: threading.Event, watch: ClientWatch) -> None:
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
        self._note += f" tokens={reply.tokens}"
        self._send_json(200, completion_body(request, reply))

    def _stream(self, request: Request, stop: threading.Event, watch: ClientWatch) -> None:
        self._start_events()
        reply = Reply()
        try:
            self._stream_answer(request, stop, watch, reply)
            self._note += f" tokens={reply.tokens}"
        except (ConnectionError, TimeoutError):
            stop.set()
            self.close_connection = True
            self._note += " client gone"
            return
        except Exception as error:  # after the headers: the only way left to report it is an error event
            if not self._report_in_stream(error):
                return
        self._end_events()

    def _stream_answer(self, request: Request, stop: threading.Event, watch: ClientWatch, reply: Reply) -> None:
        """The answer as events: (for chat) the role, each piece, the finish reason, the usage, [DONE]."""
        chunks = StreamChunks(request)
        trim = Trim() if request.chat else None
        if request.chat:
            self._event(chunks.piece(role=True))
        answer = self._answer(request, stop, reply)
        try:
            for text in answer:
                if watch.gone:
                    break
                text = trim.feed(text) if trim else text
                if text:
                    self._event(chunks.piece(text))
        finally:
            answer.close()  # frees the model at once if the client went away
        if watch.gone:
            raise ConnectionResetError("the client hung up")
        self._event(chunks.piece(finish=finish_reason(reply)))
        if request.include_usage:
            self._event(chunks.usage_chunk(reply))
        self._event("[DONE]")

    def _report_in_stream(self, error: Exception) -> bool:
        """Send a failure as an error event; False when even that could not be written."""
        self.close_connection = True
        if not isinstance(error, AffinerError):
            traceback.print_exc()
        message = str(error) if isinstance(error, AffinerError) else "The server failed to answer; see its log."
        self._note += " failed"
        try:
            self._event(ApiError(400 if isinstance(error, AffinerError) else 500, message).body())
        except OSError:
            return False
        return True

    # -- server-sent events

    def _start_events(self) -> None:
        self._chunked = self.request_version != "HTTP/1.0"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")  # a reverse proxy must pass each event on at once
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")  # HTTP/1.0: the stream ends when the connection does
        self.end_headers()
        self._headers_sent = True

    def _event(self, payload: dict | str) -> None:
        text = payload if isinstance(payload, str) else json.dumps(payload)
        data = f"data: {text}\n\n".encode("utf-8")
        self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data) if self._chunked else data)
        self.wfile.flush()

    def _end_events(self) -> None:
        if not self._chunked:
            self.close_connection = True
            return
        try:
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True  # the client may close as soon as it reads [DONE]
