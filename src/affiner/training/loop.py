"""The training loop, explicit: micro-batches, gradient accumulation, clipping, logging, checkpoints.

    for step in steps:
        gradients of `gradient_accumulation` micro-batches (loss on answer tokens only)
        clip, optimizer step, scheduler step
        log (and probe a held-out sample every eval.every_steps steps, keeping the best step's weights and
        stopping after train.patience probes without a better one), checkpoint every save_steps (auto: by the clock)

Ctrl-C, a loss that is no longer finite and an out-of-memory error stop it with one paragraph, keeping
the last good step as a checkpoint (with sharded weights or a partitioned optimizer state: the last
train.save_steps one), so that
`affiner train --resume RUN` continues.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from affiner.core.card import write_run_card
from affiner.core.config import RunConfig
from affiner.core.loss import IGNORE_INDEX, kept_head_buffers, supervised_loss, supervised_tokens
from affiner.core.devices import device, precision_reason
from affiner.core.models import describe, dtype_for
from affiner.core.runfolder import FAILED, FINISHED, RunFolder
from affiner.core.tracking import Trackers
from affiner.data.tokens import collate
from affiner.training.batches import global_batch, micro_batches, passes_of, probe_interval, total_steps
from affiner.training.checkpoints import (adopt_best, checkpoint_due, checkpoint_seconds, restore_state, rng_states,
                                          save_best, save_checkpoint, save_model)
from affiner.training.processes import Processes
from affiner.training.stops import (Interrupted, Stop, cpu_allocation_failures_as_out_of_memory, ctrl_c_after_step,
                                    diverged_message, out_of_memory_message, stop_training)
from affiner.training.selection import Selection
from affiner.training.setup import make_optimizer, make_scheduler, prepare_model

Probe = Callable[[Any], dict[str, float]]  # model -> held-out scores, logged with the step


class Diverged(Exception):
    """The loss or the gradients stopped being finite; the step was not applied to the weights."""


class AnswerLoss(torch.nn.Module):
    """The model behind a forward that returns its summed loss on answer tokens. This module is what
    data-parallel training wraps: its gradient averaging needs the forward to go through the wrapper,
    while the loss calls the model's body and head apart (logits only where a label exists)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        return supervised_loss(self.model, {"input_ids": input_ids, "attention_mask": attention_mask,
                                            "labels": labels})


def accumulate_gradients(model, batches: list[dict[str, torch.Tensor]], autocast=None, scaler=None,
                         processes: Processes | None = None) -> tuple[float, int]:
    """Backward over micro-batches as if they were one batch; returns (summed loss, supervised tokens),
    both over every process.

    Each micro-batch's summed loss is divided by the token count of the whole global step (every
    micro-batch of every process), not its own, so accumulating k micro-batches on N processes gives
    exactly the gradient of one batch kN times larger; the N is there because data-parallel training
    averages the processes' gradients.
    """
    processes = processes or Processes()
    forward = model if isinstance(processes.unwrap(model), AnswerLoss) else AnswerLoss(model)
    n_tokens = int(processes.total(sum(supervised_tokens(b) for b in batches)))
    total = torch.zeros((), device=device())  # summed on the device: one host sync per step, not per micro-batch
    for index, batch in enumerate(batches):
        batch = {k: v.to(device(), non_blocking=True) for k, v in batch.items()}
        with processes.no_sync(forward, last=index == len(batches) - 1):
            with autocast or contextlib.nullcontext():
                loss_sum, _ = forward(**batch)
            loss = loss_sum * processes.count / max(n_tokens, 1)
            processes.backward(forward, scaler.scale(loss) if scaler else loss)
        total += loss_sum.detach().float()
    return processes.total(float(total)), n_tokens


