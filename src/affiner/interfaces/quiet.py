"""What transformers, peft and bitsandbytes print for their developers, kept out of a user's terminal while a model
loads or answers (the page, the chat)."""

from __future__ import annotations

import logging
import threading


class QuietLibraries:
    """While inside: what transformers, peft and bitsandbytes print for their developers (progress bars of a load
    the page shows with its own spinner, generation flags, a missing optional kernel) stays out of the terminal.
    The page's sessions generate in parallel threads: the levels are restored when the last one leaves, not when
    the first does."""

    LOGGERS = ("bitsandbytes", "peft")

    def __init__(self):
        self.lock, self.inside, self.saved = threading.Lock(), 0, {}

    def __enter__(self) -> None:
        from transformers.utils import logging as transformers_logging

        with self.lock:
            if self.inside == 0:
                self.saved = {"verbosity": transformers_logging.get_verbosity(),
                              "bars": transformers_logging.is_progress_bar_enabled(),
                              **{name: logging.getLogger(name).level for name in self.LOGGERS}}
                transformers_logging.set_verbosity_error()
                transformers_logging.disable_progress_bar()
                for name in self.LOGGERS:
                    logging.getLogger(name).setLevel(logging.ERROR)
            self.inside += 1

    def __exit__(self, *exc) -> None:
        from transformers.utils import logging as transformers_logging

        with self.lock:
            self.inside -= 1
            if self.inside == 0:
                transformers_logging.set_verbosity(self.saved["verbosity"])
                if self.saved["bars"]:
                    transformers_logging.enable_progress_bar()
                for name in self.LOGGERS:
                    logging.getLogger(name).setLevel(self.saved[name])


quiet_libraries = QuietLibraries()
