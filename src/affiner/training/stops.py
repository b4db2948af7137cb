"""How training stops early: what a stop records, and Ctrl-C handled so that a checkpoint is always of a
whole step."""

from __future__ import annotations

import contextlib
import signal
import sys
from dataclasses import dataclass
from typing import Callable

from affiner.training.processes import Processes


@dataclass
class Stop:
    """Why training stopped early, how to record it, and whether the last completed step can be saved."""

    status: str  # run.json's: interrupted or failed
    together: bool  # every process stopped here (so they can wait for the main one's checkpoint)
    save: bool  # the weights are those of the last completed step (not half-updated, nor lost to a full disk)
    message: Callable[[str], str]  # given what was kept, the paragraph the user reads


class CtrlC:
    """Ctrl-C asks training to stop once the current step is complete, so that the checkpoint holds that
    step's weights and random state exactly (resuming gives what an uninterrupted run gives); a second
    Ctrl-C stops at once."""

    def __init__(self, processes: Processes):
        self.processes, self.asked = processes, False

    def handle(self, signum, frame) -> None:
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        if self.processes.is_main:
            print("\nstopping after this step and saving a checkpoint (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)

    def pressed(self) -> bool:
        """Whether Ctrl-C was pressed in any process (launchers forward it to all, but not always at once)."""
        return self.processes.total(float(self.asked)) > 0 if self.processes.several else self.asked


@contextlib.contextmanager
def ctrl_c_after_step(processes: Processes):
    ctrl_c = CtrlC(processes)
    try:
        previous = signal.signal(signal.SIGINT, ctrl_c.handle)
    except ValueError:  # not the main thread: signals are not ours to handle, Ctrl-C raises as usual
        yield ctrl_c
        return
    try:
        yield ctrl_c
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def ctrl_c_deferred():
    """A second Ctrl-C (the launcher forwards each one) must not cut the checkpoint being saved short."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
