"""A small client for OpenAI-compatible chat endpoints (Ollama, vLLM, OpenAI, `affiner serve`).

Shared by the LLM judge (`affiner evaluate --judge-url`) and by `affiner synth --endpoint`, which
both describe their endpoint with one `EndpointSettings`:

    client = ChatClient(EndpointSettings("http://127.0.0.1:11434/v1", "gemma3:27b"), cache_name="judge")
    text = client.ask([{"role": "user", "content": "Say hello."}], temperature=0)

Requests go to `<url>/chat/completions`. Failed requests are retried with exponential back-off when
retrying can help (timeouts, connection errors, HTTP 429 and 5xx, garbled bodies); other failures
raise `RequestFailed` at once. Replies are cached in sqlite (`$AFFINER_CACHE/<cache_name>`, default
`~/.cache/affiner/<cache_name>`), keyed by endpoint, model and messages, never by the API key. The
key is read from the environment variable named by `api_key_env` and sent in the Authorization
header only: redirects are refused (they would carry the header elsewhere), and any echo of the key
in an error body is replaced by "[api key]".
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import sqlite3
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from affiner.core.errors import AffinerError
from affiner.core.net import is_loopback

# ---------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class EndpointSettings:
    """Where an OpenAI-compatible endpoint is, and how patiently and how widely to ask it."""

    url: str  # base URL, e.g. "http://127.0.0.1:11434/v1"; requests go to <url>/chat/completions
    model: str
    api_key_env: str | None = None  # the NAME of the variable holding the key, so the key never sits in a config
    timeout: float = 60.0  # seconds per request
    max_retries: int = 3  # retries after the first attempt
    backoff: float = 1.0  # first back-off in seconds, doubled after each retry
    concurrency: int = 4  # requests in flight at once
    cache_dir: Path | None = None  # None: $AFFINER_CACHE/<the client's cache name>


# ---------------------------------------------------------------------------------------- cache


def default_cache_dir(name: str) -> Path:
    # Same root as models.cache_root(), computed here so that talking to an endpoint does not import torch.
    return Path(os.environ.get("AFFINER_CACHE", Path.home() / ".cache" / "affiner")) / name


def cache_key(url: str, model: str, messages: list[dict[str, str]], temperature: float = 0.0) -> str:
    # The key deliberately leaves out the API key: it must not be derivable from, or stored in, the cache.
    request: dict = {"url": url, "model": model, "messages": messages}
    if temperature:
        # Only non-zero temperatures enter the key, so replies cached before it did (all at 0) stay valid.
        request["temperature"] = temperature
    payload = json.dumps(request, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class ReplyCache:
    """Successful replies by request key; one short-lived connection per access, so threads never share one."""

    def __init__(self, folder: Path, label: str = "endpoint"):
        self.path = folder / "replies.sqlite3"
        self._lock = threading.Lock()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply TEXT NOT NULL, "
                           "created REAL NOT NULL)")
        except (OSError, sqlite3.Error) as error:
            raise AffinerError(f"The {label} cache {self.path} cannot be opened ({error}). Delete the file, or "
                               f"set AFFINER_CACHE to a writable folder.") from error

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)  # another affiner process may be writing

    def get(self, key: str) -> str | None:
        with self._lock:
            db = self._connect()
            try:
                row = db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
            finally:
                db.close()
        return row[0] if row else None

    def put(self, key: str, reply: str) -> None:
        with self._lock:
            db = self._connect()
            try:
                with db:
                    db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?)", (key, reply, time.time()))
            finally:
                db.close()


# ---------------------------------------------------------------------------------------- failures


class RequestFailed(Exception):
    """A request that got no usable reply; `retryable` says whether asking again could help."""

    def __init__(self, message: str, retryable: bool, status: int | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.status = status  # the HTTP status, when the server answered with an error


def with_retries(attempt: Callable[[], str], max_retries: int, backoff: float) -> str:
    for retry in range(max_retries + 1):
        try:
            return attempt()
        except RequestFailed as failure:
            if not failure.retryable:
                raise
            if retry == max_retries:
                raise RequestFailed(f"gave up after {max_retries + 1} attempts; last error: {failure}",
                                    retryable=False, status=failure.status) from failure
            time.sleep(backoff * 2 ** retry)
    raise AssertionError("unreachable")


def snippet(body: bytes | str, width: int = 200) -> str:
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _error_body(error: urllib.error.HTTPError) -> str:
    # The body usually says what is wrong (unknown model, bad key), but reading it may fail in turn.
    try:
        return snippet(error.read() or b"") if error.fp else ""
    except (OSError, http.client.HTTPException):
        return ""


def _content(body: bytes) -> str:
    try:
        reply = json.loads(body)
        content = reply["choices"][0]["message"]["content"]
    except (ValueError, LookupError, TypeError) as error:
        raise RequestFailed(f"the reply is not a chat completion ({type(error).__name__}): {snippet(body)!r}",
                            retryable=True) from error
    if not isinstance(content, str):
        raise RequestFailed(f"the reply has no text content: {snippet(body)!r}", retryable=True)
    return content


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirected POST would become a GET, and would carry the Authorization header to wherever it points.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


# ---------------------------------------------------------------------------------------- validation


def chat_completions_url(url: str, label: str = "endpoint") -> str:
    """`<url>/chat/completions` for a base URL such as http://127.0.0.1:11434/v1."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise AffinerError(f"The {label} URL {url!r} is not an http:// or https:// address. Pass the base URL of an "
                           f"OpenAI-compatible server, for example http://127.0.0.1:11434/v1 for Ollama or "
                           f"https://api.openai.com/v1.")
    return f"{url.strip().rstrip('/')}/chat/completions"


