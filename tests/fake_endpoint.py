"""A scripted OpenAI-compatible chat server on 127.0.0.1, shared by the judge and generate tests.

    from fake_endpoint import FakeServer, Reply, running_server

    @pytest.fixture
    def server():
        with running_server() as srv:
            yield srv

`server.script` holds replies given first, in order; `server.behaviour(body)` answers the rest.
Every request is recorded as (headers, body) in `server.requests`.

`server.structured_output` says what a request with a `response_format` gets: "ignore" (the default) answers as
if it had none, like a server without the feature that drops unknown fields; "refuse" answers REFUSAL, a 400
naming the field, like llama.cpp's server before it had the feature, without using the script; "honour" answers
JSON as the schema asks: a reply in the `<result>...</result><explain>...</explain>` form whose result is one of
the schema's values becomes {"result": ..., "explain": ...}, anything else is sent as is.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal


@dataclass
class Reply:
    content: str | None = "<result>1</result><explain>Matches the reference.</explain>"
    status: int = 200
    body: bytes | None = None  # sent as is instead of a chat completion
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)  # sent besides Content-Type and Content-Length


REFUSAL = Reply(status=400, body=json.dumps({"error": {
    "message": 'response_format type must be one of "text" or "json_object", but got: json_schema',
    "type": "invalid_request_error", "param": "response_format", "code": None}}).encode())


def as_structured(reply: Reply, response_format: dict) -> Reply:
    """The reply as a server honouring `response_format` would give it: JSON by its schema."""
    result = re.search(r"<result>\s*(.*?)\s*</result>", reply.content or "", re.DOTALL)
    explain = re.search(r"<explain>(.*?)</explain>", reply.content or "", re.DOTALL)
    allowed = response_format["json_schema"]["schema"]["properties"]["result"]["enum"]
    value = next((v for v in allowed if result and str(v) == result.group(1)), None)
    if value is None:
        return reply
    return replace(reply, content=json.dumps({"result": value, "explain": explain.group(1) if explain else ""}))


class FakeServer(ThreadingHTTPServer):
    """Answers POST /v1/chat/completions from `script` (first) or `behaviour(body)`, and records every request."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.script: list[Reply] = []
        self.behaviour: Callable[[dict], Reply] = lambda body: Reply()
        self.structured_output: Literal["ignore", "refuse", "honour"] = "ignore"
        self.requests: list[tuple[dict, dict]] = []  # (headers, body)
        self.in_flight = 0
        self.max_in_flight = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    @property
    def attempts(self) -> int:
        with self.lock:
            return len(self.requests)

    def next_reply(self, body: dict) -> Reply:
        response_format = body.get("response_format")
        if response_format and self.structured_output == "refuse":
            return REFUSAL
        with self.lock:
            reply = self.script.pop(0) if self.script else None
        reply = reply or self.behaviour(body)
        if response_format and self.structured_output == "honour":
            return as_structured(reply, response_format)
        return reply


class Handler(BaseHTTPRequestHandler):
    server: FakeServer

    def log_message(self, format, *args) -> None:  # keep pytest output clean
        pass

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path != "/v1/chat/completions":
            self._send(404, b'{"error": "not found"}')
            return
        body = json.loads(raw)
        server = self.server
        with server.lock:
            server.requests.append((dict(self.headers), body))
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
        try:
            reply = server.next_reply(body)
            time.sleep(reply.delay)
            payload = reply.body
            if payload is None:
                payload = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                      "choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant", "content": reply.content}}]}
                                     ).encode()
            self._send(reply.status, payload, reply.headers)
        except OSError:
            pass  # the client gave up (timeout) before the reply was written
        finally:
            with server.lock:
                server.in_flight -= 1

    def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@contextmanager
def running_server() -> Iterator[FakeServer]:
    """A FakeServer answering on a free port of 127.0.0.1, shut down on exit."""
    srv = FakeServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)
