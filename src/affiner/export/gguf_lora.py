"""A run's LoRA adapter as a llama.cpp adapter GGUF: `llama-server -m base.gguf --lora adapter.gguf`, or
`ADAPTER ./adapter.gguf` in an Ollama Modelfile whose FROM is the base GGUF.

The file is what llama.cpp's `convert_lora_to_gguf.py` writes: general.type "adapter", adapter.type "lora",
adapter.lora.alpha, and for every adapted weight `<GGUF name>.lora_a` (rank x in) and `<GGUF name>.lora_b`
(out x rank), named, and for Llama's q/k rows permuted, exactly as `gguf_writer` writes the base weight.
llama.cpp then computes W x + alpha / rank * B (A x), which is the merged model's W' x. GPT-2's Conv1D
weights need no transposing here: peft's A and B are already in the (out, in) orientation of the GGUF.

What llama.cpp cannot compute is refused before anything is written, naming the setting: DoRA, modules
saved whole (modules_to_save, trainable tokens), a per-module rank or alpha, LoRA biases, layer
replication, aLoRA, and an update of the token embeddings or of a head tied to them. Every pair is
checked against the base's own tensor names and shapes, as llama.cpp checks them when it loads the adapter.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType as T
from gguf.quants import quantize

from affiner.core.errors import AffinerError
from affiner.core.models import adapter_weights
from affiner.core.runfolder import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from affiner.export.gguf_metadata import entry
from affiner.export.gguf_writer import (general_metadata, gguf_architecture, gguf_tensor_name, llama_cpp_shapes,
                                        reorder_rows, tensor_names, write_file)

ADAPTER_TYPES = ("f32", "f16", "bf16")  # rank-wide rows are rarely whole blocks: no quantised types
_PREFIX = "base_model.model."
# adapter_config.json settings llama.cpp has no way to apply, and what each one means to a user.
_UNSUPPORTED = {"use_dora": "DoRA (use_dora)", "modules_to_save": "modules saved whole (modules_to_save)",
                "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
                "alpha_pattern": "a per-module alpha (alpha_pattern)",
                "rank_pattern": "a per-module rank (rank_pattern)", "lora_bias": "LoRA biases (lora_bias)",
                "layer_replication": "layer replication (layer_replication)", "use_qalora": "QALoRA (use_qalora)",
                "alora_invocation_tokens": "an activated LoRA (alora_invocation_tokens)",
                "target_parameters": "LoRA on parameters (target_parameters)"}
_CONVERT_INSTEAD = ("Serve the merged model instead: `affiner export --merged --gguf` writes it as one GGUF, "
                    "which needs no adapter.")


@dataclass
class LoraGgufReport:
    path: Path
    architecture: str
    pairs: int  # adapted weights (each a lora_a and a lora_b tensor)
    ranks: list[int]  # the distinct ranks, ascending
    alpha: float  # adapter.lora.alpha: llama.cpp scales each update by alpha / its rank
    bytes: int


def write_lora_gguf(adapter_folder: Path, base_config, target: Path, gguf_type: str = "f32",
                    name: str = "adapter") -> LoraGgufReport:
    """The peft adapter in `adapter_folder` (adapter_config.json, adapter_model.safetensors) as a llama.cpp
    LoRA GGUF at `target`, for the base model whose transformers config is `base_config`."""
    if gguf_type not in ADAPTER_TYPES:
        raise AffinerError(f"unknown adapter GGUF type '{gguf_type}' (supported: {', '.join(ADAPTER_TYPES)}).")
    arch = gguf_architecture(base_config)
    settings = _adapter_settings(Path(adapter_folder))
    pairs = _gguf_pairs(Path(adapter_folder), base_config, arch)
    _check_against_base(pairs, base_config, adapter_folder)
    ranks = sorted({a.shape[0] for a, _ in pairs.values()})
    alpha = _llama_cpp_alpha(settings, ranks)
    entries = general_metadata(name, gguf_type, "adapter") + [
        entry("adapter.type", "lora", T.STRING), entry("adapter.lora.alpha", alpha, T.FLOAT32)]
    tensors = ((f"{base}.lora_{part}", _cast(array, gguf_type), _raw_type(gguf_type))
               for base, (a, b) in pairs.items() for part, array in (("a", a), ("b", b)))
    _, size = write_file(target, arch, entries, tensors)
    return LoraGgufReport(Path(target), arch, len(pairs), ranks, alpha, size)


def _adapter_settings(folder: Path) -> dict:
    """adapter_config.json, after refusing what llama.cpp cannot apply."""
    try:
        settings = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AffinerError(f"cannot read the LoRA adapter's {folder / ADAPTER_CONFIG} ({exc}); a LoRA GGUF is written "
                           "from a peft adapter folder (adapter_config.json and adapter_model.safetensors).") from None
    if settings.get("peft_type", "LORA") != "LORA":
        raise AffinerError(f"the adapter in {folder} is a {settings['peft_type']} adapter; llama.cpp loads LoRA "
                           f"adapters only. {_CONVERT_INSTEAD}")
    used = [label for key, label in _UNSUPPORTED.items() if settings.get(key)]
    if settings.get("bias", "none") != "none":
        used.append(f"trained biases (bias={settings['bias']!r})")
    if used:
        raise AffinerError(f"the adapter in {folder} uses {', '.join(used)}, which a llama.cpp LoRA GGUF cannot "
                           f"carry (llama.cpp adds alpha / rank * B A to plain weights, nothing else). "
                           f"{_CONVERT_INSTEAD}")
    return settings


def _gguf_pairs(folder: Path, base_config, arch: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """GGUF base tensor name -> (A, B) in llama.cpp's layout, from the adapter's safetensors."""
    names = tensor_names(arch, base_config)
    halves: dict[str, dict[str, np.ndarray]] = {}
    for key, array in adapter_weights(folder / ADAPTER_WEIGHTS, as_numpy=True).items():
        module, part = _split_key(key, folder)
        gguf_name = gguf_tensor_name(names, module + ".weight")
        if gguf_name is None or gguf_name == "token_embd.weight":
            raise AffinerError(f"the adapter in {folder} adapts {module}, a weight llama.cpp does not apply a "
                               f"LoRA GGUF to (token embeddings, or a layer it has no name for). {_CONVERT_INSTEAD}")
        halves.setdefault(gguf_name, {})[part] = array.astype(np.float32)
    pairs = {}
    for gguf_name, half in halves.items():
        if set(half) != {"A", "B"}:
            raise AffinerError(f"the adapter in {folder} has only lora_{''.join(half)} for {gguf_name}: the "
                               "adapter file is incomplete.")
        pairs[gguf_name] = (np.ascontiguousarray(half["A"]), reorder_rows(arch, base_config, gguf_name, half["B"]))
    if not pairs:
        raise AffinerError(f"the adapter in {folder} holds no LoRA weights.")
    return pairs


def _split_key(key: str, folder: Path) -> tuple[str, str]:
    """("model.layers.0.self_attn.q_proj", "A") from peft's saved key of a lora_A or lora_B weight."""
    stem = key.removeprefix(_PREFIX)
    for part in ("A", "B"):
        if stem.endswith(f".lora_{part}.weight"):
            return stem.removesuffix(f".lora_{part}.weight"), part
    raise AffinerError(f"the adapter in {folder} holds {key}, which is not a LoRA A or B weight "
                       f"(an embedding update, a bias or a module saved whole): llama.cpp cannot apply it. "
                       f"{_CONVERT_INSTEAD}")