def api_key_from_env(variable: str | None, label: str = "endpoint") -> str | None:
    if variable is None:
        return None
    key = os.environ.get(variable, "").strip()  # a key pasted with a newline would break the header
    if not key:
        raise AffinerError(f"The {label} API key should be in the environment variable {variable}, but {variable} "
                           f"is not set or is empty. Export it first (export {variable}=...), or do not name a key "
                           f"variable if the {label} server needs no key.")
    return key


def _check_settings(settings: EndpointSettings, label: str) -> None:
    problems = []
    if settings.max_retries < 0:
        problems.append(f"max_retries must be 0 or more (got {settings.max_retries})")
    if settings.timeout <= 0:
        problems.append(f"timeout must be more than 0 seconds (got {settings.timeout})")
    if settings.backoff < 0:
        problems.append(f"backoff must be 0 or more seconds (got {settings.backoff})")
    if settings.concurrency < 1:
        problems.append(f"concurrency must be at least 1 (got {settings.concurrency})")
    if problems:
        raise AffinerError(f"Invalid {label} settings: {'; '.join(problems)}.")
    if not settings.model.strip():
        raise AffinerError(f"The {label} model name is empty. Pass the name the server knows the model by, "
                           f"for example gemma3:27b for Ollama.")


# ---------------------------------------------------------------------------------------- the client


