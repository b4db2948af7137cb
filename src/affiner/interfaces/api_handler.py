"""The ASGI app of `affiner serve` (Starlette's requests and responses, run by uvicorn) and the scheduler
that owns the model.

A request is checked in this order, so that a refused one learns nothing and costs nothing: the Host
header (`serve.host_allowed`, against DNS rebinding), the API key (GET /health from a loopback client
needs none, so that a local probe works on any --host; any other request needs the key once one is
configured), the route and method, and for a generation a body declared application/json (else 415)
with a Content-Length of at most 1 MiB (else 411, 413). What the body means is `openai_api`'s.

The `Scheduler`'s one thread answers in arrival order. When the model is free and the next request is
greedy (temperature 0) and not streamed, every such request waiting for the same model (up to
BATCH_LIMIT) is answered with it in one batch (`Engine.complete_batch`); a request alone, sampled or
streamed goes through `Engine.stream`. A batch answers as one at a time token for token in fp32; in bf16
its other shapes round differently, which can flip a near-tie between two tokens (measured on the
quickstart: 10 to 14 of 16 answers identical in bf16, 16 of 16 in fp32). A client that hangs up, or the
server stopping, sets the request's `stop` event: its generation (or its row of a batch) ends at the
next token.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import AsyncIterator

from starlette.requests import ClientDisconnect, Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from affiner.core.errors import AffinerError
from affiner.core.net import is_loopback
from affiner.core.stopping import TurnCutter
from affiner.interfaces.engine import Ask, Engine, Reply
from affiner.interfaces.openai_api import Answer, ApiError, Request, Trim, finish_reason, parse_body, parse_request, \
    require_json

MAX_BODY = 1 << 20  # bytes of JSON a request may send
DRAIN_LIMIT = 16 << 20  # a refused body up to this size is read and dropped (by uvicorn), keeping the connection
BATCH_LIMIT = 16  # greedy requests answered together at most
ROUTES = {"/health": "GET", "/v1/models": "GET", "/v1/chat/completions": "POST", "/v1/completions": "POST"}
FAILED = "The server failed to answer; see its log."


@dataclass
class Job:
    """One generation request, between the app (on the event loop) and the scheduler's thread."""

    request: Request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # pieces of text, then a Reply or an exception
    stop: threading.Event = field(default_factory=threading.Event)

    def emit(self, item: str | Reply | Exception) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server stopped, nobody waits for this answer
            pass

    async def reply(self) -> Reply:
        while isinstance(item := await self.events.get(), str):
            pass
        return settled(item)

    @property
    def batchable(self) -> bool:
        return not self.request.stream and self.request.settings.greedy


def settled(item: Reply | Exception) -> Reply:
    """The reply, or its failure raised: an engine's AffinerError as a 400, any other as it is (a 500)."""
    if isinstance(item, AffinerError):
        raise ApiError(400, str(item))
    if isinstance(item, Exception):
        raise item
    return item


class Scheduler:
    """One thread that owns the model; see the module's docstring."""

    def __init__(self, engine: Engine, max_batch: int = BATCH_LIMIT):
        self.engine, self.waiting, self.running, self.closing = engine, [], [], False
        self.max_batch = max_batch
        self.changed = threading.Condition()
        threading.Thread(target=self._work, name="affiner-serve", daemon=True).start()

    def submit(self, job: Job) -> None:
        with self.changed:
            if self.closing:  # the thread may have ended: nobody else would answer
                job.emit(ApiError(503, "The server is shutting down.", code="unavailable"))
            else:
                self.waiting.append(job)
                self.changed.notify()

    def close(self) -> None:
        """Stop the running and waiting generations; the thread ends once they have answered."""
        with self.changed:
            self.closing = True
            for job in self.waiting + self.running:
                job.stop.set()
            self.changed.notify()

    def _next(self) -> list[Job]:
        first = self.waiting.pop(0)
        batch = [first, *[j for j in self.waiting if j.batchable and j.request.model == first.request.model]]
        batch = batch[:self.max_batch] if first.batchable else [first]
        self.waiting = [j for j in self.waiting if j not in batch]
        return batch

    def _work(self) -> None:
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.waiting or self.closing)
                if not self.waiting:
                    return
                self.running = batch = self._next()
            try:
                if len(batch) > 1:
                    self._answer_together(batch)
                else:
                    self._answer(batch[0])
            except Exception as error:  # each request answers with it (a 400, or a 500 with the traceback)
                for job in batch:
                    job.emit(error)
            with self.changed:
                self.running = []

    def _answer_together(self, batch: list[Job]) -> None:
        asks = [Ask(j.request.messages, j.request.prompt, j.request.settings.max_new_tokens, j.request.stop, j.stop)
                for j in batch]
        for job, reply in zip(batch, self.engine.complete_batch(batch[0].request.model, asks)):
            job.emit(reply)

    def _answer(self, job: Job) -> None:
        """One generation, its pieces emitted as they come (for a stream), cut at the request's stop texts:
        a piece that could begin one is held back (TurnCutter), and the generation ends where one appears."""
        request, reply, cutter, kept = job.request, Reply(), TurnCutter(job.request.stop), []
        pieces = self.engine.stream(request.model, request.messages, request.settings, stop=job.stop, reply=reply,
                                    raw_prompt=request.prompt)
        for piece in itertools.chain(pieces, [None]):  # None: the end, what the cutter held back
            piece = cutter.feed(piece) if piece is not None else cutter.flush()
            if cutter.cut:
                job.stop.set()
            kept += [piece] if piece else []
            if piece and request.stream:
                job.emit(piece)
        if cutter.cut:
            reply.text, reply.stopped = "".join(kept), True
            reply.tokens = len(self.engine.tokenizer(reply.text, add_special_tokens=False)["input_ids"])
        job.emit(reply)


