"""Training with its held-out probe, and training followed by the before/after evaluation.

Training and evaluation never import each other; this is where they meet, for `train`, `run`
and `sweep`.
"""

from __future__ import annotations

from pathlib import Path

from affiner.core.config import RunConfig
from affiner.evaluation.evaluate import evaluate
from affiner.evaluation.probe import probe_for
from affiner.training import run as training
from affiner.training.processes import Processes


def train(config: RunConfig | None = None, resume: Path | None = None) -> Path:
    """A new run from `config`, or the run folder `resume` continued; probed as eval.every_steps asks."""
    return training.train(config, resume, probe_factory=probe_for)


def train_and_evaluate(config: RunConfig | None = None,
                       resume: Path | None = None) -> tuple[Path, dict | None]:
    """What `affiner run` does: train, then answer the held-out questions with base and tuned. Under
    several processes the main one evaluates alone; the others return None once training is over."""
    folder = train(config, resume)
    if not Processes().is_main:
        return folder, None
    return folder, evaluate(folder)
