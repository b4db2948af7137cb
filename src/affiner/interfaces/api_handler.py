"""The ASGI app of `affiner serve` (Starlette) and the scheduler that shares the model among the requests.

The Host header (against DNS rebinding) and the API key are checked before routing, so that a refused request
learns nothing; GET /health from this machine needs no key, so that a local probe works on any --host.

Requests are answered in arrival order. Greedy, non-streamed ones waiting for the same model join the first in
one `Engine.complete_batch` (up to `max_batch`), which in fp32 answers token for token as one at a time; in bf16
its shapes round differently and can flip a near-tie (quickstart: 10 to 14 of 16 answers identical). A client
that hangs up, or the server stopping, ends its generation (or its row of a batch) at the next token.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from functools import partial
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from affiner.core.errors import AffinerError
from affiner.core.net import is_loopback
from affiner.core.settings import Settings
from affiner.core.stopping import Trim
from affiner.interfaces.engine import Ask, Engine, Reply
from affiner.interfaces.openai_api import Answer, ApiError, Body, finish_reason, parse_request, require_model

MAX_BODY = 1 << 20  # bytes of JSON a request may send
DRAIN_LIMIT = 16 << 20  # a refused body up to this size is read and dropped (by uvicorn), keeping the connection
BATCH_LIMIT = 16  # greedy requests answered together at most
ROUTES = "GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions"
FAILED = "The server failed to answer; see its log."
SHUTTING_DOWN = "The server is shutting down"


@dataclass
class Job:
    """One generation request, between its route and the scheduler."""

    request: Body
    settings: Settings
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # pieces of text, then a Reply or an exception
    stop: threading.Event = field(default_factory=threading.Event)
    reply: Reply | None = None  # once answered
    task: asyncio.Task | None = None  # the scheduler's, held here: the event loop holds its tasks weakly

    async def pieces(self) -> AsyncIterator[str]:
        """The pieces of text as they come; then `reply` is set, or the failure raised."""
        while isinstance(item := await self.events.get(), str):
            yield item
        if isinstance(item, Exception):
            raise item
        self.reply = item

    @property
    def batchable(self) -> bool:
        return not self.request.stream and self.settings.greedy and self.settings.repetition_penalty == 1.0


class Scheduler:
    """Answers the jobs in arrival order, one batch at a time, the model running in worker threads; see the
    module's docstring."""

    def __init__(self, engine: Engine, max_batch: int = BATCH_LIMIT):
        self.engine, self.max_batch, self.closing = engine, max_batch, False
        self.waiting: list[Job] = []
        self.running: list[Job] = []
        self.turn = asyncio.Lock()  # its waiters are woken in arrival order

    async def answer(self, job: Job) -> None:
        self.waiting.append(job)
        async with self.turn:
            if job not in self.waiting:  # answered already, in the batch of an earlier request
                return
            if self.closing:  # queued when the server began to stop: never started
                self.waiting.remove(job)
                job.events.put_nowait(ApiError(503, SHUTTING_DOWN, code="unavailable"))
                return
            fellows = [j for j in self.waiting if j.batchable and j.request.model == job.request.model]
            self.running = fellows[:self.max_batch] if job.batchable else [job]
            self.waiting = [j for j in self.waiting if j not in self.running]
            try:
                await (self._together(self.running) if len(self.running) > 1 else self._alone(job))
            except Exception as error:  # each request answers with it: a 400 for an AffinerError, else a 500
                for j in self.running:
                    j.events.put_nowait(ApiError(400, str(error)) if isinstance(error, AffinerError) else error)
            finally:
                self.running = []

    def close(self) -> None:
        """Stop the running and waiting generations: each ends at its next token."""
        self.closing = True
        for job in self.waiting + self.running:
            job.stop.set()

    async def _together(self, batch: list[Job]) -> None:
        asks = [Ask(j.request.messages, j.request.prompt, j.settings.max_new_tokens, j.request.stop, j.stop)
                for j in batch]
        for job, reply in zip(batch, await run_in_threadpool(self.engine.complete_batch, batch[0].request.model, asks)):
            self._deliver(job, reply)

    def _deliver(self, job: Job, reply: Reply) -> None:
        """The reply, unless the server stopping cut it short: a cut answer is no answer to the request (a
        200 with finish_reason "length" would say it reached max_tokens)."""
        cut = not (reply.stopped or reply.new_turn) and reply.tokens < job.settings.max_new_tokens
        job.events.put_nowait(ApiError(503, SHUTTING_DOWN + " before the answer was complete.", code="unavailable")
                              if self.closing and cut else reply)

    async def _alone(self, job: Job) -> None:
        """One generation, its pieces passed on as they come (for a stream)."""
        request, reply = job.request, Reply()
        pieces = self.engine.stream(request.model, request.messages, job.settings, stop=job.stop, reply=reply,
                                    raw_prompt=request.prompt, stop_texts=request.stop)
        async for piece in iterate_in_threadpool(pieces):
            if request.stream:
                job.events.put_nowait(piece)
        self._deliver(job, reply)


