"""The tuned model as one plain transformers model in fp32, checked before anything is written from it.

A full fine-tune is the run folder's own model. A LoRA or QLoRA adapter is merged into its base,
loaded in full precision even for QLoRA (merging into 4-bit weights would round the adapter away);
the merged model must give the unmerged model's logits on a test prompt, and no weight may be NaN
or infinite. The merge runs on the CPU unless asked otherwise (`--merge-device auto`): an fp32 copy
of an 8B base is 32 GB, more than the GPU that trained it in 4 bits may hold. `save_model` casts it
to the chosen dtype (by default the base's own, whatever the machine) and writes it with a generation
config that stops on the template's stop tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from affiner.core.config import RunConfig
from affiner.core.errors import AffinerError
from affiner.core.files import usual_permissions
from affiner.core.hub import hub_error, hub_kwargs
from affiner.core.devices import device
from affiner.core.gguf_cache import drop_gguf_quantizer, save_tokenizer
from affiner.core.models import adapter_weights, load_for, load_model, resolve_base
from affiner.core.runfolder import ADAPTER_WEIGHTS, RunFolder
from affiner.core.templates import Example, Template, encode_prompt, render_prompt, save_template

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedModel

EXAMPLE_QUESTION = "What does QUILT stand for?"  # the test prompt here; the card's example without a held-out one
MERGE_TOLERANCE = 1e-3  # relative to the largest logit: merging reorders fp32 sums, nothing more
MERGE_DEVICES = ("cpu", "auto")
SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # and "base"
CONFIG_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def example_of(run: RunFolder, template: Template, tokenizer) -> Example:
    """The question the card and the Modelfile show: the run's first held-out one whose prompt the template renders
    (a French run's example is French), else EXAMPLE_QUESTION."""
    for held_out in run.held_out()[:8]:
        example = Example(instruction=held_out.instruction, input=held_out.input)
        try:
            render_prompt(template, example, tokenizer)
            return example
        except AffinerError:
            continue
    return Example(instruction=EXAMPLE_QUESTION)


def resolve_merge_device(choice: str = "cpu") -> torch.device:
    """Where the fp32 model is merged and checked: the CPU unless `auto` asks for the GPU when there is one."""
    if choice not in MERGE_DEVICES:
        raise AffinerError(f"unknown --merge-device '{choice}'; supported: {', '.join(MERGE_DEVICES)}.")
    return device() if choice == "auto" else torch.device("cpu")


def saved_dtype(choice: str, config: RunConfig) -> torch.dtype:
    """The dtype the exported model is saved in: the one asked for, or with `base` the base model's own
    as its config.json records it (fp32 when it records none); never the precision of this machine."""
    if choice in SAVE_DTYPES:
        return SAVE_DTYPES[choice]
    if choice != "base":
        raise AffinerError(f"unknown --dtype '{choice}'; supported: base, {', '.join(SAVE_DTYPES)}.")
    from transformers import PretrainedConfig

    name = resolve_base(config.model.base)
    try:  # the raw config.json: no model class, so no remote code runs just to read one field
        raw, _ = PretrainedConfig.get_config_dict(name, revision=config.model.revision, **hub_kwargs(name))
    except (OSError, ValueError) as exc:
        raise hub_error("model config", config.model.base, exc) from None
    recorded = str(raw.get("dtype") or raw.get("torch_dtype") or "float32").removeprefix("torch.")
    if recorded not in CONFIG_DTYPES:
        if recorded != "auto":
            print(f"note: the base records dtype {recorded}; the export is saved in float32 (choose with --dtype).")
        return torch.float32
    return CONFIG_DTYPES[recorded]


def tuned_model(folder: Path, config: RunConfig, tokenizer, template: Template,
                merge_device: str = "cpu") -> PreTrainedModel:
    """The full fine-tune, or base + adapter merged; in fp32 on `merge_device`, in eval mode, ready to
    generate and save."""
    target = resolve_merge_device(merge_device)
    if config.method == "full":
        model = load_model(str(folder), full_precision=True, trust_remote_code=config.model.trust_remote_code,
                           on=target)
        check_finite_model(model)
    else:
        model = merged_model(folder, config, tokenizer, template, target)
    drop_gguf_quantizer(model)  # a GGUF-converted base saves as a plain model
    model.config.use_cache = True  # training switches it off; generation wants it
    model.eval()
    return model


def merged_model(folder: Path, config: RunConfig, tokenizer, template: Template,
                 target: torch.device | None = None) -> PreTrainedModel:
    """The run's adapter merged into its full-precision base on `target` (the CPU by default), with the
    same logits as before merging."""
    check_finite_adapter(folder)
    if config.method == "qlora":
        print("note: QLoRA run: the base is loaded in full precision for merging (the adapter is never merged "
              "into 4-bit weights), so the merged model differs slightly from the 4-bit model it was trained on.")
    # fp32 whatever the dtype saved: adding a low-rank update to bf16 weights would round away every
    # change smaller than 1/256 of a weight; the merged sum is rounded once, when it is saved.
    model = load_for(config, adapter=folder, full_precision=True, quantized=False, on=target or torch.device("cpu"))
    ids = encode_prompt(template, tokenizer, Example(instruction=EXAMPLE_QUESTION))
    probe = torch.tensor([ids], device=model.device)
    unmerged = _logits(model, probe)
    model = model.merge_and_unload()
    check_finite_model(model)
    gap = float((_logits(model, probe) - unmerged).abs().max())
    if not gap <= MERGE_TOLERANCE * max(1.0, float(unmerged.abs().max())):
        raise AffinerError(f"merging the adapter changed the model's logits by {gap:.3g} on a test prompt; "
                           "the merge is unsound for this model, so nothing was exported.")
    return model


def _logits(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _finite(tensor: torch.Tensor) -> bool:
    """No NaN and no inf: a float64 sum of finite float values is finite, and any NaN or inf makes it not."""
    return bool(torch.isfinite(tensor.sum(dtype=torch.float64)))


def check_finite_adapter(folder: Path) -> None:
    for name, tensor in adapter_weights(folder / ADAPTER_WEIGHTS).items():
        if not _finite(tensor):
            raise AffinerError(f"the adapter of {folder} holds NaN or infinite values in {name}; training diverged "
                               "(lower train.learning_rate, or use fp32/bf16), so there is nothing sound to export.")


def check_finite_model(model: PreTrainedModel) -> None:
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not _finite(tensor):
            raise AffinerError(f"the merged model holds NaN or infinite values in {name}; nothing was exported. "
                               "Check the base model and the run's adapter (training may have diverged).")


def cast_model(model: PreTrainedModel, dtype: torch.dtype) -> None:
    """The checked fp32 model in `dtype`, refused if a weight overflows it (fp16 tops out at 65504)."""
    if dtype == torch.float32:
        return
    model.to(dtype)
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not _finite(tensor):
            raise AffinerError(f"the merged weight {name} overflows {str(dtype).removeprefix('torch.')}; "
                               "nothing was exported. Save it with --dtype bf16 or --dtype fp32 instead.")


def save_model(model: PreTrainedModel, tokenizer, template: Template, target: Path,
               dtype: torch.dtype = torch.float32) -> None:
    """Safetensors in `dtype`, tokenizer, template.json and a generation config that stops on the template's
    stop tokens. The model is cast in place: write anything wanted from its fp32 weights first."""
    cast_model(model, dtype)
    model.generation_config = _generation_config(model, tokenizer, template)
    model.save_pretrained(target, safe_serialization=True)
    save_tokenizer(tokenizer, target)
    save_template(template, target)
    usual_permissions(target)


def _generation_config(model: PreTrainedModel, tokenizer, template: Template) -> GenerationConfig:
    """The model's own generation settings with the template's stop tokens; plain ones if those do not validate."""
    from transformers import GenerationConfig

    stop_ids = list(template.stop_token_ids) or [tokenizer.eos_token_id]
    generation = GenerationConfig.from_dict(model.generation_config.to_dict()) if model.generation_config else \
        GenerationConfig()
    generation.eos_token_id = stop_ids
    generation.pad_token_id = tokenizer.pad_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    try:
        generation.validate(strict=True)
    except (ValueError, TypeError):
        generation = GenerationConfig(eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
                                      bos_token_id=tokenizer.bos_token_id)
    return generation
