"""The one exception a user sees: a mistake in their input, reported as a paragraph, exit code 2."""

from __future__ import annotations

from pathlib import Path


class AffinerError(Exception):
    """Bad input (config, data, model name, run folder) the user can fix.

    The CLI prints the message alone, without a traceback, and exits with code 2. Raise it
    before anything is written so that a failed command never leaves a half-written run.
    """

    exit_code = 2


class Incomplete(AffinerError):
    """The command wrote its results, but some are missing (answers a judge or an endpoint could not
    score): the message says how many and why. Exit code 3, so that a script can tell it from success
    and from bad input."""

    exit_code = 3


class SaidElsewhere(AffinerError):
    """A failure another process of the same training (the main one) has already told the user: this process
    only exits, with that failure's exit code, saying nothing more (one paragraph, not one per process)."""

    def __init__(self, exit_code: int):
        super().__init__("")
        self.exit_code = exit_code


def first_line(error: BaseException) -> str:
    """What a library's exception says, in one line for a message of ours (its type when it says nothing)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def damaged(what: str, folder: Path, exc: Exception) -> AffinerError:
    """A local file that exists but cannot be read whole (a copy cut short, a disk error)."""
    return AffinerError(f"the {what} in {folder} cannot be read ({first_line(exc)}): the files are damaged or "
                        "incomplete (a copy or download cut short?). Copy them again, or point to another folder.")
