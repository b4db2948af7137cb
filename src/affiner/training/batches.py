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


def total_steps(config: RunConfig, n_rows: int, processes: int = 1) -> int:
    """Optimizer steps of the run: train.max_steps, else train.epochs over the rows, at the global batch size."""
    if config.train.max_steps:
        return config.train.max_steps
    per_epoch = math.ceil(n_rows / (config.train.batch_size * processes))
    return max(1, math.ceil(config.train.epochs * per_epoch / config.train.gradient_accumulation))
