"""Checkpoints: the adapter (or model), optimizer, scheduler and RNG state every train.save_steps steps.

A checkpoint is written into `step-N.partial/` and renamed into place once complete, so a crash while
saving never leaves a checkpoint that `--resume` would trust.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from affiner.core.files import replace_folder
from affiner.core.runfolder import RunFolder
from affiner.training.processes import Processes

STATE_FILE = "trainer_state.pt"
STEP_FILE = "step.json"
RNG_FILE = "rng-{rank}.pt"  # one per process: each draws its own dropout masks


def save_checkpoint(model, optimizer, scheduler, run: RunFolder, step: int, keep: int,
                    processes: Processes | None = None) -> Path:
    """The checkpoint of `step`, written by the main process, each process adding its own random state;
    every process calls it (it waits for the others twice)."""
    processes = processes or Processes()
    target = run.checkpoint_path(step)
    partial = target.with_name(target.name + ".partial")
    if processes.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, partial / STATE_FILE)
        (partial / STEP_FILE).write_text(json.dumps({"step": step}))
    processes.wait()
    torch.save(rng_states(), partial / RNG_FILE.format(rank=processes.rank))
    processes.wait()
    if processes.is_main:
        replace_folder(partial, target)
        for old in run.checkpoints()[:-keep]:
            shutil.rmtree(old)
    return target


def rng_states() -> dict[str, object]:
    """Every random generator training draws from (dropout on the CPU and on each GPU), to resume identically."""
    return {"torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_state(checkpoint: Path, optimizer, scheduler, rank: int = 0) -> int:
    """Optimizer, scheduler and RNG as they were at the checkpoint; returns its step.

    Loaded onto the CPU first (a GPU checkpoint resumes on a CPU too; the optimizer moves its state to
    its parameters' device) and with weights_only, so a crafted checkpoint cannot run code.
    """
    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = _random_state(checkpoint, rank, state)
    torch.set_rng_state(rng["torch_rng"])
    cuda_states = rng.get("cuda_rng") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return json.loads((checkpoint / STEP_FILE).read_text())["step"]


def _random_state(checkpoint: Path, rank: int, state: dict) -> dict:
    """This process's own random state; a checkpoint of fewer processes lends the main one's, and one
    written before there were per-process files has it inside its trainer state."""
    for path in (checkpoint / RNG_FILE.format(rank=rank), checkpoint / RNG_FILE.format(rank=0)):
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)
    return state
