"""Start or resume a training run: check everything that can fail on bad input, then write the run
folder and hand over to the loop.

    folder = train(load_config("quickstart"))        # a new run under runs/
    folder = train(resume=Path("runs/quickstart-..."))  # from its last checkpoint
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from affiner.core.config import RunConfig
from affiner.core.devices import share_cpu_bf16_speedup
from affiner.core.errors import AffinerError
from affiner.core.files import file_sha256, remove_leftovers
from affiner.core.gguf_cache import save_tokenizer
from affiner.core.models import (check_weights_readable, context_length, default_target_modules, dtype_for,
                                 max_positions, skeleton_for, tokenizer_for)
from affiner.core.runfolder import CHECKPOINTS, CONFIG_FILE, RunFolder
from affiner.core.templates import Template, build_template
from affiner.core.tracking import require_trackers_installed
from affiner.data.pipeline import build
from affiner.data.tokens import tokenize
from affiner.training.loop import Probe, loop
from affiner.training.processes import Processes, strategy

# Builds the held-out probe for a run (or None): given by the caller, so training never imports evaluation.
ProbeFactory = Callable[[RunFolder, RunConfig, Template, object], "Probe | None"]


@dataclass
class Start:
    """Everything a run needs before its first step, checked before anything is written."""

    config: RunConfig
    tokenizer: object
    template: Template
    features: list[dict]
    checkpoint: Path | None = None


def prepare_new(config: RunConfig, say: Callable[[str], None] = print) -> tuple[Start, list, dict]:
    """A new run's tokenizer, template and cleaned data; returns the start, the held-out rows and data.json."""
    tokenizer = tokenizer_for(config)
    template = build_template(config.data.template, tokenizer, config.data.system_prompt)
    prepared = build(config.data, tokenizer, template, context_length(config))
    say(prepared.ledger.summary())
    return Start(config, tokenizer, template, tokenize(prepared.train, template, tokenizer)), prepared.test, \
        prepared.info


def prepare_resume(run: RunFolder) -> Start:
    """The run's own config, template, tokenizer and data, checked unchanged, and its last checkpoint."""
    if run.is_finished:
        raise AffinerError(f"{run} already finished training; start a new run instead.")
    checkpoint = run.last_checkpoint()
    if checkpoint is None:
        raise AffinerError(f"{run} has no checkpoint to resume from (train.save_steps sets how often they are "
                           f"made): {run.how_to_finish()}.")
    recorded_config = run.info().get("config_sha256")
    if recorded_config and recorded_config != file_sha256(run / CONFIG_FILE):
        raise AffinerError(f"{run / CONFIG_FILE} was edited since the run started; resuming would train the rest "
                           "of it with other settings than its first steps. Undo the edit, or start a new run "
                           f"with the new settings (affiner train {run / CONFIG_FILE} trains a copy).")
    config, template = run.config(), run.template()
    tokenizer = tokenizer_for(config, run.path)
    prepared = build(config.data, tokenizer, template, context_length(config))
    recorded = run.data_info()
    if any(prepared.info[side]["sha256"] != recorded[side]["sha256"] for side in ("train", "test")):
        raise AffinerError(f"the data of {run} ({config.data.train}) changed since the run started (its "
                           "fingerprint differs from data.json); resuming would mix two datasets. "
                           "Restore the data or start a new run.")
    return Start(config, tokenizer, template, tokenize(prepared.train, template, tokenizer), checkpoint)


def create(start: Start, held_out: list, data_info: dict) -> RunFolder:
    """The new run folder with what every later command reads; run.json last, so that a folder without
    it (a crash while creating) is never taken for a run."""
    run = RunFolder.create(start.config)
    run.save_config(start.config)
    run.save_template(start.template)
    save_tokenizer(start.tokenizer, run.path)
    run.save_data_info(data_info)
    run.save_held_out(held_out)
    run.update(status="training", method=start.config.method, base=start.config.model.base,
               adapter=start.config.method != "full", started=time.strftime("%Y-%m-%d %H:%M:%S"),
               config_sha256=file_sha256(run / CONFIG_FILE))
    return run


