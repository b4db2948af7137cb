"""The processes one training runs in, through Hugging Face Accelerate: one (CPU, GPU, Apple MPS), or N
launched by `torchrun --nproc_per_node N` or `accelerate launch`: data-parallel (DDP) by default; with the
weights sharded across them (FSDP2), or the optimizer state and gradients (DeepSpeed ZeRO 1/2), when an
Accelerate config file asks for it.

Every process trains on its share of each global batch; the main process alone writes the run folder,
the log, the trackers, the checkpoints and the adapter. With one process every call here is the
identity, so single-device training is exactly what it was.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import torch

from affiner.core.errors import AffinerError, SaidElsewhere


@dataclass(frozen=True)
class Strategy:
    """How several processes share the training, as an Accelerate config file says (DDP without one)."""

    name: str = "ddp"  # "ddp", "fsdp2" or "deepspeed"
    deepspeed: dict = field(default_factory=dict)  # the DeepSpeed settings given (checked by zero.check_settings)


@dataclass
class Processes:
    """This process's place among the training processes, and the few collective operations training needs.

    The launcher says how many there are (WORLD_SIZE, RANK: torchrun and accelerate launch set them);
    Accelerate is only started when there are several, so one process runs exactly as before.
    """

    count: int = field(default_factory=lambda: int(os.environ.get("WORLD_SIZE", "1")))
    rank: int = field(default_factory=lambda: int(os.environ.get("RANK", "0")))
    strategy: Strategy = field(default_factory=Strategy)  # set by `strategy()` once the run's config is known

    @cached_property
    def accelerator(self):
        from accelerate import Accelerator

        from affiner.core.devices import device

        # Precision and compilation stay affiner's own (autocast + scaler in the loop): Accelerate must not
        # apply those of a default `accelerate config` it finds in the launch environment, nor start DeepSpeed,
        # whose engine affiner drives itself (zero.py). On CPUs it only starts its process group (gloo) when
        # told it runs on the CPU.
        launched_deepspeed = os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        try:
            return Accelerator(cpu=device().type == "cpu", mixed_precision="no", dynamo_backend="no")
        finally:
            if launched_deepspeed is not None:
                os.environ["ACCELERATE_USE_DEEPSPEED"] = launched_deepspeed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.count > 1

    @property
    def sharded(self) -> bool:
        """FSDP2: each process holds a shard of the weights, not all of them."""
        return self.several and self.strategy.name == "fsdp2"

    @property
    def deepspeed(self) -> bool:
        """DeepSpeed ZeRO: each process holds a partition of the optimizer state (and of the gradients)."""
        return self.several and self.strategy.name == "deepspeed"

    @property
    def parallelism(self) -> str:
        """How the processes share the training, as run.json records it: one, ddp, fsdp2, deepspeed-zero1/2."""
        if not self.several:
            return "one"
        stage = self.strategy.deepspeed.get("zero_stage")
        return f"deepspeed-zero{stage}" if self.deepspeed else self.strategy.name

    @property
    def partitioned(self) -> bool:
        """Whether part of the training state lives in other processes: then only every process together can
        save a checkpoint."""
        return self.sharded or self.deepspeed

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process goes first (a Hub download, a GGUF conversion, the checks of the input), the others
        then find it done. When the main process fails there (bad input), the others exit with its exit code,
        quietly: waiting at a barrier it never reached, they failed on its closed connection, each printing an
        "internal error" under its one-paragraph refusal."""
        if not self.several:
            yield
            return
        if not self.is_main:
            failed = self.share(None)  # the main process's exit code when it failed, after its block
            if failed is not None:
                raise SaidElsewhere(failed)
            yield
            return
        try:
            yield
        except BaseException as error:
            self.share(error.exit_code if isinstance(error, AffinerError) else
                       130 if isinstance(error, KeyboardInterrupt) else 1)
            raise
        self.share(None)

    def share(self, value: Any) -> Any:
        """The main process's `value`, on every process (a run folder's path, say)."""
        if not self.several:
            return value
        from accelerate.utils import broadcast_object_list

        self.accelerator  # the process group starts with it (the first collective may come before main_first)
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

    def wrap(self, module: torch.nn.Module, no_split: set[str]) -> torch.nn.Module:
        """The module ready for data-parallel training: DDP wraps it, FSDP2 shards it in place (each block
        named in `no_split`, then the whole); one process leaves it as it is. Build the optimizer after:
        sharding replaces the parameters."""
        if not self.several or self.deepspeed:  # DeepSpeed's engine is started with the optimizer (`engine`)
            return module
        if not self.sharded:
            return self.accelerator.prepare(module)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.accelerator  # noqa: B018  (Accelerate starts the process group the mesh is built on)
        mesh = init_device_mesh(self.accelerator.device.type, (self.count,))
        for block in [m for m in module.modules() if type(m).__name__ in no_split]:
            fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh)
        return module

    def engine(self, module: torch.nn.Module, optimizer, train) -> torch.nn.Module:
        """Under DeepSpeed, its engine around the wrapped module, partitioning `optimizer`'s state; otherwise
        the module as it is. `train` is the run's train section (batch, accumulation, clipping)."""
        if not self.deepspeed:
            return module
        from affiner.training import zero

        self.accelerator  # noqa: B018  (Accelerate starts the process group DeepSpeed joins)
        return zero.start_engine(module, optimizer, zero.engine_config(self.strategy.deepspeed, train, self.count))

    def engine_step(self, engine) -> float:
        """DeepSpeed's reduction, clipping and update of the accumulated gradients; returns their norm (not
        finite: the update was skipped)."""
        from affiner.training import zero

        return zero.step(engine)

    def unwrap(self, model):
        if self.deepspeed:
            return model.module
        return self.accelerator.unwrap_model(model) if self.several and not self.sharded else model

    def backward(self, model, loss: torch.Tensor) -> None:
        """Gradients of `loss`, accumulated into the module's (DeepSpeed's engine keeps its own)."""
        if self.deepspeed:
            model.backward(loss, scale_wrt_gas=False)  # the loss is already normalised over the whole step
        else:
            loss.backward()

    @contextlib.contextmanager
    def no_sync(self, model, last: bool):
        """Gradients are averaged across processes on the last micro-batch of a step only (DeepSpeed's
        engine reduces in its own step)."""
        if not self.several or last or self.deepspeed:
            yield
        elif self.sharded:
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        else:
            with self.accelerator.no_sync(model):
                yield

    @contextlib.contextmanager
    def gathered(self, module: torch.nn.Module):
        """The sharded module's own weights gathered for a while: calls that enter the model elsewhere than
        through `module` (generation, in the held-out probe) then find whole weights, its blocks gathering
        theirs as usual. Every process must enter it."""
        if not self.sharded:
            yield
            return
        module.unshard()
        try:
            yield
        finally:
            module.reshard()

    def optimizer_state(self, module: torch.nn.Module, optimizer) -> dict:
        """The optimizer's state as one process would have it (gathered from the shards when sharded); under
        DeepSpeed, this process's partition of it (see `optimizer_per_process`)."""
        if self.deepspeed:
            from affiner.training import zero

            return zero.optimizer_state(module)
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(module, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, module: torch.nn.Module, optimizer, state: dict) -> None:
        if self.deepspeed:
            from affiner.training import zero

            zero.load_optimizer_state(module, state, self.rank, self.count)
            return
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def full_state(self, module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole state dict on the main process (None elsewhere); every process calls it when sharded."""
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Frozen weights are left out: a LoRA checkpoint needs the adapter, not a gathered copy of the base.
        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                      ignore_frozen_params=True))
        return state if self.is_main else None

    def share_of(self, rows: list[int]) -> list[int]:
        """This process's contiguous part of a global batch (as even as the rows allow)."""
        per, extra = divmod(len(rows), self.count)
        start = self.rank * per + min(self.rank, extra)
        return rows[start:start + per + (self.rank < extra)]


def strategy(accelerate_config: str | None) -> Strategy:
    """How to share the training between processes, as an Accelerate config file says
    (`train.accelerate_config`, or the one `accelerate launch --config_file` applied): FSDP2 sharding,
    DeepSpeed ZeRO 1/2, or DDP without one."""
    from affiner.training import zero

    launched = {key: os.environ.get(key, "").lower() for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")}
    if launched["ACCELERATE_USE_DEEPSPEED"] in {"1", "true"}:
        return Strategy("deepspeed", zero.check_settings(zero.launched_settings(), "accelerate launch's config"))
    if launched["ACCELERATE_USE_FSDP"] in {"1", "true"}:
        if os.environ.get("FSDP_VERSION", "1") != "2":
            raise AffinerError("accelerate launch was given an FSDP config; affiner shards with FSDP2: set "
                               "fsdp_config.fsdp_version: 2 in it.")
        return Strategy("fsdp2")
    if not accelerate_config:
        return Strategy()
    path = Path(accelerate_config).expanduser()
    settings = _read_yaml(path)
    kind = str(settings.get("distributed_type", "NO")).upper()
    if kind == "DEEPSPEED":
        return Strategy("deepspeed", zero.check_settings(settings.get("deepspeed_config") or {}, str(path)))
    if kind == "FSDP" and int((settings.get("fsdp_config") or {}).get("fsdp_version", 1)) != 2:
        raise AffinerError(f"{path}: affiner shards with FSDP2; set fsdp_config.fsdp_version: 2.")
    return Strategy("fsdp2") if kind == "FSDP" else Strategy()


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise AffinerError(f"train.accelerate_config {path} cannot be read: {error}.") from None
    if not isinstance(settings, dict):
        raise AffinerError(f"train.accelerate_config {path} must be a YAML mapping (accelerate config's file).")
    return settings
