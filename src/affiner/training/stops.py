"""How training stops early: what a stop records, and Ctrl-C handled so that a checkpoint is always of a
whole step."""

from __future__ import annotations

import contextlib
import signal
import sys
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Callable, NoReturn

import torch

from affiner.core.config import RunConfig
from affiner.core.devices import device
from affiner.core.errors import AffinerError
from affiner.core.runfolder import FAILED, RunFolder
from affiner.training.checkpoints import save_checkpoint
from affiner.training.processes import Processes


class Interrupted(AffinerError):
    """Training stopped by Ctrl-C; the message says how to resume (a sweep tells it from other failures)."""

    exit_code = 130  # what a shell expects of a program stopped by Ctrl-C


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

    def __init__(self, processes: Processes, note: str):
        self.processes, self.asked, self.note = processes, False, note

    def handle(self, signum, frame) -> None:
        if self.asked and signum == signal.SIGTERM:
            # The same request again: Slurm signals every process of a job, and torchrun forwards it to each too.
            return
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        if self.processes.is_main:
            asked = "asked to stop (SIGTERM): " if signum == signal.SIGTERM else ""
            print(f"\n{asked}{self.note} (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def pressed(self) -> bool:
        """Whether Ctrl-C was pressed in any process (launchers forward it to all, but not always at once)."""
        return self.processes.total(float(self.asked)) > 0 if self.processes.several else self.asked


# SIGTERM is how a machine asks a job to stop: a Slurm time limit, a Kubernetes pod or a container being stopped,
# `kill`, a notebook's "stop". It is taken as a Ctrl-C: the step ends and is saved (before the SIGKILL that follows
# after a grace period, 30 s by default on Slurm and Kubernetes), rather than losing every step since the last
# train.save_steps checkpoint.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def ctrl_c_after_step(processes: Processes, note: str = "stopping after this step and saving a checkpoint"):
    ctrl_c = CtrlC(processes, note)
    with _signals_handled_by(ctrl_c.handle):
        yield ctrl_c


@contextlib.contextmanager
def ctrl_c_deferred():
    """A second Ctrl-C (the launcher forwards each one) must not cut the checkpoint being saved short."""
    with _signals_handled_by(signal.SIG_IGN):
        yield


@contextlib.contextmanager
def _signals_handled_by(handler) -> Iterator[None]:
    try:
        previous = {number: signal.signal(number, handler) for number in STOP_SIGNALS}
    except ValueError:  # not the main thread: signals are not ours to handle, Ctrl-C raises as usual
        yield
        return
    try:
        yield
    finally:
        for number, before in previous.items():
            signal.signal(number, before)


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


def stop_training(trainer, run: RunFolder, completed: int, trackers, stop: Stop) -> NoReturn:
    """Keep the last step as a checkpoint (if its probe, log and checkpoint were done, so that the resumed run
    redoes nothing and skips nothing, and if its weights are finite), mark the run, say why and how to go on.
    When every process stopped here (`stop.together`: Ctrl-C, a diverged loss), every one takes part in the save,
    each with its own random state; otherwise (out of memory, perhaps in one process) the main process saves
    alone: a collective save could wait forever for a process that is gone."""
    _free_memory(trainer)
    processes = trainer.processes
    # Sharded weights or a partitioned optimizer state can only be saved by every process together: then the
    # last train.save_steps checkpoint is what is kept.
    saved = stop.save and completed == trainer.recorded > trainer.start_step and not processes.partitioned and \
        all(bool(torch.isfinite(p).all()) for p in trainer.params)
    if saved and (stop.together or processes.is_main):
        with ctrl_c_deferred():
            save_checkpoint(trainer, run, completed, trainer.config.train.save_total_limit, alone=not stop.together,
                            rng=trainer.rng)
    last = run.last_checkpoint()
    kept = (f"the weights of {last.name} are kept (affiner train --resume {run} continues from there)" if last
            else "no good step was saved, so there is nothing to resume")
    text = stop.message(kept)
    # A failure in one process only (out of memory) is recorded by that process: the main one, waiting for
    # it in a collective, will be stopped by the launcher before it can write anything.
    if processes.is_main or not stop.together:
        run.update(status=stop.status, step=trainer.recorded, **({"error": text} if stop.status == FAILED else {}))
    if processes.is_main:
        trackers.close(run.path, stop.status)
    if stop.together:
        processes.wait()
    raise (Interrupted if stop.status == "interrupted" else AffinerError)(text) from None


def _free_memory(trainer) -> None:
    trainer.optimizer.zero_grad(set_to_none=True)  # half-computed gradients hold the memory a save needs
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif torch.backends.mps.is_available():
        torch.mps.empty_cache()
