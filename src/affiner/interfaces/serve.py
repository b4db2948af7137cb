"""The server of `affiner serve`: a socket bound (host, port and key checked) before a minute of loading the
model, then uvicorn running `api_handler`'s app on it until Ctrl-C, which tells the generations to stop.

A browser page can reach a loopback server too, so a request must name this server in one Host header (a
loopback name, or the --host given), which defeats DNS rebinding. uvicorn parses HTTP with httptools, which
hands every Host header to the app, where two of them are refused like a foreign one.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path

import uvicorn

from affiner.core.errors import AffinerError
from affiner.core.net import is_loopback, read_api_key
from affiner.core.runfolder import RunFolder
from affiner.interfaces.api_handler import BATCH_LIMIT, Api, Scheduler
from affiner.interfaces.engine import Engine
from affiner.interfaces.openai_api import ApiError

WILDCARDS = {"", "0.0.0.0", "::"}  # --host values that listen on every interface
# A Host header: a name or IPv4 address, or a bracketed IPv6 address, then an optional port.
HOST_HEADER = re.compile(r"(?:\[(?P<ipv6>[0-9a-fA-F:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::[0-9]{1,5})?")
IDLE_SECONDS = 120  # a kept-alive connection with no request for this long is closed


def serve(folders: list[Path], host: str = "127.0.0.1", port: int = 8000, api_key_env: str | None = None,
          max_batch: int = BATCH_LIMIT) -> None:
    """Serve the runs (default: the latest under runs/) until Ctrl-C, with the key held by `api_key_env` if named;
    at most `max_batch` greedy requests are answered together (1: each alone, answers independent of the load)."""
    if max_batch < 1:
        raise AffinerError(f"--max-batch {max_batch}: at least 1 (1 answers every request alone).")
    api_key = read_api_key(api_key_env, "--api-key-env")
    if not folders and (latest := RunFolder.latest()) is None:
        raise AffinerError("no run folder given and none found under runs/; train one with: affiner run, "
                           "or pass the run folder: affiner serve runs/NAME")
    folders = folders or [latest.path]
    server = Server(host, port, api_key)
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


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None) -> Server:
    """A bound, not yet serving, server over `engine`; call `serve_forever()` (in a thread for tests)."""
    server = Server(host, port, api_key)
    server.attach(engine)
    return server


def host_name(header: str) -> str | None:
    """The name a Host header gives ('[::1]:8000' -> '::1', 'LocalHost.:80' -> 'localhost'); None if malformed."""
    match = HOST_HEADER.fullmatch(header.strip())
    return None if match is None else (match["ipv6"] or match["name"]).lower().rstrip(".")


def host_allowed(name: str, bound: str) -> bool:
    """Whether a request naming `name` in its Host header may be answered by a server listening on `bound`.

    Loopback names pass, and so does the --host name. A page whose DNS name was pointed at this machine (DNS
    rebinding) reaches the port but names its own host. On every interface there is no one name to pin; a key
    is then required, and it is the key that a rebinding page lacks, so any name passes.
    """
    if is_loopback(name) or bound in WILDCARDS:
        return True
    bound = bound.strip("[]").lower().rstrip(".")
    try:
        return ipaddress.ip_address(name) == ipaddress.ip_address(bound)
    except ValueError:
        return name == bound


class Server:
    """A listening socket, refused on a public address without a key, and uvicorn answering on it."""

    def __init__(self, host: str, port: int, api_key: str | None):
        if api_key is not None and not api_key.strip():  # "Bearer " alone would then pass
            raise AffinerError("the API key is empty; give a real key or none.")
        if api_key is None and not is_loopback(host):
            raise AffinerError(f"refusing to serve on {host or 'all interfaces'} without an API key: anyone who can "
                               "reach this machine could use the models. Put a key in an environment variable and "
                               "pass its name: export AFFINER_KEY=$(openssl rand -hex 16), then affiner serve --host "
                               f"{host or '0.0.0.0'} --api-key-env AFFINER_KEY; or keep the default --host 127.0.0.1.")
        try:
            self.socket = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                               dualstack_ipv6=host == "::")  # "::" takes IPv4 clients too
        except (OSError, OverflowError) as error:  # OverflowError: a port above 65535
            reason = os.strerror(error.errno) if isinstance(error, OSError) and error.errno else error
            raise AffinerError(f"cannot listen on {host}:{port} ({reason}); is another server using that port? Pick "
                               "another with --port.") from None
        self.host, self.api_key, self.created = host, api_key, int(time.time())
        self.engine: Engine | None = None
        self.scheduler: Scheduler | None = None
        self.finished = threading.Event()
        config = uvicorn.Config(Api(self), http="httptools", lifespan="off", ws="none", log_config=None,
                                proxy_headers=False, server_header=False, timeout_keep_alive=IDLE_SECONDS,
                                timeout_graceful_shutdown=10)
        self.uvicorn = Uvicorn(config, self)

    @property
    def server_address(self) -> tuple:
        return self.socket.getsockname()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"

    def attach(self, engine: Engine, max_batch: int = BATCH_LIMIT) -> None:
        self.engine, self.scheduler = engine, Scheduler(engine, max_batch)

    def check_host(self, headers: list[str], http_version: str) -> None:
        """Refuse (421) a request without one Host header naming this server (`host_allowed`); only HTTP/1.0
        may send none."""
        name = host_name(headers[0]) if len(headers) == 1 else None
        if (headers or http_version != "1.0") and (name is None or not host_allowed(name, self.host)):
            names = "localhost, 127.0.0.1 or [::1]" + ("" if is_loopback(self.host) else f" or {self.host}")
            raise ApiError(421, f"This server does not answer for the host {', '.join(headers)[:200]!r}: send one "
                           f"Host header, {names}, as in the address the server printed.", code="invalid_host")

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

    def stop(self) -> None:
        """End running and queued generations, close the listening socket, let the answer in progress end."""
        if self.scheduler is not None:
            self.scheduler.close()
        self.server_close()
        if self.engine is not None and self.engine.lock.acquire(timeout=10):
            self.engine.lock.release()

    def server_close(self) -> None:
        self.socket.close()


class Uvicorn(uvicorn.Server):
    """uvicorn's server, stopping the generations as soon as it begins to shut down, not after they end."""

    def __init__(self, config: uvicorn.Config, owner: Server):
        super().__init__(config)
        self.owner = owner

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn takes Ctrl-C itself (serve's KeyboardInterrupt never comes): say here that the server is going.
        print("stopping: requests in progress end at their next token", file=sys.stderr, flush=True)
        if self.owner.scheduler is not None:
            self.owner.scheduler.close()
        await super().shutdown(sockets)
