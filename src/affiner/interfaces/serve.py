"""The server of `affiner serve`: a socket bound (host, port, API key checked) before the model is loaded,
then uvicorn running `api_handler`'s ASGI app on it until Ctrl-C.

uvicorn runs from code (`uvicorn.Server` on the bound socket), so that a busy port or a missing key is
reported before a minute of loading. On Ctrl-C it stops accepting, the generations are told to stop
(`Scheduler.close`), the answers in progress end, and the KeyboardInterrupt it caught is raised again.

A browser page can reach a loopback server too, so the Host header must name this server (a loopback
name, or the --host given), which defeats DNS rebinding, and a POST body must be declared
application/json (`api_handler`), which a cross-site form cannot send. What h11 refuses before the app
sees it (two Host headers, a malformed request line) is answered with an OpenAI-shaped error too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import socket
import sys
import threading
import time
from http import HTTPStatus
from pathlib import Path

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from affiner.core.errors import AffinerError
from affiner.core.net import is_loopback
from affiner.core.runfolder import RunFolder
from affiner.interfaces.api_handler import BATCH_LIMIT, Api, Scheduler
from affiner.interfaces.engine import Engine
from affiner.interfaces.openai_api import ApiError

WILDCARDS = {"", "0.0.0.0", "::"}  # --host values that listen on every interface
# A Host header: a name or IPv4 address, or a bracketed IPv6 address, then an optional port.
HOST_HEADER = re.compile(r"(?:\[(?P<ipv6>[0-9a-fA-F:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::[0-9]{1,5})?")
IDLE_SECONDS = 120  # a kept-alive connection with no request for this long is closed
REFUSED_LINGER_SECONDS = 1.0  # a connection refused by the HTTP parser drains its unread request this long


def serve(folders: list[Path], host: str = "127.0.0.1", port: int = 8000, api_key_env: str | None = None,
          max_batch: int = BATCH_LIMIT) -> None:
    """Serve the runs (default: the latest under runs/) until Ctrl-C; the key, if any, is read from `api_key_env`;
    at most `max_batch` greedy requests are answered together (1: each alone, answers independent of the load)."""
    if max_batch < 1:
        raise AffinerError(f"--max-batch {max_batch}: at least 1 (1 answers every request alone).")
    if not 0 <= port <= 65535:
        raise AffinerError(f"--port {port} is not a port number (0 to 65535).")
    api_key = read_api_key(api_key_env)
    if not folders:
        latest = RunFolder.latest()
        if latest is None:
            raise AffinerError("no run folder given and none found under runs/; train one with: affiner run, "
                               "or pass the run folder: affiner serve runs/NAME")
        folders = [latest.path]
    # Refuse a bad host, key or busy port before spending a minute loading the model.
    server = bind(host, port, api_key)
    try:
        server.attach(Engine.from_runs(folders), max_batch)
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


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None) -> "Server":
    """A bound, not yet serving, server over `engine`; call `serve_forever()` (in a thread for tests)."""
    server = bind(host, port, api_key)
    server.attach(engine)
    return server


def bind(host: str, port: int, api_key: str | None) -> "Server":
    """A server listening on host:port, without engine yet; refused on a public address without a key."""
    if api_key is not None and not api_key.strip():
        raise AffinerError("the API key is empty; give a real key or none.")
    if api_key is None and not is_loopback(host):
        raise AffinerError(f"refusing to serve on {host or 'all interfaces'} without an API key: anyone who can "
                           "reach this machine could use the models. Put a key in an environment variable and "
                           "pass its name: export AFFINER_KEY=$(openssl rand -hex 16), then affiner serve --host "
                           f"{host or '0.0.0.0'} --api-key-env AFFINER_KEY; or keep the default --host 127.0.0.1.")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as error:
        sock.close()
        raise AffinerError(f"cannot listen on {host}:{port} ({error.strerror or error}); "
                           "is another server using that port? Pick another with --port.") from None
    return Server(sock, host, api_key)


def host_name(header: str) -> str | None:
    """The name a Host header gives ('[::1]:8000' -> '::1', 'LocalHost.:80' -> 'localhost'); None if malformed."""
    match = HOST_HEADER.fullmatch(header.strip())
    if match is None:
        return None
    return (match["ipv6"] or match["name"]).lower().rstrip(".")


def host_allowed(name: str, bound: str) -> bool:
    """Whether a request naming `name` in its Host header may be answered by a server listening on `bound`.

    Loopback names always pass, and the --host name (as an address or a DNS name) does. A name chosen by
    someone else is refused: a page whose DNS name was pointed at this machine (DNS rebinding) reaches the
    port, but names its own host. Listening on every interface, there is no one name to pin; a key is then
    required (`bind`), and it is the key that a rebinding page lacks, so any name passes.
    """
    if is_loopback(name) or bound in WILDCARDS:
        return True
    bound = bound.strip("[]").lower().rstrip(".")
    try:
        return ipaddress.ip_address(name) == ipaddress.ip_address(bound)
    except ValueError:
        return name == bound


class Server:
    """The listening socket and uvicorn on it: its engine, its scheduler, its key."""

    def __init__(self, sock: socket.socket, host: str, api_key: str | None):
        self.socket, self.host, self.api_key = sock, host, api_key
        self.engine: Engine | None = None
        self.scheduler: Scheduler | None = None
        self.created = int(time.time())
        self.closing = False
        self.finished = threading.Event()
        config = uvicorn.Config(Api(self), http=Protocol, loop="asyncio", lifespan="off", ws="none", log_config=None,
                                log_level="warning", access_log=False, proxy_headers=False, server_header=False,
                                headers=[("server", "affiner")], timeout_keep_alive=IDLE_SECONDS,
                                timeout_graceful_shutdown=10)
        self.uvicorn = Uvicorn(config, on_shutdown=self.stop_generations)

    @property
    def server_address(self) -> tuple:
        return self.socket.getsockname()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"

    def attach(self, engine: Engine, max_batch: int = BATCH_LIMIT) -> None:
        self.engine, self.scheduler = engine, Scheduler(engine, max_batch)

    def check_host(self, headers: list[str]) -> None:
        """Refuse (421) a request whose Host header names another server; see `host_allowed`."""
        name = host_name(headers[0]) if len(headers) == 1 else None
        if headers and (name is None or not host_allowed(name, self.host)):  # only HTTP/1.0 may omit it
            raise ApiError(421, f"This server does not answer for the host {', '.join(headers)[:200]!r}: use "
                           f"localhost, 127.0.0.1 or [::1]{'' if is_loopback(self.host) else ' or ' + self.host}, "
                           "as in the address the server printed.", code="invalid_host")

    def serve_forever(self) -> None:
        """Answer until `shutdown` (from another thread) or Ctrl-C (in the main thread: KeyboardInterrupt)."""
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self.finished.set()

    def shutdown(self) -> None:
        """Ask `serve_forever` to return, and wait until it has."""
        self.uvicorn.should_exit = True
        self.finished.wait(30)

    def stop_generations(self) -> None:
        self.closing = True
        if self.scheduler is not None:
            self.scheduler.close()

    def stop(self) -> None:
        """End running and queued generations, close the listening socket, let the answer in progress end."""
        self.stop_generations()
        self.socket.close()
        engine = self.engine
        if engine is not None and engine.lock.acquire(timeout=10):
            engine.lock.release()

    def server_close(self) -> None:
        self.socket.close()


class Uvicorn(uvicorn.Server):
    """uvicorn's server, stopping the generations as soon as it begins to shut down, not after they end."""

    def __init__(self, config: uvicorn.Config, on_shutdown):
        super().__init__(config)
        self.on_shutdown = on_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.on_shutdown()
        await super().shutdown(sockets)