class ChatClient:
    """Chat completions from one model at one endpoint, with retries, a reply cache and request counts.

    Thread-safe: `ask` may be called from several threads at once. `label` names the client in error
    messages ("judge", "generation endpoint"); `cache_name` is the cache's folder under $AFFINER_CACHE
    when `settings.cache_dir` names none. `settings.concurrency` is checked here but used by the caller,
    which decides how many threads ask at once.
    """

    def __init__(self, settings: EndpointSettings, cache_name: str = "endpoint", label: str = "endpoint",
                 user_agent: str = "affiner", fail_fast_unreachable: bool = False):
        self.endpoint = chat_completions_url(settings.url, label)
        _check_settings(settings, label)
        self.settings = settings
        self.user_agent = user_agent
        # When nothing listens at the address and the server has never answered, it was most likely never
        # started: retrying for seconds only delays the message. Once it has answered, a refusal may be a restart.
        self.fail_fast_unreachable = fail_fast_unreachable
        self._answered = False
        self._api_key = api_key_from_env(settings.api_key_env, label)
        self._cache = ReplyCache(settings.cache_dir or default_cache_dir(cache_name), label)
        handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
        if is_loopback(urllib.parse.urlsplit(self.endpoint).hostname or ""):
            # A proxy from the environment cannot reach a server on this machine's loopback.
            handlers.append(urllib.request.ProxyHandler({}))
        self._opener = urllib.request.build_opener(*handlers)
        self._count_lock = threading.Lock()
        self.requests_sent = 0  # replies asked of the server (each retry counts once more)
        self.cache_hits = 0  # replies served from the cache instead

    def __repr__(self) -> str:
        return f"ChatClient({self.endpoint!r}, model={self.settings.model!r})"

    @property
    def cache_path(self) -> Path:
        return self._cache.path

    def key(self, messages: list[dict[str, str]], temperature: float = 0.0) -> str:
        return cache_key(self.endpoint, self.settings.model, messages, temperature)

    def ask(self, messages: list[dict[str, str]], temperature: float = 0.0,
            keep: Callable[[str], bool] | None = None) -> str:
        """The reply's text, from the cache or the endpoint; raises RequestFailed (key scrubbed) on failure.

        A reply is cached unless `keep(reply)` says it is useless, so that a rerun asks again instead of
        replaying it.
        """
        key = self.key(messages, temperature)
        cached = self._cache.get(key)
        if cached is not None:
            self._count(hits=1)
            return cached
        request = {"model": self.settings.model, "messages": messages, "temperature": temperature}
        body = json.dumps(request).encode("utf-8")
        try:
            text = with_retries(lambda: self._post(body), self.settings.max_retries, self.settings.backoff)
        except RequestFailed as failure:
            raise RequestFailed(self.scrub(str(failure)), retryable=False, status=failure.status) from None
        if keep is None or keep(text):
            self._cache.put(key, text)
        return text

    def scrub(self, text: str) -> str:
        # A server may echo the request, header included, in its error body.
        return text.replace(self._api_key, "[api key]") if self._api_key else text

    def _count(self, sent: int = 0, hits: int = 0) -> None:
        with self._count_lock:
            self.requests_sent += sent
            self.cache_hits += hits

    def _post(self, body: bytes) -> str:
        self._count(sent=1)
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": self.user_agent}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.settings.timeout) as response:
                self._answered = True
                return _content(response.read())
        except urllib.error.HTTPError as error:
            self._answered = True
            detail = _error_body(error)
            retryable = error.code == 429 or error.code >= 500
            hint = "" if retryable else " (not retried)"
            raise RequestFailed(f"HTTP {error.code} {error.reason} from {self.endpoint}{hint}: {detail!r}",
                                retryable=retryable, status=error.code) from error
        except urllib.error.URLError as error:
            if isinstance(error.reason, TimeoutError):
                raise RequestFailed(f"no connection to {self.endpoint} within {self.settings.timeout:g} s",
                                    retryable=True) from error
            refused = isinstance(error.reason, ConnectionRefusedError)
            retryable = not (refused and self.fail_fast_unreachable and not self._answered)
            raise RequestFailed(f"cannot connect to {self.endpoint}: {error.reason}", retryable=retryable) from error
        except TimeoutError as error:
            raise RequestFailed(f"no reply from {self.endpoint} within {self.settings.timeout:g} s", retryable=True) from error
        except (OSError, http.client.HTTPException) as error:
            # Connection reset, closed mid-reply, truncated body: the server or network hiccuped.
            raise RequestFailed(f"connection to {self.endpoint} failed: {type(error).__name__}: {error}",
                                retryable=True) from error
