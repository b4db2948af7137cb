"""Network facts shared by the endpoint client and the server: loopback addresses, API keys."""

from __future__ import annotations

import ipaddress
import os

from affiner.core.errors import AffinerError


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_key(variable: str | None, named_by: str = "--api-key-env") -> str | None:
    """The key held by the environment variable `variable` (None without one), stripped: a key pasted with its
    newline would break the header. An unset or blank variable is an error, not a quiet keyless run."""
    key = os.environ.get(variable, "").strip() if variable else None
    if variable and not key:
        raise AffinerError(f"{named_by} {variable}: the environment variable {variable} should hold the API key, but "
                           f"it is not set or is empty. Set it first (export {variable}=...), or name no variable if "
                           "no key is wanted.")
    return key