def train(config: RunConfig | None = None, resume: Path | None = None,
          probe_factory: ProbeFactory | None = None) -> Path:
    """Train a new run from `config`, or continue the run folder `resume`; returns the run folder.

    Under `torchrun`/`accelerate launch` every process prepares the same data (the main process first,
    so that a download or a GGUF conversion happens once), the main process alone writes the run
    folder, and each trains on its share of every global batch.
    """
    processes = Processes()
    if config is None and resume is None:
        raise AffinerError("train needs a config or a run folder to resume.")
    if processes.several:
        share_cpu_bf16_speedup(processes.share, processes.is_main)  # before any process resolves its precision
    with processes.main_first():
        if resume is not None:
            run = RunFolder.open(resume)
            start = prepare_resume(run)
        else:
            start, held_out, data_info = prepare_new(config, print if processes.is_main else _quiet)
            check_before_writing(start.config)
        if processes.several:
            processes.strategy = strategy(start.config.train.accelerate_config)
        if resume is not None:
            check_resumable(run, processes)
        check_strategy(start.config, processes)
    if resume is None:
        run = RunFolder(Path(processes.share(str(create(start, held_out, data_info).path) if processes.is_main
                                             else None)))
    with run.writing("train") if processes.is_main else contextlib.nullcontext():
        if processes.is_main:
            _remove_leftovers(run)
        processes.wait()  # nobody trains before the run folder is written
        try:
            probe = probe_factory(run, start.config, start.template, start.tokenizer) if probe_factory else None
            loop(start.config, run, start.features, start.tokenizer.pad_token_id, start.checkpoint, probe,
                 processes)
        except BaseException as error:
            processes.close(wait=False)
            if processes.is_main:  # another process's failure is most often the main one's gone (kill -9)
                _record_failure(run, error)
            raise
    processes.close()
    return run.path


def check_before_writing(config: RunConfig) -> None:
    """What would otherwise fail only once the run folder exists: the extras the config needs, and the
    settings the model's architecture must allow (read from its config, without loading its weights)."""
    require_trackers_installed(config)  # tensorboard, mlflow, wandb
    check_probe_settings(config)
    if (config.method == "qlora" or config.train.optimizer in ("adamw_8bit", "paged_adamw_8bit")
            or (config.train.optimizer == "paged_adamw_32bit" and torch.cuda.is_available())) \
            and importlib.util.find_spec("bitsandbytes") is None:
        raise AffinerError(f"this config needs bitsandbytes (method {config.method}, train.optimizer "
                           f"{config.train.optimizer}), which is not installed: pip install 'affiner[qlora]'.")
    model = skeleton_for(config)
    check_weights_readable(config.model.base)
    positions = max_positions(model)
    if positions and config.data.max_length > positions:
        raise AffinerError(f"data.max_length is {config.data.max_length} but {config.model.base} attends to "
                           f"{positions} tokens at most; set data.max_length to {positions} or less.")
    targets = config.lora.target_modules
    if config.method != "full" and targets != "auto":
        missing = [t for t in targets if not any(n.rsplit(".", 1)[-1] == t for n, _ in model.named_modules())]
        if missing:
            raise AffinerError(f"lora.target_modules names layers {config.model.base} does not have: "
                               f"{', '.join(missing)}. Its linear layers are: "
                               f"{', '.join(default_target_modules(model))}.")
    if config.method != "full":
        check_lora_rank(config, model)


def check_lora_rank(config: RunConfig, model) -> None:
    """lora.r that some adapted layer can use: a rank above every layer's inputs or outputs adds weights and no
    capacity, and an absurd one would fail in torch's allocator once the run folder exists. (A rank above a few
    small layers' size, as Gemma 3n's 4 x 4 or a mixture of experts' gate, is fine for the others.)"""
    targets = default_target_modules(model) if config.lora.target_modules == "auto" else config.lora.target_modules
    sizes = [(min(module.weight.shape), name) for name, module in model.named_modules()
             if name.rsplit(".", 1)[-1] in targets and getattr(module, "weight", None) is not None]
    largest, name = max(sizes, default=(None, ""))
    if largest is not None and config.lora.r > largest:
        raise AffinerError(f"lora.r is {config.lora.r}, but the layers it adapts have at most {largest} inputs or "
                           f"outputs ({name}): a rank above that adds weights and no capacity. Set lora.r to "
                           f"{largest} or less (8-64 is usual).")


