"""The client of OpenAI-compatible chat endpoints (Ollama, vLLM, OpenAI, `affiner serve`) that the LLM judge and
`affiner synth --endpoint` share, on the `openai` package, which retries timeouts, dropped connections, HTTP 408,
409, 429 and 5xx (and here garbled replies) after `backoff` seconds doubled each time. Replies are cached in sqlite,
never keyed by the API key. The key goes in the Authorization header alone: redirects are refused (the header would
follow them), the headers openai takes from OPENAI_* variables are dropped, an error that echoes it shows "[api key]".
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable
from contextlib import closing, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx2
import openai

from affiner.core.errors import AffinerError
from affiner.core.files import cache_root
from affiner.core.net import is_loopback, read_api_key

SENT_HEADERS = {"host", "accept", "accept-encoding", "connection", "content-length", "content-type"}


@dataclass(frozen=True)
class EndpointSettings:
    """Where an OpenAI-compatible endpoint is, and how patiently and how widely to ask it."""

    url: str  # base URL, e.g. "http://127.0.0.1:11434/v1"; requests go to <url>/chat/completions
    model: str
    api_key_env: str | None = None  # the NAME of the variable holding the key, so the key never sits in a config
    timeout: float = 60.0  # seconds per request
    max_retries: int = 3  # retries after the first attempt
    backoff: float = 1.0  # first back-off in seconds, doubled after each retry
    concurrency: int = 4  # requests in flight at once (the caller's threads)
    cache_dir: Path | None = None  # None: $AFFINER_CACHE/<the client's cache name> (default ~/.cache/affiner/...)


class RequestFailed(Exception):
    """No usable reply, after every retry that could help; `status` is the HTTP status, if any."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class GarbledReply(httpx2.RequestError):
    """A 2xx reply that is no chat completion: a request error, so that openai retries it as a dropped connection."""


def checked_url(settings: EndpointSettings, label: str) -> str:
    """The base URL without its trailing slash, once it and the other settings are checked."""
    url, s = settings.url.strip(), settings
    if urllib.parse.urlsplit(url).scheme not in {"http", "https"} or not urllib.parse.urlsplit(url).hostname:
        raise AffinerError(f"The {label} URL {settings.url!r} is not an http:// or https:// address. Pass the base "
                           f"URL of an OpenAI-compatible server, e.g. http://127.0.0.1:11434/v1 for Ollama.")
    problems = [f"{name} must be {rule} (got {value})" for name, value, wrong, rule in (
        ("max_retries", s.max_retries, s.max_retries < 0, "0 or more"),
        ("backoff", s.backoff, s.backoff < 0, "0 or more"),
        ("timeout", s.timeout, s.timeout <= 0, "more than 0 seconds"),
        ("concurrency", s.concurrency, s.concurrency < 1, "at least 1"),
        ("model", repr(s.model), not s.model.strip(), "the name the server knows it by, e.g. gemma3:27b")) if wrong]
    if problems:
        raise AffinerError(f"Invalid {label} settings: {'; '.join(problems)}.")
    return url.rstrip("/")


class _OpenAI(openai.OpenAI):
    """openai's client, waiting `delay(retry)` before each retry: openai's own schedule (0.5 s up) has no setting."""

    def __init__(self, delay: Callable[[int], float], **options):
        super().__init__(**options)
        self.delay = delay

    def _calculate_retry_timeout(self, remaining_retries, options, response_headers=None) -> float:
        return self.delay(self.max_retries - remaining_retries)