class Api:
    """The ASGI app over a `serve.Server` (its Host check, key, engine and scheduler)."""

    def __init__(self, server):
        self.server = server
        self.app = Starlette(routes=[
            Route("/health", self.health), Route("/v1/models", self.models), Route("/v1/models/{name}", self.models),
            Route("/v1/chat/completions", partial(self.generate, chat=True), methods=["POST"]),
            Route("/v1/completions", partial(self.generate, chat=False), methods=["POST"])],
            exception_handlers={ApiError: lambda _, error: error.response(), HTTPException: refusal,
                                ClientDisconnect: lambda *_: Response(status_code=499),  # nobody reads it
                                Exception: lambda *_: ApiError(500, FAILED, code="internal_error").response()})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse before routing what must be refused (a refused request learns nothing), answer, log one line."""
        request, server, started, status = Request(scope, receive), self.server, time.perf_counter(), []

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            if server.scheduler is None or server.scheduler.closing:
                raise ApiError(503, SHUTTING_DOWN + ".", code="unavailable", headers={"Connection": "close"})
            server.check_host(request.headers.getlist("host"), scope["http_version"])
            if not (request.url.path == "/health" and request.client and is_loopback(request.client.host)):
                authorize(request.headers.get("authorization"), server.api_key)
            await self.app(scope, receive, sending)
        except ApiError as error:
            await error.response()(scope, receive, sending)
        finally:
            print(f"{request.client.host if request.client else '-'} {request.method} {request.url.path} "
                  f"{status[0] if status else '-'} {time.perf_counter() - started:.3f}s", file=sys.stderr, flush=True)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "models": self.server.engine.names})

    async def models(self, request: Request) -> Response:
        """All the models, or the one named in the path."""
        cards = [{"id": name, "object": "model", "created": self.server.created, "owned_by": "affiner"}
                 for name in self.server.engine.names]
        if name := request.path_params.get("name"):
            require_model(self.server.engine, name)
            return JSONResponse(next(card for card in cards if card["id"] == name))
        return JSONResponse({"object": "list", "data": cards})

    async def generate(self, request: Request, chat: bool) -> Response:
        job = Job(*parse_request(self.server.engine, await read_body(request), chat))
        job.task = asyncio.ensure_future(self.server.scheduler.answer(job))
        if job.request.stream:  # Starlette ends the stream when the client hangs up; `events` then stops the job
            return StreamingResponse(events(job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watch = asyncio.ensure_future(hang_up(request.receive, job.stop))
        try:
            async for _ in job.pieces():
                pass
            return JSONResponse(Answer(job.request).whole(job.reply))
        finally:  # answered, or cancelled (uvicorn's shutdown): either way the model is no longer wanted
            watch.cancel()
            job.stop.set()


def refusal(request: Request, error: HTTPException) -> Response:
    """Starlette's 404 (no such route) and 405 (wrong method) as OpenAI-shaped errors."""
    if error.status_code == 405:  # Starlette allows HEAD besides GET; the method a client should use is GET
        allowed = "GET" if "GET" in error.headers["Allow"] else "POST"
        return ApiError(405, f"{request.method} is not allowed on {request.url.path}; use {allowed}.",
                        code="method_not_allowed", headers={"Allow": allowed}).response()
    return ApiError(error.status_code, f"Unknown path {request.url.path}; routes: {ROUTES}.",
                    code="unknown_url").response()


def authorize(header: str | None, key: str | None) -> None:
    scheme, _, token = (header or "").strip().partition(" ")
    # Compared in constant time, as bytes: timing must not reveal how much of a guess was right.
    sent = token.strip().encode("latin-1", errors="replace")
    if key is not None and (scheme.lower() != "bearer" or not hmac.compare_digest(sent, key.encode("utf-8"))):
        raise ApiError(401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key",
                       headers={"WWW-Authenticate": 'Bearer realm="affiner"'})


async def read_body(request: Request) -> bytes:
    """The body, declared application/json: a cross-site page can POST text/plain or a form without the browser
    asking this server first, but not JSON, so only JSON bodies are read."""
    kind = request.headers.get("content-type")
    if (kind or "").partition(";")[0].strip().lower() != "application/json":
        sent = f"not {kind.strip()[:100]!r}" if kind else "none was given"
        raise ApiError(415, f"The body must be sent with 'Content-Type: application/json' ({sent}).",
                       code="unsupported_media_type")
    length = request.headers.get("content-length")
    if length is None or "transfer-encoding" in request.headers:
        raise ApiError(411, "Send the JSON body with a Content-Length header (not chunked).", code="length_required")
    if int(length) > MAX_BODY:  # a number: the HTTP parser checked it
        raise ApiError(413, f"The body has {length} bytes; at most {MAX_BODY} are accepted.", code="request_too_large",
                       headers={"Connection": "close"} if int(length) > DRAIN_LIMIT else None)
    return await request.body()


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
        async for piece in job.pieces():
            if text := trim.feed(piece) if trim else piece:
                yield sse(answer.piece(text))
        yield sse(answer.piece(finish=finish_reason(job.reply)))
        if job.request.include_usage:
            yield sse(answer.head(answer.kind, None, job.reply))
        yield sse("[DONE]")
    except ApiError as error:
        yield sse(error.body())
    except Exception:
        traceback.print_exc()
        yield sse(ApiError(500, FAILED).body())
    finally:
        job.stop.set()  # a client gone (the stream cancelled) frees the model at once
