"""How training stops early: what a stop records, and Ctrl-C handled so that a checkpoint is always of a
whole step."""

from __future__ import annotations

import contextlib
import signal
import sys
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Callable

import torch

from affiner.core.config import RunConfig
from affiner.core.devices import device
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


def diverged_message(config: RunConfig, learning_rate: float, run: object, completed: int, reason: str,
                     kept: str) -> str:
    return (f"training stopped at step {completed + 1} of {run}: {reason} (learning rate {learning_rate:.2e}), so "
            f"that step was not applied; {kept}. Lower train.learning_rate (now {config.train.learning_rate:g}), "
            "keep train.max_grad_norm set, train in fp32 or bf16 rather than fp16 (model.precision), and look for "
            "unusual rows in the data; then start a new run.")


@contextlib.contextmanager
def cpu_allocation_failures_as_out_of_memory() -> Iterator[None]:
    """A failed CPU allocation, which torch raises as a plain RuntimeError ("DefaultCPUAllocator: can't allocate
    memory"), raised as torch.OutOfMemoryError, as a GPU's is: training then stops on either the same way."""
    try:
        yield
    except RuntimeError as error:
        if isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" not in str(error):
            raise
        raise torch.OutOfMemoryError(str(error)) from error


def out_of_memory_message(config: RunConfig, run: object, completed: int, kept: str) -> str:
    return (f"out of memory on {device()} at step {completed + 1} of {run}: {config.train.batch_size} rows per "
            f"micro-batch of up to {config.data.max_length} tokens did not fit; {kept}. "
            "Lower train.batch_size (raise train.gradient_accumulation to keep the same batch), lower "
            "data.max_length, set train.gradient_checkpointing: true, or use method: qlora (a 4-bit base); "
            "then start a new run with those settings.")