class Api:
    """The ASGI app over a `serve.Server` (its engine, scheduler, key and Host check); one log line a request."""

    def __init__(self, server):
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request, started = HttpRequest(scope, receive), time.perf_counter()
        try:
            response = await self.handle(request)
        except ApiError as error:
            response = error.response()
        except ClientDisconnect:
            return
        except Exception:
            traceback.print_exc()
            response = ApiError(500, FAILED, code="internal_error").response()
        await response(scope, receive, send)
        print(f"{request.client.host if request.client else '-'} {request.method} {request.url.path} "
              f"{response.status_code} {time.perf_counter() - started:.3f}s", file=sys.stderr, flush=True)

    async def handle(self, request: HttpRequest) -> Response:
        server, path = self.server, request.url.path.rstrip("/") or "/"
        if server.closing or server.scheduler is None:
            raise ApiError(503, "The server is shutting down.", code="unavailable", headers={"Connection": "close"})
        server.check_host(request.headers.getlist("host"))  # first: a foreign page learns nothing
        if not (path == "/health" and request.client and is_loopback(request.client.host)):
            authorize(request.headers.get("authorization"), server.api_key)
        method = "GET" if path.startswith("/v1/models/") else ROUTES.get(path)
        if method is None:
            raise ApiError(404, f"Unknown path {path}; routes: {', '.join(f'{m} {p}' for p, m in ROUTES.items())}.",
                           code="unknown_url")
        if request.method != method:
            raise ApiError(405, f"{request.method} is not allowed on {path}; use {method}.",
                           code="method_not_allowed", headers={"Allow": method})
        names, name = server.engine.names, path.removeprefix("/v1/models/")
        if path.startswith("/v1/models/") and name not in names:
            raise ApiError(404, f"The model '{name}' does not exist; this server has: {', '.join(names)}.",
                           param="model", code="model_not_found")
        cards = {n: {"id": n, "object": "model", "created": server.created, "owned_by": "affiner"} for n in names}
        if path == "/health":
            return JSONResponse({"status": "ok", "models": names})
        if method == "GET":
            return JSONResponse(cards[name] if name in cards else {"object": "list", "data": list(cards.values())})
        return await self.generate(request, chat=path == "/v1/chat/completions")

    async def generate(self, request: HttpRequest, chat: bool) -> Response:
        job = Job(parse_request(self.server.engine, await read_json(request), chat), asyncio.get_running_loop())
        self.server.scheduler.submit(job)
        if job.request.stream:  # Starlette ends the stream when the client hangs up; `events` then stops the job
            return StreamingResponse(events(job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watch = asyncio.ensure_future(hang_up(request.receive, job.stop))
        try:
            return JSONResponse(Answer(job.request).whole(await job.reply()))
        finally:  # answered, or cancelled (uvicorn's shutdown): either way the model is no longer wanted
            watch.cancel()
            job.stop.set()


def authorize(header: str | None, key: str | None) -> None:
    scheme, _, token = (header or "").strip().partition(" ")
    # Compared in constant time, as bytes: timing must not reveal how much of a guess was right.
    sent = token.strip().encode("latin-1", errors="replace")
    if key is not None and (scheme.lower() != "bearer" or not hmac.compare_digest(sent, key.encode("utf-8"))):
        raise ApiError(401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key",
                       headers={"WWW-Authenticate": 'Bearer realm="affiner"'})


async def read_json(request: HttpRequest) -> dict:
    require_json(request.headers.get("content-type"))
    length = request.headers.get("content-length")
    if length is None or "transfer-encoding" in request.headers:
        raise ApiError(411, "Send the JSON body with a Content-Length header (not chunked).", code="length_required")
    if int(length) > MAX_BODY:  # a number: h11 checked it
        raise ApiError(413, f"The body has {length} bytes; at most {MAX_BODY} are accepted.", code="request_too_large",
                       headers={"Connection": "close"} if int(length) > DRAIN_LIMIT else None)
    return parse_body(await request.body())


async def hang_up(receive: Receive, stop: threading.Event) -> None:
    """Set `stop` when the client closes its connection while its answer is queued or generated."""
    while (await receive())["type"] != "http.disconnect":
        pass
    stop.set()


async def events(job: Job) -> AsyncIterator[str]:
    """The answer as server-sent events: (for chat) the role, each piece, the finish reason, the usage, [DONE];
    a failure after the first event can only be told as an error event."""
    answer, trim = Answer(job.request), Trim() if job.request.chat else None
    sse = lambda payload: f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"  # noqa: E731
    try:
        if job.request.chat:
            yield sse(answer.piece(role=True))
        while isinstance(item := await job.events.get(), str):
            if text := trim.feed(item) if trim else item:
                yield sse(answer.piece(text))
        reply = settled(item)
        yield sse(answer.piece(finish=finish_reason(reply)))
        if job.request.include_usage:
            yield sse(answer.usage_chunk(reply))
        yield sse("[DONE]")
    except ApiError as error:
        yield sse(error.body())
    except Exception:
        traceback.print_exc()
        yield sse(ApiError(500, FAILED).body())
    finally:
        job.stop.set()  # a client gone (the stream cancelled) frees the model at once
