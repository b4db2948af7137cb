"""Checkpoints: the adapter (or model), optimizer, scheduler and RNG state every train.save_steps steps (`auto`: by
the clock, `checkpoint_due`).

A checkpoint is written into `step-N.partial/` and renamed into place once complete, so a crash while
saving never leaves a checkpoint that `--resume` would trust.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError

from affiner.core.card import CARD_FILE, write_run_card
from affiner.core.errors import AffinerError, first_line
from affiner.core.files import replace_folder, usual_permissions
from affiner.core.runfolder import RUN_FILE, RunFolder
from affiner.training.processes import Processes

STATE_FILE = "trainer_state.pt"
STEP_FILE = "step.json"
RNG_FILE = "rng-{rank}.pt"  # one per process: each draws its own dropout masks
OPTIMIZER_FILE = "optimizer-{rank}.pt"  # one per process under DeepSpeed ZeRO: each holds a partition


# `train.save_steps: auto`: what a kill -9 (the kernel's out-of-memory killer, a lost machine) may cost at most,
# unless writing a checkpoint is slow (a full fine-tune's weights and optimizer state: gigabytes), when the wait
# grows to AUTO_SAVE_SHARE times the last write so that writing never takes more than about 1/20 of the time.
AUTO_SAVE_SECONDS = 600.0
AUTO_SAVE_SHARE = 20


def checkpoint_due(save_steps: int | str | None, step: int, waited: float, last_write: float) -> bool:
    """Whether `step` gets a checkpoint: every `save_steps` steps, or (`auto`) once `waited` seconds of training
    passed since the last checkpoint, or since training began, given how long that one took to write."""
    if save_steps == "auto":
        return waited >= max(AUTO_SAVE_SECONDS, AUTO_SAVE_SHARE * last_write)
    return bool(save_steps) and step % int(save_steps) == 0


# How torch's and safetensors' writers word a failed write (they raise their own errors, naming no file).
WRITE_FAILURES = ("unexpected pos", "file write failed", "no space left", "os error 28", "storagefull", "ioerror")


@contextmanager
def written_to(folder: Path) -> Iterator[None]:
    """A failed write while saving weights (a full disk, mostly) as the OSError naming `folder` that the training
    loop stops on cleanly (the last good checkpoint kept) and the command line explains: torch.save raises a
    RuntimeError ("unexpected pos"), safetensors a SafetensorError."""
    try:
        yield
    except (RuntimeError, SafetensorError) as error:
        if not any(sign in str(error).lower() for sign in WRITE_FAILURES):
            raise
        said = str(error).lower()
        full = any(sign in said for sign in ("no space", "os error 28", "storagefull")) or _nearly_full(folder)
        code = errno.ENOSPC if full else errno.EIO
        raise OSError(code, os.strerror(code), str(folder)) from error


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder if folder.exists() else folder.parent).free < 64 << 20
    except OSError:
        return False


def save_model(model, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """The adapter (or the full model) in plain peft/transformers format; `state` is the whole state dict
    gathered from sharded processes, keyed as the loss module holds the model (model.<name>).

    peft leaves a placeholder README.md that names the base by its local cache path: the run folder gets
    affiner's card of the run instead, and a checkpoint none."""
    with written_to(folder):
        if state is None:
            model.save_pretrained(folder)
        else:
            model.save_pretrained(folder, state_dict={key.removeprefix("model."): v for key, v in state.items()})
        usual_permissions(folder)
    if (folder / RUN_FILE).is_file():
        write_run_card(folder)
    else:
        (folder / CARD_FILE).unlink(missing_ok=True)