def _check_against_base(pairs: dict[str, tuple[np.ndarray, np.ndarray]], base_config, folder: Path) -> None:
    """Every pair must adapt a weight of the base GGUF and fit its shape, as llama.cpp requires on loading."""
    shapes = _base_shapes(base_config)
    for gguf_name, (a, b) in pairs.items():
        shape = shapes.get(gguf_name)
        if shape is None:
            raise AffinerError(f"the adapter in {folder} adapts {gguf_name}, which a GGUF of this base does not "
                               "hold (an output head tied to the token embeddings?); llama.cpp would refuse it. "
                               f"{_CONVERT_INSTEAD}")
        if len(shape) != 2 or a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != shape:
            raise AffinerError(f"the adapter in {folder} does not fit this base: {gguf_name} is {shape} but its "
                               f"update B A is {b.shape} x {a.shape}. Was it trained on another base model?")


def _base_shapes(base_config) -> dict[str, tuple[int, ...]]:
    """The base GGUF's tensor shapes, from a model built on the meta device: no weight is allocated."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(base_config)
    return llama_cpp_shapes(model)


def _llama_cpp_alpha(settings: dict, ranks: list[int]) -> float:
    """adapter.lora.alpha: llama.cpp scales by alpha / rank, peft by lora_alpha / r, or with rsLoRA by
    lora_alpha / sqrt(r), which one alpha gives for one rank only."""
    alpha = float(settings.get("lora_alpha", 8))
    if not settings.get("use_rslora"):
        return alpha
    if len(ranks) != 1:
        raise AffinerError(f"this rsLoRA adapter has ranks {ranks}: llama.cpp's one alpha / rank cannot give "
                           f"each its alpha / sqrt(rank). {_CONVERT_INSTEAD}")
    return alpha * math.sqrt(ranks[0])


def _cast(array: np.ndarray, gguf_type: str) -> np.ndarray:
    return quantize(array, getattr(GGMLQuantizationType, gguf_type.upper()))


def _raw_type(gguf_type: str) -> GGMLQuantizationType | None:
    return GGMLQuantizationType.BF16 if gguf_type == "bf16" else None  # f32 and f16 are plain numpy dtypes
