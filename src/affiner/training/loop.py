"""The training loop, explicit: micro-batches, gradient accumulation, clipping, logging, checkpoints.

    for step in steps:
        gradients of `gradient_accumulation` micro-batches (loss on answer tokens only)
        clip, optimizer step, scheduler step
        log (and probe a held-out sample every eval.every_steps steps), checkpoint every save_steps

Ctrl-C saves a checkpoint at the last completed step, so `affiner train --resume RUN` continues.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from affiner.core.config import RunConfig
from affiner.core.errors import AffinerError
from affiner.core.loss import supervised_loss, supervised_tokens
from affiner.core.models import compute_dtype, describe, device
from affiner.core.runfolder import FINISHED, RunFolder
from affiner.core.tracking import Trackers
from affiner.data.tokens import collate
from affiner.training.batches import micro_batches, total_steps
from affiner.training.checkpoints import restore_state, save_checkpoint
from affiner.training.setup import make_optimizer, make_scheduler, prepare_model

Probe = Callable[[Any], dict[str, float]]  # model -> held-out scores, logged with the step
FAILED = "failed"


class Diverged(Exception):
    """The loss or the gradients stopped being finite; the step was not applied to the weights."""


def accumulate_gradients(model, batches: list[dict[str, torch.Tensor]], autocast=None,
                         scaler=None) -> tuple[float, int]:
    """Backward over micro-batches as if they were one batch; returns (summed loss, supervised tokens).

    Each micro-batch's summed loss is divided by the token count of the whole group, not its own,
    so accumulating k micro-batches gives exactly the gradient of one batch k times larger.
    """
    n_tokens = sum(supervised_tokens(b) for b in batches)
    total = 0.0
    for batch in batches:
        batch = {k: v.to(device()) for k, v in batch.items()}
        with autocast or contextlib.nullcontext():
            loss_sum, _ = supervised_loss(model, batch)
        loss = loss_sum / max(n_tokens, 1)
        (scaler.scale(loss) if scaler else loss).backward()
        total += float(loss_sum.detach())
    return total, n_tokens


@dataclass
class Trainer:
    """What one run trains with; built by `setup`, stepped by `step`."""

    config: RunConfig
    model: Any
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps: int
    start_step: int
    autocast: Any
    scaler: Any


def setup(config: RunConfig, run: RunFolder, n_rows: int, checkpoint: Path | None) -> Trainer:
    torch.manual_seed(config.train.seed)
    model = prepare_model(config, checkpoint)
    print(describe(model))
    params = [p for p in model.parameters() if p.requires_grad]
    steps = total_steps(config, n_rows)
    print(f"Training {config.model.base} ({config.method}) on {n_rows} rows for {steps} steps of "
          f"{config.train.batch_size * config.train.gradient_accumulation} rows; run folder {run}")
    optimizer = make_optimizer(config, params)
    scheduler = make_scheduler(config, optimizer, steps)
    start_step = 0
    if checkpoint is not None:
        start_step = restore_state(checkpoint, optimizer, scheduler)
        print(f"Resuming {run} at step {start_step} of {steps} from {checkpoint.name}.")
    dtype = compute_dtype(config.model.precision)
    on_gpu = device().type == "cuda"
    autocast = torch.autocast("cuda", dtype=dtype) if on_gpu and dtype != torch.float32 else contextlib.nullcontext()
    scaler = torch.amp.GradScaler("cuda") if on_gpu and dtype == torch.float16 else None
    return Trainer(config, model, params, optimizer, scheduler, steps, start_step, autocast, scaler)


def step(trainer: Trainer, group: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """One optimizer step over a group of micro-batches; returns what the log records of it."""
    total, n_tokens = accumulate_gradients(trainer.model, group, trainer.autocast, trainer.scaler)
    if not math.isfinite(total):
        trainer.optimizer.zero_grad(set_to_none=True)
        raise Diverged(f"the loss is {total / max(n_tokens, 1)}")
    if trainer.scaler:
        trainer.scaler.unscale_(trainer.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainer.params, trainer.config.train.max_grad_norm or float("inf"))
    # With fp16's gradient scaler, infinite gradients only make it skip the step and lower its scale.
    if trainer.scaler is None and not torch.isfinite(grad_norm):
        trainer.optimizer.zero_grad(set_to_none=True)
        raise Diverged(f"the gradient norm is {float(grad_norm)}")
    if trainer.scaler:
        trainer.scaler.step(trainer.optimizer)
        trainer.scaler.update()
    else:
        trainer.optimizer.step()
    trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return {"loss": round(total / max(n_tokens, 1), 5), "learning_rate": trainer.scheduler.get_last_lr()[0],
            "grad_norm": round(float(grad_norm), 4), "tokens": n_tokens}


def log_metrics(run: RunFolder, record: dict, trackers: Trackers | None) -> None:
    run.append_log(record)
    if trackers:
        trackers.log(record)


def loop(config: RunConfig, run: RunFolder, features: list[dict], pad_id: int, checkpoint: Path | None,
         probe: Probe | None = None) -> None:
    """Train to the last step; `probe(model)`, when given, scores a held-out sample every eval.every_steps steps."""
    trainer = setup(config, run, len(features), checkpoint)
    train, accumulation = config.train, config.train.gradient_accumulation
    batches = micro_batches([len(f["input_ids"]) for f in features], train.batch_size, train.seed,
                            train.group_by_length)
    for _ in range(trainer.start_step * accumulation):  # the resumed run sees the batches it would have seen
        next(batches)
    trackers = Trackers(config, run.path, run.info())
    run.update(**trackers.run_info)
    per_epoch = math.ceil(len(features) / train.batch_size)
    started = time.time()
    progress = tqdm(range(trainer.start_step, trainer.steps), initial=trainer.start_step, total=trainer.steps,
                    desc="training", unit="step")
    completed = trainer.start_step
    try:
        for index in progress:
            group = [collate([features[i] for i in next(batches)], pad_id) for _ in range(accumulation)]
            record = {"step": index + 1, "epoch": round((index + 1) * accumulation / per_epoch, 3),
                      **step(trainer, group), "seconds": round(time.time() - started, 1)}
            completed = index + 1
            progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['learning_rate']:.1e}")
            _after_step(trainer, run, record, probe, trackers)
    except KeyboardInterrupt:
        progress.close()
        _stop(trainer, run, completed, trackers, "interrupted",
              lambda kept: f"training interrupted after step {completed}; continue with: affiner train --resume {run}")
    except Diverged as diverged:
        progress.close()
        reason = str(diverged)
        _stop(trainer, run, completed, trackers, FAILED,
              lambda kept: _diverged_message(trainer, run, completed, reason, kept))
    except torch.OutOfMemoryError:
        progress.close()
        trainer.optimizer.zero_grad(set_to_none=True)  # the half-computed gradients hold the memory a save needs
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _stop(trainer, run, completed, trackers, FAILED,
              lambda kept: _out_of_memory_message(trainer, run, completed, kept))
    progress.close()
    trainer.model.save_pretrained(run.path)  # adapter_model.safetensors + adapter_config.json, or the full model
    run.update(status=FINISHED, steps=trainer.steps, train_seconds=round(time.time() - started, 1),
               finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    trackers.close(run.path, FINISHED)  # the curves, then the artifacts: the adapter and the finished run.json


def _after_step(trainer: Trainer, run: RunFolder, record: dict, probe: Probe | None, trackers: Trackers) -> None:
    """Probe, log and checkpoint as the config asks, at the step just completed."""
    config, done = trainer.config, record["step"]
    last = done == trainer.steps
    probing = probe is not None and (done % config.eval.every_steps == 0 or last)
    if probing:
        record.update(probe(trainer.model))
    if probing or done % config.train.logging_steps == 0 or last:
        log_metrics(run, record, trackers)
    if config.train.save_steps and done % config.train.save_steps == 0 and not last:
        save_checkpoint(trainer.model, trainer.optimizer, trainer.scheduler, run, done, config.train.save_total_limit)


def _stop(trainer: Trainer, run: RunFolder, completed: int, trackers: Trackers, status: str,
          message: Callable[[str], str]) -> None:
    """Keep the last completed step as a checkpoint (if its weights are finite), mark the run, say why and
    how to go on; `message` is given what was kept."""
    saved = completed > trainer.start_step and all(bool(torch.isfinite(p).all()) for p in trainer.params)
    if saved:
        save_checkpoint(trainer.model, trainer.optimizer, trainer.scheduler, run, completed,
                        trainer.config.train.save_total_limit)
    last = run.last_checkpoint()
    kept = (f"the weights of {last.name} are kept (affiner train --resume {run} continues from there)" if last
            else "no good step was saved, so there is nothing to resume")
    text = message(kept)
    run.update(status=status, step=completed, **({"error": text} if status == FAILED else {}))
    trackers.close(run.path, status)
    raise AffinerError(text) from None


def _diverged_message(trainer: Trainer, run: RunFolder, completed: int, reason: str, kept: str) -> str:
    train = trainer.config.train
    return (f"training stopped at step {completed + 1} of {run}: {reason} (learning rate "
            f"{trainer.scheduler.get_last_lr()[0]:.2e}), so that step was not applied; {kept}. "
            f"Lower train.learning_rate (now {train.learning_rate:g}), keep train.max_grad_norm set, train in fp32 or "
            "bf16 rather than fp16 (model.precision), and look for unusual rows in the data; then start a new run.")


def _out_of_memory_message(trainer: Trainer, run: RunFolder, completed: int, kept: str) -> str:
    config = trainer.config
    return (f"out of memory on {device()} at step {completed + 1} of {run}: {config.train.batch_size} rows per "
            f"micro-batch of up to {config.data.max_length} tokens did not fit; {kept}. "
            "Lower train.batch_size (raise train.gradient_accumulation to keep the same batch), lower "
            "data.max_length, set train.gradient_checkpointing: true, or use method: qlora (a 4-bit base); "
            "then start a new run with those settings.")
