"""Fine-tune a model with LoRA, QLoRA or fully, with an explicit training loop.

    affiner train recipes/quickstart.yaml --set train.epochs=1
    affiner train --resume runs/quickstart-20261122-183000

The run folder gets the adapter (plain peft format), tokenizer, resolved config, prompt template,
data fingerprint and report, `metrics.jsonl`, and checkpoints every `train.save_steps` steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from affiner import data as data_mod
from affiner.config import RunConfig, load_config
from affiner.errors import AffinerError
from affiner.models import (compute_dtype, default_target_modules, describe, device, load_model, load_tokenizer,
                            uses_conv1d)
from affiner.prepare import build
from affiner.runs import (RUN_FILE, create_run_folder, load_run_config, read_json, require_run, save_config,
                          write_json)
from affiner.templates import build_template, load_template, save_template
from affiner.tracking import Trackers

CHECKPOINTS = "checkpoints"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML file or recipe name (default: quickstart)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.learning_rate=1e-4 (repeatable)")
    parser.add_argument("--resume", metavar="RUN", help="continue a run folder from its last checkpoint")


def main(args: argparse.Namespace) -> None:
    if args.resume:
        folder = train(resume=Path(args.resume))
    else:
        folder = train(load_config(args.config, args.overrides))
    print(f"Run folder: {folder}")


# ---------------------------------------------------------------------------------------- loss


def token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every supervised token, and the batch row each belongs to.

    Logits are computed only where a label exists: with a 262k-token vocabulary (Gemma) the output
    head costs more than the whole transformer, and the prompt's logits are never used.
    """
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(hf_model, hf_model.base_model_prefix, None)
    head = hf_model.get_output_embeddings()
    labels = batch["labels"][:, 1:]
    mask = labels != data_mod.IGNORE_INDEX
    if body is None or head is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
    else:
        hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = _softcap(hf_model.config, head(hidden[:, :-1][mask]))
    losses = F.cross_entropy(logits.float(), labels[mask], reduction="none")
    return losses, mask.nonzero()[:, 0]


def supervised_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over supervised tokens, and how many there are."""
    losses, _ = token_losses(model, batch)
    return losses.sum(), losses.numel()


def accumulate_gradients(model, batches: list[dict[str, torch.Tensor]], autocast=None,
                         scaler=None) -> tuple[float, int]:
    """Backward over micro-batches as if they were one batch; returns (summed loss, supervised tokens).

    Each micro-batch's summed loss is divided by the token count of the whole group, not its own,
    so accumulating k micro-batches gives exactly the gradient of one batch k times larger.
    """
    n_tokens = sum(int((b["labels"][:, 1:] != data_mod.IGNORE_INDEX).sum()) for b in batches)
    total = 0.0
    for batch in batches:
        batch = {k: v.to(device()) for k, v in batch.items()}
        with autocast or contextlib.nullcontext():
            loss_sum, _ = supervised_loss(model, batch)
        loss = loss_sum / max(n_tokens, 1)
        (scaler.scale(loss) if scaler else loss).backward()
        total += float(loss_sum.detach())
    return total, n_tokens


def _softcap(config, logits: torch.Tensor) -> torch.Tensor:
    cap = getattr(config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


# ---------------------------------------------------------------------------------------- batches


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


def total_steps(config: RunConfig, n_rows: int) -> int:
    if config.train.max_steps:
        return config.train.max_steps
    per_epoch = math.ceil(n_rows / config.train.batch_size)
    return max(1, math.ceil(config.train.epochs * per_epoch / config.train.gradient_accumulation))


# ---------------------------------------------------------------------------------------- model


def prepare_model(config: RunConfig, checkpoint: Path | None = None):
    """The model to train: a fresh or resumed LoRA adapter on the base, or the full model."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    full = config.method == "full"
    if full and checkpoint is not None:
        model = load_model(str(checkpoint), full_precision=True)
    else:
        model = load_model(config.model.base, quantization=config.quantization, precision=config.model.precision,
                           double_quant=config.model.double_quant, full_precision=full)
    if config.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.train.gradient_checkpointing)
    elif config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if full:
        model.train()
        return model
    if checkpoint is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(checkpoint), is_trainable=True)
    else:
        targets = default_target_modules(model) if config.lora.target_modules == "auto" else config.lora.target_modules
        missing = [t for t in targets if not any(n.rsplit(".", 1)[-1] == t for n, _ in model.named_modules())]
        if missing:
            raise AffinerError(f"lora.target_modules names layers this model does not have: {', '.join(missing)}. "
                               f"Its linear layers are: {', '.join(default_target_modules(model))}.")
        peft_config = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                                 target_modules=targets, task_type="CAUSAL_LM",
                                 fan_in_fan_out=uses_conv1d(model, targets))
        model = get_peft_model(model, peft_config)
    model.train()
    return model


