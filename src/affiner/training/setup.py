"""What a training run trains with: the model (LoRA, QLoRA or full), its optimizer and its schedule."""

from __future__ import annotations

from pathlib import Path

import torch

from affiner.core.config import RunConfig
from affiner.core.models import attach_adapter, default_target_modules, load_for, load_model, uses_conv1d


def prepare_model(config: RunConfig, checkpoint: Path | None = None, on: torch.device | None = None):
    """The model to train: a fresh or resumed LoRA adapter on the base, or the full model; loaded on `on`
    (default: this process's device)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    full = config.method == "full"
    if full and checkpoint is not None:
        model = load_model(str(checkpoint), full_precision=True, trust_remote_code=config.model.trust_remote_code,
                           on=on)
    else:
        model = load_for(config, full_precision=full, on=on)
    # Non-reentrant checkpointing for every method: the reentrant kind (peft's default for QLoRA) needs inputs
    # that require grad and breaks with frozen embeddings and DDP's unused-parameter checks.
    non_reentrant = {"use_reentrant": False}
    if config.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.train.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=non_reentrant)
        keep_4bit_layout_trainable(model)
    elif config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)
        model.enable_input_require_grads()
    if full:
        model.train()
        return model
    if checkpoint is not None:
        model = attach_adapter(model, checkpoint, trainable=True)
    else:
        # Named targets were checked against the architecture before the run folder was written.
        targets = default_target_modules(model) if config.lora.target_modules == "auto" else config.lora.target_modules
        peft_config = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                                 target_modules=targets, task_type="CAUSAL_LM",
                                 fan_in_fan_out=uses_conv1d(model, targets))
        model = get_peft_model(model, peft_config)
    model.train()
    return model


def keep_4bit_layout_trainable(model) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weight in place for inference the first
    time it runs in eval mode without gradient (a held-out probe), and its later training forwards then take a
    kernel without autograd: the gradients through the base turn silently wrong (measured: 84 % off after one
    probe). A model that is trained never gets that layout."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def make_optimizer(config: RunConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    name, lr, wd = config.train.optimizer, config.train.learning_rate, config.train.weight_decay
    if name.startswith("paged_") and not torch.cuda.is_available():
        unpaged = "adamw_8bit" if name.endswith("8bit") else "adamw"
        print(f"note: optimizer {name} pages optimizer state to CPU memory on a GPU; without one, {unpaged} (the same "
              "optimizer, unpaged) is used.")
        name = unpaged
    if name == "adamw":
        # One fused kernel per step instead of a loop over tensors (torch has it on CUDA, MPS and CPU).
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=True)
    import bitsandbytes as bnb

    optimizers = {"paged_adamw_32bit": bnb.optim.PagedAdamW32bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
                  "adamw_8bit": bnb.optim.AdamW8bit}
    return optimizers[name](params, lr=lr, weight_decay=wd)


def make_scheduler(config: RunConfig, optimizer: torch.optim.Optimizer, steps: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(config.train.scheduler, config.train.scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=round(config.train.warmup_ratio * steps),
                         num_training_steps=steps)
