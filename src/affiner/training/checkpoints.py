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

STATE_FILE = "trainer_state.pt"
STEP_FILE = "step.json"


def save_checkpoint(model, optimizer, scheduler, run: RunFolder, step: int, keep: int) -> Path:
    target = run.checkpoint_path(step)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, partial / STATE_FILE)
    (partial / STEP_FILE).write_text(json.dumps({"step": step}))
    replace_folder(partial, target)
    for old in run.checkpoints()[:-keep]:
        shutil.rmtree(old)
    return target


def restore_state(checkpoint: Path, optimizer, scheduler) -> int:
    """Optimizer, scheduler and RNG as they were at the checkpoint; returns its step."""
    state = torch.load(checkpoint / STATE_FILE, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return json.loads((checkpoint / STEP_FILE).read_text())["step"]