def save_checkpoint(trainer, run: RunFolder, step: int, keep: int, alone: bool = False,
                    rng: dict | None = None) -> Path:
    """The checkpoint of `step`: weights, optimizer (and fp16's gradient scale) written by the main process
    (gathered from the shards first when sharded), and each process's own random state, `rng` if given, else the
    current one (and, under DeepSpeed, its partition of the optimizer state). Every process calls it, unless
    `alone` (the main process, after the others may have stopped: not when partitioned)."""
    processes = Processes(count=1, rank=0) if alone else trainer.processes
    target = run.checkpoint_path(step)
    partial = target.with_name(target.name + ".partial")
    state = processes.full_state(trainer.loss)
    optimizer = processes.optimizer_state(trainer.loss, trainer.optimizer)
    if processes.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        save_model(trainer.model, partial, state)
        with written_to(partial):
            torch.save({"optimizer": None if processes.deepspeed else optimizer,
                        "scheduler": trainer.scheduler.state_dict(),
                        **({"scaler": trainer.scaler.state_dict()} if trainer.scaler is not None else {})},
                       partial / STATE_FILE)
        (partial / STEP_FILE).write_text(json.dumps({"step": step, "seconds": round(trainer.elapsed(), 1)}))
    processes.wait()
    with written_to(partial):
        torch.save(rng if rng is not None else rng_states(), partial / RNG_FILE.format(rank=processes.rank))
        if processes.deepspeed:
            torch.save(optimizer, partial / OPTIMIZER_FILE.format(rank=processes.rank))
    processes.wait()
    if processes.is_main:
        replace_folder(partial, target)
        for old in run.checkpoints()[:-keep]:
            shutil.rmtree(old)
    processes.wait()  # every process returns with the checkpoint in place (one failing next names it)
    return target


def save_best(trainer, run: RunFolder) -> None:
    """The weights just probed as the best so far, in `run.best_path` (written aside, then moved into place);
    every process calls it (sharded weights are gathered first)."""
    state = trainer.processes.full_state(trainer.loss)
    if trainer.processes.is_main:
        partial = run.best_path.with_name(run.best_path.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        save_model(trainer.model, partial, state)
        replace_folder(partial, run.best_path)
    trainer.processes.wait()


def adopt_best(run: RunFolder) -> None:
    """The best step's weights become the run's: its files replace the last step's in the run folder. They stay
    aside too until the run is recorded finished: killed before that, the resumed run adopts them again."""
    for path in sorted(run.best_path.iterdir()):
        if path.is_file():
            # Named as every temporary file (pid): one a kill leaves is removed when the run is resumed.
            partial = run.path / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial"
            shutil.copyfile(path, partial)
            partial.replace(run.path / path.name)  # each file whole or not at all


def rng_states() -> dict[str, object]:
    """Every random generator training draws from (dropout on the CPU and on each GPU), to resume identically."""
    return {"torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_state(checkpoint: Path, module, optimizer, scheduler, processes: Processes, scaler=None) -> int:
    """Optimizer, scheduler, fp16's gradient scaler and RNG as they were at the checkpoint; returns its step.

    Loaded onto the CPU first (a GPU checkpoint resumes on a CPU too; the optimizer moves its state to
    its parameters' device) and with weights_only, so a crafted checkpoint cannot run code: a file that
    holds anything but tensors and plain values is refused, as a damaged one is.
    """
    state = _load(checkpoint / STATE_FILE)
    if processes.deepspeed:
        state["optimizer"] = _load(checkpoint / OPTIMIZER_FILE.format(rank=processes.rank))
    try:
        processes.load_optimizer_state(module, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and "scaler" in state:  # the scale it had grown or backed off to, not a new one's
            scaler.load_state_dict(state["scaler"])
        rng = _random_state(checkpoint, processes.rank, state)
        torch.set_rng_state(rng["torch_rng"])
        step = json.loads((checkpoint / STEP_FILE).read_text())["step"]
    except (KeyError, ValueError, TypeError, RuntimeError, OSError) as error:
        raise _damaged(checkpoint, error) from None
    cuda_states = rng.get("cuda_rng") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return step


def checkpoint_seconds(checkpoint: Path) -> float:
    """Seconds of training up to the checkpoint, so that a resumed run's time counts them (0 if not recorded)."""
    try:
        return float(json.loads((checkpoint / STEP_FILE).read_text()).get("seconds", 0.0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0.0


def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as error:
        raise _damaged(path.parent, error, path) from None


def _damaged(checkpoint: Path, error: Exception, path: Path | None = None) -> AffinerError:
    return AffinerError(f"checkpoint {checkpoint} cannot be resumed from: {path or 'a file in it'} is damaged or "
                        f"holds more than weights ({first_line(error)[:200]}). Delete that checkpoint folder to resume "
                        "from the one before it, or start a new run.")


def _random_state(checkpoint: Path, rank: int, state: dict) -> dict:
    """This process's own random state; a checkpoint of fewer processes lends the main one's, and one
    written before there were per-process files has it inside its trainer state."""
    for path in (checkpoint / RNG_FILE.format(rank=rank), checkpoint / RNG_FILE.format(rank=0)):
        if path.is_file():
            return _load(path)
    return state