def make_optimizer(config: RunConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    name, lr, wd = config.train.optimizer, config.train.learning_rate, config.train.weight_decay
    if name.startswith("paged_") and not torch.cuda.is_available():
        print(f"note: optimizer {name} pages optimizer state to CPU memory on a GPU; without one, plain AdamW is used.")
        name = "adamw_8bit" if name.endswith("8bit") else "adamw"
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    import bitsandbytes as bnb

    optimizers = {"paged_adamw_32bit": bnb.optim.PagedAdamW32bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
                  "adamw_8bit": bnb.optim.AdamW8bit}
    return optimizers[name](params, lr=lr, weight_decay=wd)


def make_scheduler(config: RunConfig, optimizer: torch.optim.Optimizer, steps: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(config.train.scheduler, config.train.scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=round(config.train.warmup_ratio * steps),
                         num_training_steps=steps)


# ---------------------------------------------------------------------------------------- the run


def tokenize_train(config: RunConfig, template, tokenizer, examples) -> tuple[list[dict], data_mod.DataReport]:
    report = data_mod.DataReport()
    features = data_mod.tokenize(examples, template, tokenizer, config.data.max_length, report,
                                 config.data.max_response_words)
    print(report.summary("training rows"))
    if not features:
        raise AffinerError(f"no training row of {config.data.train} survives: {report.summary('rows')}. "
                           "Raise data.max_length or fix the data.")
    return features, report


def prepare_run(config: RunConfig):
    """Everything that can fail on bad input, before any file is written."""
    tokenizer = load_tokenizer(config.model.base)
    template = build_template(config.data.template, tokenizer, config.data.system_prompt)
    prepared = build(config.data, tokenizer, template)
    print(prepared.ledger.summary())
    test_examples, data_info = prepared.test, prepared.info
    features, report = tokenize_train(config, template, tokenizer, prepared.train)
    data_info["train_report"] = {"read": report.read, "kept": report.kept, "dropped": report.dropped,
                                 "dropped_examples": report.examples_dropped}
    return tokenizer, template, features, test_examples, data_info


def prepare_resume(folder: Path):
    """The run's own config, template, tokenizer and data, checked unchanged, and its last checkpoint."""
    folder = require_run(folder)
    if read_json(folder / RUN_FILE).get("status") == "finished":
        raise AffinerError(f"{folder} already finished training; start a new run instead.")
    checkpoint = last_checkpoint(folder)
    if checkpoint is None:
        raise AffinerError(f"{folder} has no checkpoint to resume from (set train.save_steps to make them).")
    config = load_run_config(folder)
    template = load_template(folder)
    tokenizer = load_tokenizer(str(folder))
    prepared = build(config.data, tokenizer, template)
    train_examples, info = prepared.train, prepared.info
    recorded = read_json(folder / "data.json")
    if any(info[side]["sha256"] != recorded[side]["sha256"] for side in ("train", "test")):
        raise AffinerError(f"the data of {folder} ({config.data.train}) changed since the run started (its "
                           "fingerprint differs from data.json); resuming would mix two datasets. "
                           "Restore the data or start a new run.")
    features, _ = tokenize_train(config, template, tokenizer, train_examples)
    return folder, config, tokenizer, template, features, checkpoint


def train(config: RunConfig | None = None, resume: Path | None = None) -> Path:
    if resume is not None:
        folder, config, tokenizer, template, features, checkpoint = prepare_resume(Path(resume))
    else:
        assert config is not None
        tokenizer, template, features, test_examples, data_info = prepare_run(config)
        folder = create_run_folder(config)
        save_config(config, folder)
        save_template(template, folder)
        tokenizer.save_pretrained(folder)
        write_json(folder / "data.json", data_info)
        write_json(folder / "test_examples.json", [e.__dict__ | {"history": list(e.history)} for e in test_examples])
        checkpoint = None
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    if checkpoint is None:
        write_json(folder / RUN_FILE, {"status": "training", "method": config.method, "base": config.model.base,
                                       "adapter": config.method != "full", "started": now})
    else:
        _update_run(folder, status="training", resumed=now)
    probe = None
    if config.eval.every_steps:
        from affiner.evaluate import held_out, training_probe

        sample = held_out(folder, None, config)[: config.eval.sample_size]
        probe = training_probe(template, tokenizer, sample, config.eval.max_new_tokens, config.eval.batch_size)
    loop(config, folder, features, tokenizer.pad_token_id, checkpoint, probe)
    return folder


def loop(config: RunConfig, folder: Path, features: list[dict], pad_id: int, checkpoint: Path | None,
         probe=None) -> None:
    """The training loop; `probe(model)`, when given, scores a held-out sample every eval.every_steps steps."""
    torch.manual_seed(config.train.seed)
    model = prepare_model(config, checkpoint)
    print(describe(model))
    params = [p for p in model.parameters() if p.requires_grad]
    steps = total_steps(config, len(features))
    print(f"Training {config.model.base} ({config.method}) on {len(features)} rows for {steps} steps of "
          f"{config.train.batch_size * config.train.gradient_accumulation} rows; run folder {folder}")
    optimizer = make_optimizer(config, params)
    scheduler = make_scheduler(config, optimizer, steps)
    start_step = 0
    if checkpoint is not None:
        start_step = restore_state(checkpoint, optimizer, scheduler)
        print(f"Resuming {folder} at step {start_step} of {steps} from {checkpoint.name}.")
    dtype = compute_dtype(config.model.precision)
    autocast = torch.autocast("cuda", dtype=dtype) if device().type == "cuda" and dtype != torch.float32 \
        else contextlib.nullcontext()
    scaler = torch.amp.GradScaler("cuda") if device().type == "cuda" and dtype == torch.float16 else None
    lengths = [len(f["input_ids"]) for f in features]
    batches = micro_batches(lengths, config.train.batch_size, config.train.seed, config.train.group_by_length)
    for _ in range(start_step * config.train.gradient_accumulation):
        next(batches)
    trackers = Trackers(config, folder, read_json(folder / RUN_FILE))
    _update_run(folder, **trackers.run_info)
    per_epoch = math.ceil(len(features) / config.train.batch_size)
    started = time.time()
    progress = tqdm(range(start_step, steps), initial=start_step, total=steps, desc="training", unit="step")
    completed = start_step
    try:
        for step in progress:
            group = [data_mod.collate([features[i] for i in next(batches)], pad_id)
                     for _ in range(config.train.gradient_accumulation)]
            total, n_tokens = accumulate_gradients(model, group, autocast, scaler)
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.train.max_grad_norm or float("inf"))
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            completed = done = step + 1
            record = {"step": done, "epoch": round(done * config.train.gradient_accumulation / per_epoch, 3),
                      "loss": round(total / max(n_tokens, 1), 5), "learning_rate": scheduler.get_last_lr()[0],
                      "grad_norm": round(float(grad_norm), 4), "tokens": n_tokens,
                      "seconds": round(time.time() - started, 1)}
            progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['learning_rate']:.1e}")
            probing = probe is not None and (done % config.eval.every_steps == 0 or done == steps)
            if probing:
                record.update(probe(model))
            if probing or done % config.train.logging_steps == 0 or done == steps:
                log_metrics(folder, record, trackers)
            if config.train.save_steps and done % config.train.save_steps == 0 and done < steps:
                save_checkpoint(model, optimizer, scheduler, folder, done, config.train.save_total_limit)
    except KeyboardInterrupt:
        progress.close()
        if completed > start_step:
            save_checkpoint(model, optimizer, scheduler, folder, completed, config.train.save_total_limit)
        _update_run(folder, status="interrupted", step=completed)
        trackers.close(folder, "interrupted")
        raise AffinerError(f"training interrupted after step {completed}; continue with: "
                           f"affiner train --resume {folder}") from None
    progress.close()
    model.save_pretrained(folder)  # adapter_model.safetensors + adapter_config.json, or the full model
    _update_run(folder, status="finished", steps=steps, train_seconds=round(time.time() - started, 1),
                finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    trackers.close(folder, "finished")  # the curves, then the artifacts: the adapter and the finished run.json


def log_metrics(folder: Path, record: dict, trackers: Trackers | None) -> None:
    with open(folder / "metrics.jsonl", "a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")
    if trackers:
        trackers.log(record)


def _update_run(folder: Path, **fields) -> None:
    write_json(folder / RUN_FILE, {**read_json(folder / RUN_FILE), **fields})


# ---------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(model, optimizer, scheduler, folder: Path, step: int, keep: int) -> Path:
    target = folder / CHECKPOINTS / f"step-{step:06d}"
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, partial / "trainer_state.pt")
    (partial / "step.json").write_text(json.dumps({"step": step}))
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    for old in sorted((folder / CHECKPOINTS).glob("step-??????"))[:-keep]:
        shutil.rmtree(old)
    return target


def last_checkpoint(folder: Path) -> Path | None:
    found = sorted((folder / CHECKPOINTS).glob("step-??????"))
    return found[-1] if found else None


def restore_state(checkpoint: Path, optimizer, scheduler) -> int:
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return json.loads((checkpoint / "step.json").read_text())["step"]
