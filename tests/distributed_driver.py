"""Run under `torchrun`: train (or resume) a run in each process, as `affiner train` does, and write what
each process ended with, so that a test can compare processes and runs.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_driver.py CONFIG
    ... tests/distributed_driver.py --resume RUN
    ... tests/distributed_driver.py CONFIG --kill-after-step 3     # SIGKILL the main process then
    ... tests/distributed_driver.py CONFIG --ctrl-c-after-step 3   # SIGINT to the main process then (Ctrl-C)
    ... tests/distributed_driver.py CONFIG --out-of-memory-at-step 3   # in the last process only

Only the main process writes (the run folder, its log, checkpoints and adapter); the run records
whether every process ended with the same weights.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

from affiner.core.config import load_config
from affiner.experiments import workflow
from affiner.training import loop


def main(argv: list[str]) -> None:
    rest = argv
    kill_after = int(rest[rest.index("--kill-after-step") + 1]) if "--kill-after-step" in rest else None
    if kill_after is not None:
        real_log = loop.log_metrics

        def log_then_die(run, record, trackers):
            real_log(run, record, trackers)
            if record["step"] == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)  # as `kill -9` would: no Python clean-up at all

        loop.log_metrics = log_then_die
    if "--ctrl-c-after-step" in rest:
        ctrl_c_after, real_log_metrics = int(rest[rest.index("--ctrl-c-after-step") + 1]), loop.log_metrics

        def log_then_ctrl_c(run, record, trackers):
            real_log_metrics(run, record, trackers)
            if record["step"] == ctrl_c_after:
                os.kill(os.getpid(), signal.SIGINT)  # a terminal's Ctrl-C reaches torchrun; here, the main process

        loop.log_metrics = log_then_ctrl_c
    if "--out-of-memory-at-step" in rest:
        fail_at, real_step = int(rest[rest.index("--out-of-memory-at-step") + 1]), loop.step
        last = os.environ["RANK"] == str(int(os.environ["WORLD_SIZE"]) - 1)

        def step_out_of_memory(trainer, group):
            trainer.steps_done = getattr(trainer, "steps_done", trainer.start_step) + 1
            if last and trainer.steps_done == fail_at:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real_step(trainer, group)

        loop.step = step_out_of_memory
    if rest[0] == "--resume":
        workflow.train(resume=Path(rest[1]))
    else:
        workflow.train(load_config(rest[0]))


if __name__ == "__main__":
    main(sys.argv[1:])