class ChatClient:
    """Chat completions from one model at one endpoint, with retries, a reply cache and request counts; thread-safe.
    `label` names it in messages ("judge"), `cache_name` its cache folder under $AFFINER_CACHE. With
    `fail_fast_unreachable`, retries do not wait until the server has answered once: one that refuses every
    connection was most likely never started, and waiting would only delay the message."""

    def __init__(self, settings: EndpointSettings, cache_name: str = "endpoint", label: str = "endpoint",
                 user_agent: str = "affiner", fail_fast_unreachable: bool = False):
        base = checked_url(settings, label)
        self.endpoint, self.settings, self.user_agent = f"{base}/chat/completions", settings, user_agent
        self._api_key = read_api_key(settings.api_key_env, f"The {label} key variable")
        self.cache_path = (settings.cache_dir or cache_root() / cache_name) / "replies.sqlite3"
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            self._cache("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply TEXT NOT NULL, created REAL)")
        except (OSError, sqlite3.Error) as error:
            raise AffinerError(f"The {label} cache {self.cache_path} cannot be opened ({error}). Delete the file, or "
                               f"set AFFINER_CACHE to a writable folder.") from error
        self._lock, self._patient = threading.Lock(), not fail_fast_unreachable
        self.requests_sent = self.cache_hits = 0  # each retry counts as one more request sent
        # A proxy from the environment cannot reach a server on this machine's loopback.
        http = httpx2.Client(follow_redirects=False, trust_env=not is_loopback(urllib.parse.urlsplit(base).hostname),
                             event_hooks={"request": [self._sending], "response": [self._received]})
        self._openai = _OpenAI(lambda retry: settings.backoff * 2 ** retry if self._patient else 0.0, base_url=base,
                               api_key="set-per-request", http_client=http, timeout=settings.timeout,
                               max_retries=settings.max_retries)

    def _cache(self, sql: str, *values) -> list[tuple]:
        """One short-lived connection per access, so that threads never share one."""
        with closing(sqlite3.connect(self.cache_path, timeout=30)) as db, db:  # another process may be writing
            return db.execute(sql, values).fetchall()

    def key(self, messages: list[dict[str, str]], temperature: float = 0.0, response_format: dict | None = None) -> str:
        """The reply's cache key: never the API key. Only non-zero temperatures and a response format enter it,
        as replies cached before they did (all at 0, all free text) stay valid."""
        request = {"url": self.endpoint, "model": self.settings.model, "messages": messages}
        request |= {"temperature": temperature} if temperature else {}
        request |= {"response_format": response_format} if response_format else {}
        return hashlib.sha256(json.dumps(request, sort_keys=True).encode("utf-8")).hexdigest()

    def ask(self, messages: list[dict[str, str]], temperature: float = 0.0,
            keep: Callable[[str], bool] | None = None, response_format: dict | None = None) -> str:
        """The reply's text, from the cache or the endpoint; cached unless `keep(reply)` says it is useless.
        `response_format` is chat-completions' own, e.g. {"type": "json_schema", "json_schema": {...}}."""
        key = self.key(messages, temperature, response_format)
        if cached := self._cache("SELECT reply FROM replies WHERE key = ?", key):
            with self._lock:
                self.cache_hits += 1
            return cached[0][0]
        try:
            reply = self._openai.chat.completions.create(model=self.settings.model, messages=messages,
                                                         temperature=temperature,
                                                         response_format=response_format or openai.omit)
        except openai.APIError as error:  # the server may echo the request, Authorization header included
            message = self._describe(error)
            message = message.replace(self._api_key, "[api key]") if self._api_key else message
            raise RequestFailed(message, getattr(error, "status_code", None)) from None
        text = reply.choices[0].message.content
        if keep is None or keep(text):
            self._cache("INSERT OR REPLACE INTO replies VALUES (?, ?, ?)", key, text, time.time())
        return text

    def _sending(self, request: httpx2.Request) -> None:
        with self._lock:
            self.requests_sent += 1
        for name in [name for name in request.headers if name.lower() not in SENT_HEADERS]:
            del request.headers[name]  # openai's own, and those from OPENAI_ORG_ID, OPENAI_CUSTOM_HEADERS...
        request.headers["User-Agent"] = self.user_agent
        if self._api_key:
            request.headers["Authorization"] = f"Bearer {self._api_key}"

    def _received(self, response: httpx2.Response) -> None:
        self._patient = True
        if not response.is_success:
            return
        body = response.read()
        with suppress(ValueError, LookupError, TypeError):
            if isinstance(json.loads(body)["choices"][0]["message"]["content"], str):
                return
        shown = " ".join(body.decode("utf-8", errors="replace").split())[:200]
        raise GarbledReply(f"the reply is not a chat completion with a text content: {shown!r}")

    def _describe(self, error: openai.APIError) -> str:
        gave_up = f"gave up after {self.settings.max_retries + 1} attempts; last error: "
        if isinstance(error, openai.APITimeoutError):
            return f"{gave_up}no reply from {self.endpoint} within {self.settings.timeout:g} s"
        if not isinstance(error, openai.APIStatusError):
            cause = error.__cause__  # the garbled reply, or the connection's own error
            what = cause if isinstance(cause, GarbledReply) else f"cannot connect to {self.endpoint}: {cause}"
            return f"{gave_up}{what}"
        status, response = error.status_code, error.response
        if response.is_redirect:
            return (f"HTTP {status} from {self.endpoint} redirects to {response.headers.get('location')!r}, and "
                    f"redirects are refused (the API key would follow them): pass that address as the URL")
        said = f"HTTP {status} {response.reason_phrase} from {self.endpoint}: {' '.join(response.text.split())[:200]!r}"
        return gave_up + said if status in (408, 409, 429) or status >= 500 else f"{said} (not retried)"
