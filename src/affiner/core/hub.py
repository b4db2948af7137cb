"""Where weights come from: the Hugging Face Hub's endpoint, whether it can be reached, what transformers
is told about it, and the one error a user sees when a model or dataset cannot be had."""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from affiner.core.errors import AffinerError, first_line


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def endpoint_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """A TCP connection within `timeout`: seconds instead of a minute of HTTP retries when offline."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}:
        return False
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)),
                                      timeout=timeout):
            return True
    except (OSError, TypeError):
        return False


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    return endpoint_reachable(hub_endpoint(), timeout)


def hub_kwargs(name: str) -> dict:
    """Hub ids load from the local cache alone when the Hub cannot be reached, instead of retrying for a minute."""
    return {} if Path(name).exists() or hub_reachable() else {"local_files_only": True}


def hub_error(what: str, name: str, exc: Exception) -> AffinerError:
    reason = "the Hugging Face Hub is unreachable from this machine and it is not in the local cache" \
        if not hub_reachable() else "the Hub has no such repository, or it needs a token (set HF_TOKEN)"
    instead = ("a local JSON, JSONL, CSV or Parquet file, a folder `affiner prepare` wrote, or a set affiner ships "
               "(embedded:instruct-train.json, embedded:glossary-train.json)" if what == "dataset"
               else "a local folder, a .gguf file or embedded:gemma-3-270m")
    return AffinerError(f"cannot load {what} '{name}': {reason}. Use {instead} instead. ({first_line(exc)})")


def hub_options(revision: str | None = None, trust_remote_code: bool = False) -> dict:
    """What transformers is told about where the weights come from: a pinned revision, remote code."""
    options: dict = {}
    if revision:
        options["revision"] = revision
    if trust_remote_code:
        # Code from the model's repository runs on this machine: only when asked, and never silently.
        print("note: model.trust_remote_code is on: the model repository's own Python code will run.")
        options["trust_remote_code"] = True
    return options