class Connection(h11.Connection):
    """h11's connection, remembering why it refused a request."""

    refusal = ""

    def next_event(self):
        try:
            return super().next_event()
        except h11.RemoteProtocolError as error:
            self.refusal = str(error)
            raise


class Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, answering what h11 refuses as the API does: an OpenAI-shaped error (a 421
    for Host headers: two of them, which a rebinding page could send, or none in HTTP/1.1)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conn = Connection(h11.SERVER)  # h11's default limits, as uvicorn's (none is configured here)

    def send_400_response(self, msg: str) -> None:
        refusal = self.conn.refusal or msg
        error = ApiError(400, f"Malformed HTTP request ({refusal}).")
        if "Host" in refusal:
            error = ApiError(421, f"{refusal}: send one Host header naming this server, as in the address it printed.",
                             code="invalid_host")
        body = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        head = h11.Response(status_code=error.status, headers=headers, reason=HTTPStatus(error.status).phrase)
        for event in (head, h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        # Closing while the request's body is still unread makes the kernel reset the connection, which can
        # destroy this answer on its way (seen in CI): end our side now, drop what still arrives, close later.
        self.refused = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        asyncio.get_running_loop().call_later(REFUSED_LINGER_SECONDS, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if not getattr(self, "refused", False):
            super().data_received(data)
