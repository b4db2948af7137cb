"""Run `affiner ARGS` in this process and kill it with SIGKILL (as `kill -9`, a power cut or the OOM killer
would: no Python clean-up at all) on the Nth call of a function, just before that call does anything.

    python tests/kill_driver.py os.replace:2 train config.yaml     # dies on the second atomic rename
    python tests/kill_driver.py torch.save:3 train config.yaml     # dies while a checkpoint is half-saved
    python tests/kill_driver.py affiner.training.loop.adopt_best:1+ train config.yaml   # dies just after it returns
"""

from __future__ import annotations

import importlib
import os
import signal
import sys


def arm(target: str, nth: int, after: bool = False) -> None:
    module_name, name = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    real, calls = getattr(module, name), [0]

    def dying(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args, **kwargs)
        if calls[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(module, name, dying)


if __name__ == "__main__":
    target, nth = sys.argv[1].rsplit(":", 1)
    arm(target, int(nth.rstrip("+")), after=nth.endswith("+"))
    from affiner import cli

    cli.main(sys.argv[2:])