def check_probe_settings(config: RunConfig) -> None:
    """Settings that would quietly do nothing: a run would keep its last step and never stop early. Checked for a
    run about to train, not in the config's schema, which also reads the configs of runs trained before."""
    if config.train.best_by != "loss" and config.eval.sample_size == 0:
        raise AffinerError(f"train.best_by: {config.train.best_by} needs held-out answers at each probe: set "
                           "eval.sample_size (e.g. 16), or keep train.best_by: loss (a forward pass alone).")
    if config.train.patience is not None and config.eval.every_steps is None:
        raise AffinerError("train.patience counts held-out probes, and eval.every_steps is null (no probe): set "
                           "eval.every_steps (auto: 10 per run), or drop train.patience.")


def _remove_leftovers(run: RunFolder) -> None:
    """What a killed writer of this run left half-written (the lock is ours: nobody else is writing it)."""
    removed = remove_leftovers(run.path) + remove_leftovers(run.path / CHECKPOINTS, any_owner=True)
    if removed:
        print(f"note: removed what an interrupted save left in {run}: {', '.join(removed)}")


def _record_failure(run: RunFolder, error: BaseException) -> None:
    """A run that stopped before the loop could say why (loading the model, a tracker, a damaged
    checkpoint) is marked too, so that no command takes it for one still training."""
    try:
        if run.status != "training":
            return  # the loop recorded it already
        if isinstance(error, KeyboardInterrupt):
            run.update(status="interrupted")
        else:
            reason = str(error) if isinstance(error, AffinerError) else f"{type(error).__name__}: {error}"
            run.update(status="failed", error=reason)
    except OSError:
        pass  # the folder itself is unwritable: the error being raised says why


def check_resumable(run: RunFolder, processes: Processes) -> None:
    """A run resumes on as many processes as it started with: the batch order and the step count depend
    on it, and a sharded optimizer state loads only into as many shards."""
    info = run.info()
    started_with, parallelism = info.get("processes", 1), info.get("parallelism")
    if started_with != processes.count:
        raise AffinerError(f"{run} trained on {started_with} process(es); resume it on as many (this is "
                           f"{processes.count}): torchrun --nproc_per_node {started_with} -m affiner train "
                           f"--resume {run}")
    if parallelism and parallelism != processes.parallelism:
        # The checkpoints hold the optimizer as that parallelism saved it: whole (ddp), sharded (fsdp2), or
        # partitioned by DeepSpeed, and only the same one reads it back.
        launch = (f"torchrun --nproc_per_node {started_with} -m affiner train --resume {run}" if parallelism == "ddp"
                  else f"accelerate launch --config_file <the {parallelism} config it was launched with> "
                       f"--num_processes {started_with} -m affiner train --resume {run}")
        raise AffinerError(f"{run} trained with {parallelism} and this launch is {processes.parallelism}: its "
                           f"checkpoints hold the optimizer state as {parallelism} saved it, which only {parallelism} "
                           f"reads back. Resume it as it was launched: {launch}")


def check_strategy(config: RunConfig, processes: Processes) -> None:
    """What FSDP2 sharding and DeepSpeed ZeRO cannot do yet, refused before anything is written."""
    if not processes.partitioned:
        return
    name = "FSDP2" if processes.sharded else "DeepSpeed ZeRO"
    if config.method == "qlora":
        raise AffinerError(f"QLoRA's 4-bit weights cannot be trained under {name} yet (their quantisation state "
                           "would be lost); train QLoRA without train.accelerate_config (DDP), or use method: lora.")
    if config.train.optimizer != "adamw":
        raise AffinerError(f"train.optimizer {config.train.optimizer} keeps bitsandbytes state that {name} does not "
                           "partition; use train.optimizer: adamw with train.accelerate_config.")
    if dtype_for(config) == torch.float16:
        raise AffinerError(f"{name} with fp16 needs a gradient scaler that sees every partition, which affiner does "
                           "not have yet; set model.precision: fp32 (or bf16 on a GPU that has it natively).")
    if processes.sharded:
        # transformers would otherwise load real weights on one process only and expect Accelerate to broadcast
        # them, which fully_shard does not do.
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"


def _quiet(_: str) -> None:
    """What the other processes say: nothing, the main process has said it."""
