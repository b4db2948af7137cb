"""The one exception a user sees: a mistake in their input, reported as a paragraph, exit code 2."""

from __future__ import annotations


class AffinerError(Exception):
    """Bad input (config, data, model name, run folder) the user can fix.

    The CLI prints the message alone, without a traceback, and exits with code 2. Raise it
    before anything is written so that a failed command never leaves a half-written run.
    """

    exit_code = 2
