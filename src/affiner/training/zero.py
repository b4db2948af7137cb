"""DeepSpeed ZeRO stages 1 and 2 under affiner's own loop: each process keeps the whole weights but only
its share of the optimizer state (stage 1) and of the gradients (stage 2), optionally in CPU memory
(`offload_optimizer_device: cpu`). Stage 3 (the weights split too) is FSDP2's job here.

affiner drives DeepSpeed's engine itself rather than through `accelerator.prepare`, because the loop keeps
its own accumulation (the loss of a step normalised by the answer tokens of every micro-batch of every
process) and its own schedule: the engine is started with `managed_gradient_accumulation: false`, so each
backward only accumulates and `engine.step()` is the step's one reduction, clipping and update.

What decides the training stays in affiner's config (batch sizes, accumulation, clipping, optimizer,
schedule, precision); a DeepSpeed setting that contradicts it is refused by name rather than silently won.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from affiner.core.config import TrainConfig
from affiner.core.errors import AffinerError

# What `accelerate launch --config_file` passes on of a DeepSpeed config, by the name it has in the file.
LAUNCH_ENVIRONMENT = {"zero_stage": "ACCELERATE_DEEPSPEED_ZERO_STAGE",
                      "offload_optimizer_device": "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
                      "offload_param_device": "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
                      "deepspeed_config_file": "ACCELERATE_DEEPSPEED_CONFIG_FILE",
                      "gradient_accumulation_steps": "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
                      "gradient_clipping": "ACCELERATE_GRADIENT_CLIPPING"}
# DeepSpeed sections that would take over what affiner's config decides.
OWNED_BY_AFFINER = {"optimizer": "train.optimizer and train.learning_rate", "scheduler": "train.scheduler",
                    "fp16": "model.precision", "bf16": "model.precision", "amp": "model.precision"}
# Saved optimizer-state keys that hold DeepSpeed objects rather than tensors: a checkpoint keeps only what
# torch.load(weights_only=True) can read back; loading restores them from the running engine.
UNSAVED_STATE = ("loss_scaler", "zero_stage", "param_slice_mappings")


def launched_settings() -> dict[str, Any]:
    """The DeepSpeed settings `accelerate launch --config_file` put in the environment."""
    return {key: os.environ[name] for key, name in LAUNCH_ENVIRONMENT.items() if os.environ.get(name)}


def check_settings(settings: dict[str, Any], source: str) -> dict[str, Any]:
    """The settings of an Accelerate config's `deepspeed_config` (or of its launch), checked; `source` names
    where they come from. A `deepspeed_config_file` is read and merged in."""
    settings = dict(settings)
    file = settings.get("deepspeed_config_file")
    if file and str(file).lower() != "none":
        settings["file"] = _read_json(Path(str(file)).expanduser(), source)
    stage = int(settings.get("zero_stage", (settings.get("file", {}).get("zero_optimization") or {}).get("stage", 2)))
    if stage == 3:
        raise AffinerError(f"{source} asks for DeepSpeed ZeRO stage 3 (the weights split across processes); affiner "
                           "does that with FSDP2: use recipes/accelerate/fsdp2.yaml, or ZeRO stage 1 or 2.")
    if stage not in (0, 1, 2):
        raise AffinerError(f"{source}: zero_stage {stage} is not a DeepSpeed ZeRO stage; use 1 or 2.")
    offload = str(settings.get("offload_optimizer_device", "none")).lower()
    if offload not in ("none", "cpu"):
        raise AffinerError(f"{source}: offload_optimizer_device {offload} is not supported; use none or cpu.")
    if str(settings.get("offload_param_device", "none")).lower() != "none":
        raise AffinerError(f"{source}: offload_param_device needs ZeRO stage 3, which affiner does with FSDP2; "
                           "remove it (offload_optimizer_device: cpu moves the optimizer state to CPU memory).")
    owned = sorted(set(settings.get("file", {})) & set(OWNED_BY_AFFINER))
    if owned:
        raise AffinerError(f"{file} sets {', '.join(owned)}, which affiner's config decides "
                           f"({', '.join(OWNED_BY_AFFINER[k] for k in owned)}); remove it from the DeepSpeed file.")
    return {**settings, "zero_stage": stage, "offload_optimizer_device": offload}


def _read_json(path: Path, source: str) -> dict:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise AffinerError(f"{source} names the DeepSpeed config {path}, which cannot be read: {error}.") from None
    except json.JSONDecodeError as error:
        raise AffinerError(f"{path} line {error.lineno}: not valid JSON ({error.msg}).") from None
    if not isinstance(content, dict):
        raise AffinerError(f"{path} must hold a JSON object (DeepSpeed's config).")
    return content


def engine_config(settings: dict[str, Any], train: TrainConfig, processes: int) -> dict[str, Any]:
    """DeepSpeed's config for this run: affiner's batch, accumulation and clipping; the ZeRO settings given."""
    given = settings.get("file", {})
    ours = {"train_micro_batch_size_per_gpu": train.batch_size,
            "gradient_accumulation_steps": train.gradient_accumulation,
            "train_batch_size": train.batch_size * train.gradient_accumulation * processes,
            "gradient_clipping": train.max_grad_norm or 0.0}
    from_accelerate = {"gradient_accumulation_steps": settings.get("gradient_accumulation_steps"),
                       "gradient_clipping": settings.get("gradient_clipping")}
    for key, value in ours.items():
        for where, theirs in ((settings.get("deepspeed_config_file"), given.get(key)),
                              ("the Accelerate config", from_accelerate.get(key))):
            if _differs(theirs, value):
                raise AffinerError(f"{where} sets {key}: {theirs}, but affiner's config gives {value} "
                                   f"({_affiner_key(key)}); set it to \"auto\" or remove it.")
    zero = {**(given.get("zero_optimization") or {}), "stage": settings["zero_stage"]}
    if settings["offload_optimizer_device"] == "cpu":
        zero["offload_optimizer"] = {**(zero.get("offload_optimizer") or {}), "device": "cpu"}
    return {**given, **ours, "zero_optimization": zero,
            "managed_gradient_accumulation": False,  # the loop's own accumulation; engine.step() is the boundary
            "zero_force_ds_cpu_optimizer": False,  # affiner's AdamW steps the offloaded state too
            "steps_per_print": given.get("steps_per_print", 10 ** 9),  # affiner logs the steps itself
            "wall_clock_breakdown": False}


def _differs(theirs: Any, ours: float) -> bool:
    if theirs is None or str(theirs).lower() in ("auto", "none"):
        return False
    try:
        return float(theirs) != float(ours)
    except ValueError:
        return True


def _affiner_key(key: str) -> str:
    return {"train_micro_batch_size_per_gpu": "train.batch_size", "train_batch_size": "the global batch",
            "gradient_accumulation_steps": "train.gradient_accumulation",
            "gradient_clipping": "train.max_grad_norm"}[key]


def start_engine(module, optimizer, config: dict[str, Any]):
    """DeepSpeed's engine around the loss module; it partitions `optimizer`'s state (the scheduler, built on
    that optimizer, keeps setting its learning rate) and reduces the gradients into its partitions."""
    try:
        import deepspeed
        from deepspeed.runtime.constants import MANAGED_GRADIENT_ACCUMULATION  # noqa: F401
    except ImportError as error:
        found = "is not installed" if "MANAGED" not in str(error) else "is too old (it needs 0.19.8 or later)"
        raise AffinerError(f"DeepSpeed {found}: pip install -U 'affiner[deepspeed]'.") from None
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config, dist_init_required=False)
    return engine


def step(engine) -> float:
    """Reduce, clip and apply the accumulated gradients; returns their norm before clipping. A non-finite
    norm means DeepSpeed skipped the update, the weights unchanged."""
    engine.step()
    norm = engine.get_global_grad_norm()
    return float("nan") if norm is None else float(norm)


def optimizer_state(engine) -> dict:
    """This process's partition of the optimizer state, in tensors and plain values only."""
    return {key: value for key, value in engine.optimizer.state_dict().items() if key not in UNSAVED_STATE}


def load_optimizer_state(engine, state: dict, rank: int, count: int) -> None:
    """This process's partition back into the engine (the run resumes on as many processes as it had)."""
    partitions: list[dict | None] = [None] * count
    partitions[rank] = state
    engine.optimizer.load_state_dict(partitions, load_from_fp32_weights=True)
