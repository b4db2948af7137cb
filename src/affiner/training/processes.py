"""The processes one training runs in, through Hugging Face Accelerate: one (CPU, GPU, Apple MPS), or N
launched by `torchrun --nproc_per_node N` or `accelerate launch` (data-parallel, DDP).

Every process trains on its share of each global batch; the main process alone writes the run folder,
the log, the trackers, the checkpoints and the adapter. With one process every call here is the
identity, so single-device training is exactly what it was.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch


@dataclass
class Processes:
    """This process's place among the training processes, and the few collective operations training needs.

    The launcher says how many there are (WORLD_SIZE, RANK: torchrun and accelerate launch set them);
    Accelerate is only started when there are several, so one process runs exactly as before.
    """

    count: int = field(default_factory=lambda: int(os.environ.get("WORLD_SIZE", "1")))
    rank: int = field(default_factory=lambda: int(os.environ.get("RANK", "0")))

    @cached_property
    def accelerator(self):
        from accelerate import Accelerator

        from affiner.core.models import device

        # Precision stays affiner's own (autocast + scaler in the loop), so Accelerate is told nothing of it.
        # On CPUs Accelerate only starts its process group (gloo) when told it runs on the CPU.
        return Accelerator(cpu=device().type == "cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.count > 1

    def main_first(self) -> contextlib.AbstractContextManager:
        """The main process goes first (a Hub download, a GGUF conversion), the others then find it done."""
        return self.accelerator.main_process_first() if self.several else contextlib.nullcontext()

    def share(self, value: Any) -> Any:
        """The main process's `value`, on every process (a run folder's path, say)."""
        if not self.several:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def total(self, value: float) -> float:
        """The sum of `value` over every process."""
        if not self.several:
            return value
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, reduction="sum").item())

    def wait(self) -> None:
        if self.several:
            self.accelerator.wait_for_everyone()

    def close(self, wait: bool = True) -> None:
        """Leave the process group once training is over: what follows (the evaluation) is the main
        process's alone, and a group left open aborts the interpreter at exit. After a failure the others
        may be gone already: then nobody is waited for."""
        if self.several and torch.distributed.is_initialized():
            if wait:
                self.accelerator.wait_for_everyone()
            torch.distributed.destroy_process_group()

    def wrap(self, model, optimizer):
        """The model ready for data-parallel training (DDP wraps it; one process leaves it as it is)."""
        if not self.several:
            return model, optimizer
        return self.accelerator.prepare(model, optimizer)

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model) if self.several else model

    def no_sync(self, model, last: bool) -> contextlib.AbstractContextManager:
        """Gradients are averaged across processes on the last micro-batch of a step only."""
        if not self.several or last:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def share_of(self, rows: list[int]) -> list[int]:
        """This process's contiguous part of a global batch (as even as the rows allow)."""
        per, extra = divmod(len(rows), self.count)
        start = self.rank * per + min(self.rank, extra)
        return rows[start:start + per + (self.rank < extra)]
