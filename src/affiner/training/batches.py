"""Which rows go into which step: seeded, resumable batch order and the number of optimizer steps."""

from __future__ import annotations

import math
import random
from typing import Iterator

from affiner.core.config import RunConfig


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """One epoch's batches of row indices, a pure function of (seed, epoch) so a resumed run sees the same order."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        # Sort within large shuffled windows: similar lengths share a batch (less padding) while the
        # order stays random at the scale of the epoch.
        window = batch_size * 50
        order = [i for s in range(0, len(order), window)
                 for i in sorted(order[s:s + window], key=lambda i: -lengths[i])]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def micro_batches(lengths: list[int], batch_size: int, seed: int, group_by_length: bool) -> Iterator[list[int]]:
    epoch = 0
    while True:
        yield from epoch_batches(lengths, batch_size, seed, epoch, group_by_length)
        epoch += 1


# train.epochs: auto. Small data needs many passes to be learned (30 glossary rows at batch 8 give 12 steps in 3
# passes, and the model then recalls a third of them); large data is learned in one pass or less.
AUTO_MIN_STEPS = 90  # optimizer steps a small set gets at least: what the 240-row quickstart needs in 3 passes
AUTO_MIN_PASSES = 3
AUTO_MAX_PASSES = 30  # a handful of rows is not repeated without end
AUTO_LARGE_STEPS = 3000  # data that gives this many steps in 3 passes gets this many steps (at least one pass)
PROBES_PER_RUN = 10  # eval.every_steps: auto


def auto_epochs(steps_per_epoch: float) -> float:
    """The passes `train.epochs: auto` makes over data that gives `steps_per_epoch` optimizer steps per pass."""
    if steps_per_epoch * AUTO_MIN_PASSES > AUTO_LARGE_STEPS:
        return max(1.0, AUTO_LARGE_STEPS / steps_per_epoch)
    return float(min(AUTO_MAX_PASSES, max(AUTO_MIN_PASSES, math.ceil(AUTO_MIN_STEPS / steps_per_epoch))))


def steps_per_epoch(config: RunConfig, n_rows: int, processes: int = 1) -> float:
    return math.ceil(n_rows / (config.train.batch_size * processes)) / config.train.gradient_accumulation


def epochs_of(config: RunConfig, n_rows: int, processes: int = 1) -> float:
    """train.epochs, or what `auto` makes of it for this data and batch."""
    epochs = config.train.epochs
    return auto_epochs(steps_per_epoch(config, n_rows, processes)) if epochs == "auto" else epochs


def passes_of(config: RunConfig, n_rows: int, steps: int, processes: int = 1) -> float:
    """The passes over the rows that `steps` optimizer steps make: every step takes its full accumulation, so
    the last pass may reach into another (211 rows, 8 a micro-batch, 16 accumulated: 1 epoch asked, 2 steps,
    1.185 passes)."""
    return steps * config.train.gradient_accumulation / math.ceil(n_rows / (config.train.batch_size * processes))


def global_batch(config: RunConfig, processes: int) -> int:
    """Rows per optimizer step: train.batch_size is per device (per process)."""
    return config.train.batch_size * config.train.gradient_accumulation * processes


def total_steps(config: RunConfig, n_rows: int, processes: int = 1) -> int:
    """Optimizer steps of the run: train.max_steps, else train.epochs over the rows, at the global batch size."""
    if config.train.max_steps:
        return config.train.max_steps
    return max(1, math.ceil(epochs_of(config, n_rows, processes) * steps_per_epoch(config, n_rows, processes)))


def probe_interval(config: RunConfig, steps: int) -> int | None:
    """Steps between held-out probes: eval.every_steps, `auto` spreading PROBES_PER_RUN over the run."""
    every = config.eval.every_steps
    return max(1, math.ceil(steps / PROBES_PER_RUN)) if every == "auto" else every
