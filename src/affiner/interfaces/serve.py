"""The server of `affiner serve`: bound (host, port, API key checked) before the model is loaded, then
serving OpenAI-compatible requests, one generation at a time, until Ctrl-C.

A browser page can reach a loopback server too, so requests are checked before anything else: the Host
header must name this server (a loopback name, or the --host given), which defeats DNS rebinding, and a
POST body must be declared application/json (`api_handler`), which a cross-site form cannot send.

Each request is handled by `api_handler.Handler`; what the API's requests and answers mean is
`openai_api`'s.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import sys
import threading
import time
import traceback
from http.server import ThreadingHTTPServer
from pathlib import Path

from affiner.core.errors import AffinerError
from affiner.core.net import is_loopback
from affiner.core.runfolder import RunFolder
from affiner.interfaces.api_handler import Handler
from affiner.interfaces.engine import Engine
from affiner.interfaces.openai_api import ApiError

WILDCARDS = {"", "0.0.0.0", "::"}  # --host values that listen on every interface
# A Host header: a name or IPv4 address, or a bracketed IPv6 address, then an optional port.
HOST_HEADER = re.compile(r"(?:\[(?P<ipv6>[0-9a-fA-F:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::[0-9]{1,5})?")


def serve(folders: list[Path], host: str = "127.0.0.1", port: int = 8000, api_key_env: str | None = None) -> None:
    """Serve the runs (default: the latest under runs/) until Ctrl-C; the key, if any, is read from `api_key_env`."""
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
                api_key: str | None = None) -> Server:
    """A bound, not yet serving, server over `engine`; call `serve_forever()` (in a thread for tests)."""
    server = bind(host, port, api_key)
    server.engine = engine
    return server


def bind(host: str, port: int, api_key: str | None) -> Server:
    """A server listening on host:port, without engine yet; refused on a public address without a key."""
    if api_key is not None and not api_key.strip():
        raise AffinerError("the API key is empty; give a real key or none.")
    if api_key is None and not is_loopback(host):
        raise AffinerError(f"refusing to serve on {host or 'all interfaces'} without an API key: anyone who can "
                           "reach this machine could use the models. Put a key in an environment variable and "
                           "pass its name: export AFFINER_KEY=$(openssl rand -hex 16), then affiner serve --host "
                           f"{host or '0.0.0.0'} --api-key-env AFFINER_KEY; or keep the default --host 127.0.0.1.")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return Server((host, port), api_key, family)
    except OSError as error:
        raise AffinerError(f"cannot listen on {host}:{port} ({error.strerror or error}); "
                           "is another server using that port? Pick another with --port.") from None


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
    if is_loopback(name):
        return True
    if bound in WILDCARDS:
        return True
    bound = bound.strip("[]").lower().rstrip(".")
    try:
        return ipaddress.ip_address(name) == ipaddress.ip_address(bound)
    except ValueError:
        return name == bound


class Server(ThreadingHTTPServer):
    """The listening server: its engine, its key, and the generations it must stop when it stops."""

    daemon_threads = True
    block_on_close = False  # kept-alive idle connections must not hold up shutdown

    def __init__(self, address: tuple[str, int], api_key: str | None, family: int):
        self.address_family = family
        self.host = address[0]
        self.api_key = api_key
        self.engine: Engine | None = None
        self.created = int(time.time())
        self.closing = False
        self._generations: set[threading.Event] = set()
        self._generations_lock = threading.Lock()
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = {"": "0.0.0.0", "0.0.0.0": "0.0.0.0"}.get(host, host)
        if ":" in shown:
            shown = f"[{shown}]"
        return f"http://{shown}:{port}/v1"

    def check_host(self, headers: list[str]) -> None:
        """Refuse (421) a request whose Host header names another server; see `host_allowed`."""
        if not headers:
            return  # only an HTTP/1.0 client omits it, and every browser sends one
        name = host_name(headers[0]) if len(headers) == 1 else None
        if name is None or not host_allowed(name, self.host):
            shown = ", ".join(headers)[:200]
            raise ApiError(421, f"This server does not answer for the host {shown!r}: use localhost, 127.0.0.1 "
                           f"or [::1]{'' if is_loopback(self.host) else ' or ' + self.host}, as in the "
                           "address the server printed.", code="invalid_host")

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

