"""Batched generation for evaluation: every model answers the same prompts with the same decoding.

A batch that runs out of GPU memory is retried at half the size, down to one question at a time,
rather than losing the evaluation: the answers are the same at any batch size (greedy decoding).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from affiner.core.errors import AffinerError
from affiner.core.decoding import decode_rows, left_pad, tokens_for
from affiner.core.devices import device
from affiner.core.models import max_positions
from affiner.core.stopping import RowEnds, cut_at_turn, turn_markers
from affiner.core.settings import GREEDY, Settings
from affiner.core.templates import Example, Template, encode_prompt


@dataclass(frozen=True)
class Answer:
    text: str
    stopped: bool  # ended with a stop token before the limit
    tokens: int
    new_turn: bool = False  # ran on into a new turn of the template (cut there): it did not stop by itself


@torch.no_grad()
def generate(model, tokenizer, template: Template, examples: list[Example], max_new_tokens: int,
             batch_size: int = 16, sampling: Settings = GREEDY, desc: str = "generating") -> list[Answer]:
    """Answers generated in left-padded batches of similar lengths, returned in the examples' order.

    Greedy batches give exactly the answers of one-by-one generation (tested): padding is masked, every
    stop token of the template ends a row, and a row leaves its batch as soon as it ends (a stop token, a new
    turn of the template, or the limit). A batch out of memory is retried at half the size.
    """
    prompts = [encode_prompt(template, tokenizer, e) for e in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    stop_ids = list(template.stop_token_ids) or [tokenizer.eos_token_id]
    markers = turn_markers(template)
    if not sampling.greedy:
        torch.manual_seed(sampling.seed or 0)
    answers: dict[int, Answer] = {}
    start, size = 0, batch_size
    window = max_positions(model)
    if window and max(map(len, prompts), default=0) + max_new_tokens > window:
        # Past its positions a model degrades into noise (or fails): answers stop at the window, said once.
        print(f"note: {max_new_tokens} new tokens do not fit the model's {window}-token window after the longest "
              "prompt; answers stop at the window.")
    with tqdm(total=len(order), desc=desc, unit="question", leave=False) as progress:
        while start < len(order):
            chunk = order[start:start + size]
            input_ids, attention = left_pad([prompts[i] for i in chunk], tokenizer.pad_token_id)
            limits = [max(1, min(max_new_tokens, window - len(prompts[i]))) if window else max_new_tokens
                      for i in chunk]
            try:
                output = decode_rows(model, input_ids.to(device()), attention.to(device()), max(limits), stop_ids,
                                     sampling, RowEnds(tokenizer, limits, [markers] * len(chunk)))
            except torch.OutOfMemoryError:
                output = None  # handled outside the except block, whose traceback still holds the batch's tensors
            if output is None:
                size = halve_batch(size)
                continue
            for row, index in enumerate(chunk):
                answers[index] = decode(output[row], stop_ids, tokenizer, markers)
            start += len(chunk)
            progress.update(len(chunk))
    return [answers[i] for i in range(len(examples))]


def eval_decoding(config) -> Settings:
    """How a run's evaluation (and its training probe) decodes: greedily, with the config's eval.repetition_penalty."""
    return replace(GREEDY, repetition_penalty=config.eval.repetition_penalty)


def halve_batch(size: int) -> int:
    """The batch size to retry with after running out of memory at `size`; at one question, a user's error."""
    if size <= 1:
        raise AffinerError("out of GPU memory with one question per batch: the model and its answers do not fit "
                           "on this GPU. Lower --max-new-tokens (eval.max_new_tokens), shorten the questions, "
                           "or use a GPU with more memory; eval.batch_size / --batch-size is already down to 1.")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # give back what the failed batch reserved before trying again
    smaller = size // 2
    print(f"out of memory with batch {size}: retrying with {smaller}")
    return smaller


def decode(new_ids: list[int], stop_ids: list[int], tokenizer, markers: tuple[str, ...] = ()) -> Answer:
    """The answer in `new_ids`: up to its first stop token, or up to a new turn of the template (cut), counted
    in the tokens generated up to where it was cut (never tokenised again: the model may split words its own way)."""
    cut = next((i for i, token in enumerate(new_ids) if token in stop_ids), None)
    kept = new_ids if cut is None else new_ids[:cut]
    text, new_turn = cut_at_turn(tokenizer.decode(kept, skip_special_tokens=True), markers)
    # Cut at a new turn: the tokens generated up to the marker, as serve's usage counts them.
    tokens = tokens_for(text, kept, tokenizer) if new_turn else len(kept)
    return Answer(text=text.strip(), stopped=cut is not None and not new_turn, tokens=tokens, new_turn=new_turn)
