"""The vocabulary of a GGUF file: copied from the GGUF the base came from, or written for a byte-level
BPE tokenizer the way transformers' GGUF loader rebuilds it; and the check that it tokenises alike.
"""

from __future__ import annotations

import json
from pathlib import Path

from gguf import GGUFValueType as T

from affiner.core.errors import AffinerError
from affiner.export.gguf_metadata import Entry, entry, read_metadata

# llama.cpp's token types (tokenizer.ggml.token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 2, 3, 4, 5
_CONVERT_INSTEAD = "Export --merged and convert it with llama.cpp's convert_hf_to_gguf.py instead."


def tokenizer_metadata(tokenizer, vocab_rows: int, source_gguf: Path | None) -> tuple[list[Entry], str]:
    """(tokenizer.* entries, where the vocabulary came from, for the report)."""
    if source_gguf is not None:
        # The base's own chat template (if its GGUF has one) is not the run's: llama.cpp would render chats with it.
        copied = [e for e in _copied_tokenizer(source_gguf, vocab_rows) if e[0] != "tokenizer.chat_template"]
        return copied + _chat_template(tokenizer), f"copied from {source_gguf.name}"
    return _byte_level_tokenizer(tokenizer, vocab_rows), "byte-level BPE (vocabulary and merges)"


def _chat_template(tokenizer) -> list[Entry]:
    """The run's prompt format as the tokenizer carries it (a Jinja chat template), for llama.cpp's chats."""
    template = getattr(tokenizer, "chat_template", None)
    return [entry("tokenizer.chat_template", template, T.STRING)] if isinstance(template, str) else []


def _copied_tokenizer(source: Path, vocab_rows: int) -> list[Entry]:
    out = read_metadata(source, prefix="tokenizer.")
    tokens = next((v for k, v, *_ in out if k == "tokenizer.ggml.tokens"), [])
    if len(tokens) != vocab_rows:
        raise AffinerError(f"the vocabulary of {source} has {len(tokens)} tokens but the model has {vocab_rows} "
                           "embedding rows; the GGUF would not load.")
    return out


def _byte_level_tokenizer(tokenizer, vocab_rows: int) -> list[Entry]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or pre is None or spec.get("normalizer") is not None:
        kind = f"{model.get('type', type(tokenizer).__name__)} with pre-tokenizer " \
               f"{(spec.get('pre_tokenizer') or {}).get('type')} and normalizer {(spec.get('normalizer') or {}).get('type')}"
        raise AffinerError(f"affiner writes GGUF vocabularies for byte-level BPE tokenizers (GPT-2, Llama 3, Qwen "
                           f"style) and copies those of GGUF bases; this tokenizer is {kind}. {_CONVERT_INSTEAD}")
    if len(tokenizer) > vocab_rows:
        raise AffinerError(f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab_rows} embedding rows.")
    tokens, types = _vocabulary(spec, tokenizer.unk_token_id, vocab_rows)
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    probe = tokenizer("a")["input_ids"]
    out = [entry("tokenizer.ggml.model", "gpt2", T.STRING), entry("tokenizer.ggml.pre", pre, T.STRING),
           entry("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
           entry("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32),
           entry("tokenizer.ggml.add_bos_token", bool(probe) and probe[0] == tokenizer.bos_token_id
                 and tokenizer.bos_token_id is not None, T.BOOL),
           entry("tokenizer.ggml.add_eos_token", bool(probe) and probe[-1] == tokenizer.eos_token_id
                 and tokenizer.eos_token_id is not None and len(probe) > 1, T.BOOL)]
    if merges:
        out.append(entry("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING))
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unknown", tokenizer.unk_token_id), ("padding", tokenizer.pad_token_id)):
        if token_id is not None:
            out.append(entry(f"tokenizer.ggml.{key}_token_id", int(token_id), T.UINT32))
    return out + _chat_template(tokenizer)


def _vocabulary(spec: dict, unk_id: int | None, vocab_rows: int) -> tuple[list[str], list[int]]:
    """(token text, llama.cpp token type) for every embedding row, added tokens included."""
    tokens: list[str | None] = [None] * vocab_rows
    types = [TOKEN_NORMAL] * vocab_rows
    for token, index in spec["model"]["vocab"].items():
        if index < vocab_rows:
            tokens[index] = token
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_rows:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
    for index, token in enumerate(tokens):
        if token is None:  # embedding rows past the vocabulary (padded for speed): never produced
            tokens[index], types[index] = f"[PAD{index}]", TOKEN_UNUSED
    if unk_id is not None and types[unk_id] == TOKEN_NORMAL:
        types[unk_id] = TOKEN_UNKNOWN
    return tokens, types


def _pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer that transformers' GGUF loader rebuilds the same way."""
    if not pre:
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"  # GPT-2's own split, the default of transformers' byte-level GGUF tokenizer
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel" \
            and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space"):
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_PRE_TOKENIZER_SPLITS,
        )

        regex = (steps[0].get("pattern") or {}).get("Regex")
        return next((name for name, split in GGUF_PRE_TOKENIZER_SPLITS.items() if split == regex), None)
    return None


def check_tokenizer(path: Path, tokenizer, texts: list[str]) -> None:
    """A tokenizer rebuilt from the file must give the same ids as the run's, special tokens included;
    the file is removed when it does not."""
    from transformers import AutoTokenizer

    rebuilt = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    specials = " ".join(t for t in (tokenizer.bos_token, tokenizer.eos_token) if t)
    probes = [*texts, "Hello world! What does QUILT stand for?\n### Answer: 42 — déjà vu, 東京.", specials]
    for text in probes:
        ours, theirs = tokenizer(text)["input_ids"], rebuilt(text)["input_ids"]
        if ours != theirs:
            path.unlink(missing_ok=True)
            raise AffinerError(f"the tokenizer rebuilt from the GGUF file splits {text[:60]!r} into {theirs[:12]} "
                               f"where the model's own gives {ours[:12]}; no GGUF was written. {_CONVERT_INSTEAD}")