@dataclass
class Trainer:
    """What one run trains with; built by `setup`, stepped by `step`."""

    config: RunConfig
    model: Any  # the model being trained, as it is saved
    loss: Any  # AnswerLoss around it, wrapped for data-parallel training when there are several processes
    processes: Processes
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps: int
    start_step: int
    autocast: Any
    scaler: Any
    selection: Selection
    probe_every: int | None = None  # steps between held-out probes (None: no probe)
    seconds_before: float = 0.0  # of training before the checkpoint resumed from
    started: float = field(default_factory=time.time)  # when this process's steps began
    # The last step whose probe, log and checkpoint are done, and the random state after it: what a checkpoint
    # saved when training stops resumes from (a failure mid-step has drawn the next step's dropout masks already).
    recorded: int = 0
    rng: dict | None = None
    saved_at: float = 0.0  # time.monotonic() of the last checkpoint, or of the first step: save_steps auto
    save_seconds: float = 0.0  # how long that checkpoint took to write

    def __post_init__(self) -> None:
        self.recorded = self.start_step

    def elapsed(self) -> float:
        """Seconds of training so far, those before a resume included."""
        return self.seconds_before + time.time() - self.started


def setup(config: RunConfig, run: RunFolder, n_rows: int, checkpoint: Path | None,
          processes: Processes) -> Trainer:
    torch.manual_seed(config.train.seed)
    with processes.main_first():  # a Hub download happens once, the others then read the cache
        # Sharded, the whole model is loaded on the CPU: fully_shard moves each process's shard to its device,
        # so a base larger than one device still fits.
        model = prepare_model(config, checkpoint, on=torch.device("cpu") if processes.sharded else None)
    if processes.is_main:
        print(describe(model))
    loss = processes.wrap(AnswerLoss(model), _blocks(model))
    params = [p for p in loss.parameters() if p.requires_grad]
    steps = total_steps(config, n_rows, processes.count)
    optimizer = make_optimizer(config, params)
    scheduler = make_scheduler(config, optimizer, steps)  # stepped here once per step, never by Accelerate
    loss = processes.engine(loss, optimizer, config.train)  # DeepSpeed's, which partitions the optimizer state
    if processes.is_main:
        epochs = passes_of(config, n_rows, steps, processes.count)  # what is trained, not only what was asked
        passes = f"{epochs:.3g} pass{'' if epochs == 1 else 'es'}" + (
            " (train.epochs: auto)" if config.train.epochs == "auto" else "")
        print(f"Training {config.model.base} ({config.method}) on {n_rows} rows for {steps} steps of "
              f"{global_batch(config, processes.count)} rows ({_batch_shape(config, processes)}"
              f"{'' if config.train.max_steps else ', ' + passes}); run folder {run}")
        run.update(epochs=None if config.train.max_steps else round(epochs, 3))
    dtype, kind = dtype_for(config), device().type
    scaler = torch.amp.GradScaler(kind) if kind != "cpu" and dtype == torch.float16 else None
    start_step = 0
    if checkpoint is not None:
        start_step = restore_state(checkpoint, loss, optimizer, scheduler, processes, scaler)
        if processes.is_main:  # only now: a checkpoint that cannot be resumed from leaves run.json as it was
            run.update(status="training", resumed=time.strftime("%Y-%m-%d %H:%M:%S"))
            print(f"Resuming {run} at step {start_step} of {steps} from {checkpoint.name}.")
    # Weights stay as loaded (a bf16 frozen base, fp32 LoRA weights; fp32 masters for full fine-tuning); the
    # forward runs in the run's precision, on a CPU with native bf16 too; the loss is computed in fp32.
    mixed = dtype != torch.float32
    autocast = torch.autocast(kind, dtype=dtype) if mixed else contextlib.nullcontext()
    selection = Selection(config.train.best_by, config.train.patience, config.train.keep_best)
    if start_step:  # the resumed run compares its probes with the best one before the interruption
        selection.restore(run.info().get("best"), [(r["step"], r[selection.key]) for r in run.log()
                                                   if selection.key in r and r["step"] <= start_step],
                          saved=run.best_path.is_dir())
    return Trainer(config, model, loss, processes, params, optimizer, scheduler, steps, start_step, autocast, scaler,
                   selection, seconds_before=checkpoint_seconds(checkpoint) if start_step else 0.0)


