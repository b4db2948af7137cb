"""Token ids with response-only labels, fast token counts, and dynamic padding.

Rows reach here already cleaned by the pipeline (empty and over-long rows are dropped and counted
there, once), so tokenising never drops or truncates: a truncated answer teaches the model to stop
mid-sentence, or never.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os

import torch

from affiner.core.loss import IGNORE_INDEX
from affiner.core.templates import Example, Template, encode_prompt, encode_response, render_prompt, starts_with_bos


def tokenize(examples: list[Example], template: Template, tokenizer) -> list[dict[str, list[int]]]:
    """Prompt + response ids; labels are -100 on the prompt, so the loss is on the response (and its stop token)."""
    from tqdm.auto import tqdm

    features = []
    for example in tqdm(examples, desc="tokenizing", unit="row", disable=len(examples) < 5000, leave=False):
        prompt = encode_prompt(template, tokenizer, example)
        response = encode_response(template, tokenizer, example)
        features.append({"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response})
    return features


def token_lengths(examples: list[Example], template: Template, tokenizer, batch_size: int = 4096) -> list[int]:
    """len(encode_prompt) + len(encode_response) for every example, tokenised in batches (100k rows in seconds)."""
    from tqdm.auto import tqdm

    if template.is_chat:  # the chat template renders each conversation apart; no batch shortcut
        return [len(encode_prompt(template, tokenizer, e)) + len(encode_response(template, tokenizer, e))
                for e in tqdm(examples, desc="counting tokens", unit="row", disable=len(examples) < 5000, leave=False)]
    lengths = []
    with _parallel_tokenizer():
        for start in tqdm(range(0, len(examples), batch_size), desc="counting tokens", unit="batch",
                          disable=len(examples) < 5 * batch_size, leave=False):
            chunk = examples[start: start + batch_size]
            prompts = [render_prompt(template, e) for e in chunk]
            has_bos = [starts_with_bos(tokenizer, p) for p in prompts]  # encode_prompt's rule, in batches
            counted = {flag: iter(_count_tokens(tokenizer, [p for p, b in zip(prompts, has_bos) if b == flag],
                                                add_special_tokens=not flag)) for flag in (False, True)}
            responses = _count_tokens(tokenizer, [template.response_prefix + e.response for e in chunk], False)
            # + 1: the EOS that encode_response appends.
            lengths += [next(counted[flag]) + n + 1 for flag, n in zip(has_bos, responses)]
    return lengths


# Normalizers that never shorten the text, and by how much the others can: NFC/NFKC compose at most 4 code
# points into one (U+1F82, alpha with three marks); anything else (Strip, StripAccents, a Replace that
# shortens, a precompiled map) can shorten without bound, and then no character count is certain.
_KEEPS_LENGTH = {"NFD", "NFKD", "Lowercase", "Prepend", "ByteLevel"}
_COMPOSES = {"NFC": 4, "NFKC": 4}
# Pre-tokenizers that keep every character (split only): Whitespace and the like drop spaces.
_KEEPS_TEXT = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts"}


def response_lengths(examples: list[Example], template: Template, tokenizer) -> list[int]:
    """len(encode_response) of every example, counted as `token_lengths` counts it (with its stop token)."""
    if template.is_chat:
        return [len(encode_response(template, tokenizer, e)) for e in examples]
    return [n + 1 for n in _count_tokens(tokenizer, [template.response_prefix + e.response for e in examples], False)]


@functools.lru_cache(maxsize=4)
def chars_per_token(tokenizer) -> int | None:
    """The most characters of text one token can stand for: no row of more than max_length times this
    many characters fits in max_length tokens, whatever it says. None where the tokenizer can make a token of
    unbounded text (an unknown word becoming one [UNK], a normalizer stripping characters) or is not a
    Rust tokenizer we can read. Computed once per tokenizer (a 262k vocabulary takes a fraction of a second)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        normalizer, pre_tokenizer = _state(backend.normalizer), _state(backend.pre_tokenizer)
        shrink = _normalizer_shrink(normalizer)
        model = backend.model
        byte_level = "ByteLevel" in _types(normalizer) | _types(pre_tokenizer)
        every_char_a_token = type(model).__name__ == "BPE" and (
            model.byte_fallback or byte_level or (model.unk_token is not None and not model.fuse_unk))
        stripping = any(t.lstrip or t.rstrip for t in backend.get_added_tokens_decoder().values())
        if shrink is None or not _pre_tokenizer_keeps(pre_tokenizer) or not every_char_a_token or stripping:
            return None
        return shrink * max(map(len, backend.get_vocab(with_added_tokens=True)))
    except (AttributeError, KeyError, TypeError, ValueError):  # laid out otherwise: no shortcut, only counting
        return None


def _types(state: dict | None) -> set[str]:
    """Every component type in a normalizer's or pre-tokenizer's tree."""
    if state is None:
        return set()
    children = state.get("normalizers") or state.get("pretokenizers") or []
    return {state["type"]}.union(*(_types(child) for child in children))


def _state(component) -> dict | None:
    return None if component is None else json.loads(component.__getstate__())


def _normalizer_shrink(state: dict | None) -> int | None:
    if state is None or state["type"] in _KEEPS_LENGTH:
        return 1
    if state["type"] in _COMPOSES:
        return _COMPOSES[state["type"]]
    if state["type"] == "Replace" and "String" in state["pattern"] \
            and len(state["content"]) >= len(state["pattern"]["String"]):
        return 1  # " " -> "▁" (Llama, Gemma)
    if state["type"] == "Sequence":
        factors = [_normalizer_shrink(s) for s in state["normalizers"]]
        return None if None in factors else functools.reduce(lambda a, b: a * b, factors, 1)
    return None


def _pre_tokenizer_keeps(state: dict | None) -> bool:
    if state is None or state["type"] in _KEEPS_TEXT:
        return True
    if state["type"] == "Split":
        return state["behavior"] != "Removed"
    if state["type"] == "Sequence":
        return all(_pre_tokenizer_keeps(s) for s in state["pretokenizers"])
    return False


def _count_tokens(tokenizer, texts: list[str], add_special_tokens: bool) -> list[int]:
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a Python (slow) tokenizer
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]
    # The Rust tokenizer directly, without offsets: a third of the time of the transformers wrapper.
    return [len(encoding.ids) for encoding in backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]


@contextlib.contextmanager
def _parallel_tokenizer():
    """Let the Rust tokenizer use every core for one batch job, then restore the setting (forks stay safe)."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def collate(features: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest row of this batch only (dynamic padding); padding is never supervised."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(features), width), dtype=torch.long)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        input_ids[row, :n] = torch.tensor(feature["input_ids"])
        labels[row, :n] = torch.tensor(feature["labels"])
        attention[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