def _blocks(model) -> set[str]:
    """The class names of the model's transformer blocks: the units FSDP2 shards one by one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(getattr(base, "_no_split_modules", None) or [])


def _batch_shape(config: RunConfig, processes: Processes) -> str:
    shared = f" ({processes.parallelism})" if processes.several else ""
    return (f"{processes.count} process{'es' if processes.several else ''}{shared} x {config.train.batch_size} rows "
            f"per device x {config.train.gradient_accumulation} accumulated")


def step(trainer: Trainer, group: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """One optimizer step over a group of micro-batches; returns what the log records of it."""
    total, n_tokens = accumulate_gradients(trainer.loss, group, trainer.autocast, trainer.scaler, trainer.processes)
    if not math.isfinite(total):
        trainer.optimizer.zero_grad(set_to_none=True)
        raise Diverged(f"the loss is {total / max(n_tokens, 1)}")
    grad_norm = trainer.processes.engine_step(trainer.loss) if trainer.processes.deepspeed else _update(trainer)
    # With fp16's gradient scaler, infinite gradients only make it skip the step and lower its scale.
    if trainer.scaler is None and not math.isfinite(grad_norm):  # DeepSpeed skipped the update, as we do
        trainer.optimizer.zero_grad(set_to_none=True)
        raise Diverged(f"the gradient norm is {grad_norm}")
    learning_rate = trainer.scheduler.get_last_lr()[0]  # the step's own, before the schedule moves on
    trainer.scheduler.step()
    return {"loss": round(total / max(n_tokens, 1), 5), "learning_rate": learning_rate,
            "grad_norm": round(grad_norm, 4), "tokens": n_tokens}


def _update(trainer: Trainer) -> float:
    """Clip the accumulated gradients and apply them, unless their norm is not finite; returns the norm."""
    if trainer.scaler:
        trainer.scaler.unscale_(trainer.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainer.params, trainer.config.train.max_grad_norm or float("inf"))
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # sharded
    if trainer.scaler:
        trainer.scaler.step(trainer.optimizer)
        trainer.scaler.update()
    elif math.isfinite(grad_norm):
        trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def log_metrics(run: RunFolder, record: dict, trackers: Trackers | None) -> None:
    run.append_log(record)
    if trackers:
        trackers.log(record)


def loop(config: RunConfig, run: RunFolder, features: list[dict], pad_id: int, checkpoint: Path | None,
         probe: Probe | None = None, processes: Processes | None = None) -> None:
    """Train to the last step; `probe(model)`, when given, scores a held-out sample every eval.every_steps steps."""
    processes = processes or Processes()
    trainer = setup(config, run, len(features), checkpoint, processes)
    trainer.probe_every = probe_interval(config, trainer.steps) if probe else None
    train, accumulation = config.train, config.train.gradient_accumulation
    global_rows = train.batch_size * processes.count  # one micro-batch of every process
    batches = micro_batches([len(f["input_ids"]) for f in features], global_rows, train.seed, train.group_by_length)
    for _ in range(trainer.start_step * accumulation):  # the resumed run sees the batches it would have seen
        next(batches)
    trackers = _trackers(config, run, processes, trainer.start_step)
    if trainer.start_step and processes.is_main:
        run.truncate_log(trainer.start_step)
    per_epoch = math.ceil(len(features) / global_rows)
    trainer.started, trainer.saved_at = time.time(), time.monotonic()
    progress = tqdm(range(trainer.start_step, trainer.steps), initial=trainer.start_step, total=trainer.steps,
                    desc="training", unit="step", disable=not processes.is_main)
    completed, stopped, early = trainer.start_step, None, False
    try:
        # The head's kept buffers are given back however training ends.
        with ctrl_c_after_step(processes) as ctrl_c, kept_head_buffers(), cpu_allocation_failures_as_out_of_memory():
            for index in progress:
                group = [_local_batch(features, next(batches), processes, pad_id) for _ in range(accumulation)]
                record = {"step": index + 1, "epoch": round((index + 1) * accumulation / per_epoch, 3),
                          **step(trainer, group), "seconds": round(trainer.elapsed(), 1)}
                completed = index + 1
                progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['learning_rate']:.1e}")
                early = _after_step(trainer, run, record, probe, trackers)
                if early:
                    break
                if ctrl_c.pressed() and completed < trainer.steps:  # every process agrees to stop here
                    stopped = Stop("interrupted", together=True, save=True, message=lambda kept: (
                        f"training interrupted after step {completed}; {kept}; continue with: "
                        f"affiner train --resume {run}"))
                    break
    # What stopped training is handled after the except blocks: inside them, the traceback would still hold
    # the activations an out-of-memory error left, and the memory a checkpoint needs.
    except KeyboardInterrupt:  # a second Ctrl-C: mid-step, so the weights may be half-updated: nothing saved
        stopped = Stop("interrupted", together=True, save=False, message=lambda kept: (
            f"training stopped at once during step {trainer.recorded + 1} (Ctrl-C twice); {kept}"))
    except Diverged as diverged:  # the loss is summed over processes: every one of them stops here
        reason = str(diverged)
        stopped = Stop(FAILED, together=True, save=True,
                       message=lambda kept: diverged_message(trainer.config, trainer.scheduler.get_last_lr()[0], run,
                                                             trainer.recorded, reason, kept))
    except (torch.OutOfMemoryError, MemoryError):  # perhaps in one process only: nobody is waited for
        stopped = Stop(FAILED, together=False, save=True,
                       message=lambda kept: out_of_memory_message(trainer.config, run, trainer.recorded, kept))
    except OSError as error:  # writing the log or a checkpoint failed (a full disk): nothing more is saved
        failure = f"{error.filename or run}: {error.strerror or error}"
        stopped = Stop(FAILED, together=False, save=False, message=lambda kept: (
            f"training stopped after step {completed}: {failure}; {kept}. "
            "Free some space (or fix the folder's permissions), then continue with: "
            f"affiner train --resume {run}"))
    progress.close()
    if stopped:
        stop_training(trainer, run, completed, trackers, stopped)
    _finish_whole(trainer, run, trackers, completed, early, ctrl_c.asked)


def _checkpoint_due(trainer: Trainer, done: int) -> bool:
    """Whether step `done` gets a checkpoint; by the clock (save_steps auto), the main process's clock decides for
    every process, as each must take part."""
    due = checkpoint_due(trainer.config.train.save_steps, done, time.monotonic() - trainer.saved_at,
                         trainer.save_seconds)
    return trainer.processes.share(due) if trainer.config.train.save_steps == "auto" else due


def _processes_agree(trainer: Trainer) -> bool | None:
    """Whether every process ended with the same trained weights, as data-parallel training promises
    (None with one process). A cheap fingerprint per process, compared on all of them."""
    processes = trainer.processes
    if not processes.several or processes.sharded:  # shards differ by design; they were never copies
        return None
    # Sums in fp64 without an fp64 copy of each weight (an embedding can take gigabytes).
    fingerprint = sum(float(torch.sum(p.detach(), dtype=torch.float64))
                      + float(torch.linalg.vector_norm(p.detach(), 1, dtype=torch.float64)) for p in trainer.params)
    return abs(processes.total(fingerprint) - processes.count * fingerprint) <= 1e-9 * max(1.0, abs(fingerprint))


def _trackers(config: RunConfig, run: RunFolder, processes: Processes, resumed_at: int) -> Trackers | None:
    """The main process alone logs; it also records how the batch was shaped and shared."""
    if not processes.is_main:
        return None
    info = run.info()
    trackers = Trackers(config, run.path, info, resumed_at)
    dtype, before = dtype_for(config), info.get("precision")
    precision, reason = str(dtype).removeprefix("torch."), precision_reason(dtype, config.model.precision)
    changed = {}
    if resumed_at and before and before != precision:  # `auto` decided otherwise here (another machine, a GPU)
        print(f"note: this run trained in {before} up to step {resumed_at}; it goes on in {precision} ({reason}). "
              "run.json records each precision and its steps.", file=sys.stderr)
        changed = {"precision_before": [*info.get("precision_before", []),
                                        {"precision": before, "until_step": resumed_at}]}
    run.update(**trackers.run_info, processes=processes.count, global_batch=global_batch(config, processes.count),
               parallelism=processes.parallelism, precision=precision, precision_reason=reason, **changed)
    return trackers


def _local_batch(features: list[dict], rows: list[int], processes: Processes, pad_id: int) -> dict:
    """This process's share of a global micro-batch. A process left without rows (a short last batch) still
    takes part in the gradient averaging, with one row whose every label is masked: it adds nothing."""
    mine = processes.share_of(rows)
    if mine:
        return collate([features[i] for i in mine], pad_id)
    batch = collate([features[rows[0]]], pad_id)
    batch["labels"].fill_(IGNORE_INDEX)
    return batch


def _finish_whole(trainer: Trainer, run: RunFolder, trackers: Trackers | None, completed: int, early: bool,
                  asked: bool) -> None:
    """Ctrl-C during the last step (`asked`), or while the run is written (its adapter, card, curves, trackers),
    lets the run finish whole, then stops what would follow (an evaluation, a sweep's next point): not lost."""
    with ctrl_c_after_step(trainer.processes, "finishing the run, then stopping") as finishing:
        _finish(trainer, run, trackers, round(trainer.elapsed(), 1), completed, early)
    finishing.asked = finishing.asked or asked
    if finishing.pressed():
        raise Interrupted(f"training finished ({completed} steps) as Ctrl-C came, so the run is complete; evaluate "
                          f"it with: affiner evaluate {run}")


def _finish(trainer: Trainer, run: RunFolder, trackers: Trackers | None, seconds: float, completed: int,
            early: bool) -> None:
    agree = _processes_agree(trainer)
    selection = trainer.selection
    best = selection.keeps_best(completed)  # the same in every process: none looks at the disk
    state = None if best else trainer.processes.full_state(trainer.loss)  # gathered from the shards, when sharded
    if trainer.processes.is_main:
        if best:
            adopt_best(run)
        else:
            save_model(trainer.model, run.path, state)  # adapter_model.safetensors + adapter_config.json, or the model
        advice = selection.advice(completed, early)
        for line in advice:
            print(f"note: {line}", file=sys.stderr)
        kept = {"best": {**selection.summary(), "kept": best}} if selection.summary() else {}
        run.update(status=FINISHED, step=completed, steps=completed, planned_steps=trainer.steps, train_seconds=seconds,
                   finished=time.strftime("%Y-%m-%d %H:%M:%S"), advice=advice, **kept,
                   **({"stopped_early": f"train.patience: {selection.patience} probes without a better "
                       f"{selection.key} than step {selection.best_step}'s"} if early else {}),
                   **({"processes_agree": agree} if agree is not None else {}))
        shutil.rmtree(run.best_path, ignore_errors=True)  # only now: a run killed before resumes with it
        if trainer.config.train.save_steps == "auto":  # a crash's insurance, of no use to a finished run (GBs each
            for checkpoint in run.checkpoints():      # for a full fine-tune); checkpoints asked for by steps stay
                shutil.rmtree(checkpoint, ignore_errors=True)
        write_run_card(run.path)  # with the steps and time just recorded
        trackers.close(run.path, FINISHED)  # the curves, then the artifacts: the adapter and the finished run.json
    trainer.processes.wait()  # the others return once the adapter is there, for whatever comes next


def _after_step(trainer: Trainer, run: RunFolder, record: dict, probe: Probe | None,
                trackers: Trackers | None) -> bool:
    """Probe, log and checkpoint as the config asks, at the step just completed; True to stop early."""
    config, done = trainer.config, record["step"]
    last = done == trainer.steps
    probing = probe is not None and (done % trainer.probe_every == 0 or last)
    stop = False
    if probing:
        with trainer.processes.gathered(trainer.loss), trainer.autocast:  # in the precision it trains in
            record.update(probe(trainer.model))
        selection = trainer.selection
        if selection.record(done, record) and selection.keep_best and not last:
            save_best(trainer, run)  # every process takes part, as the probe's scores are the same in each
            selection.saved_step = done
        stop = selection.should_stop() and not last
    if (probing or done % config.train.logging_steps == 0 or last or stop) and trainer.processes.is_main:
        log_metrics(run, record, trackers)
        if probing and trainer.selection.summary():
            run.update(best=trainer.selection.summary())  # a resumed run compares with it
    if not last and not stop and _checkpoint_due(trainer, done):
        started = time.monotonic()
        save_checkpoint(trainer, run, done, config.train.save_total_limit)
        trainer.saved_at = time.monotonic()
        trainer.save_seconds = trainer.saved_at - started
    trainer.recorded, trainer.rng = done, rng_states()
    return stop
