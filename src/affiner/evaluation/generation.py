"""Batched generation for evaluation: every model answers the same prompts with the same decoding.

A batch that runs out of GPU memory is retried at half the size, down to one question at a time,
rather than losing the evaluation: the answers are the same at any batch size (greedy decoding).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from affiner.core.errors import AffinerError
from affiner.core.decoding import RowsDone, decode_queue, tokens_for
from affiner.core.devices import device
from affiner.core.models import max_positions
from affiner.core.stopping import RowEnds, cut_at_turn, trim_unfinished_marker, turn_markers
from affiner.core.settings import GREEDY, Settings
from affiner.core.templates import Example, Template, encode_prompt


@dataclass(frozen=True)
class Answer:
    text: str
    stopped: bool  # ended with a stop token before the limit
    tokens: int
    new_turn: bool = False  # ran on into a new turn of the template (cut there): it did not stop by itself


@torch.no_grad()
def generate(model, tokenizer, template: Template, examples: list[Example], max_new_tokens: int | list[int],
             batch_size: int = 16, sampling: Settings = GREEDY, desc: str = "generating") -> list[Answer]:
    """Answers generated `batch_size` at a time, returned in the examples' order; `max_new_tokens` for all of them
    or for each. The questions allowed the most tokens go first, shortest prompts first among equals: the rows
    that can run longest start early and those with less to write fill the batch around them at the end.

    Greedy batches give exactly the answers of one-by-one generation (tested): padding is masked, every
    stop token of the template ends a row, a row leaves its batch as soon as it ends (a stop token, a new
    turn of the template, or the limit) and the next questions take the room (`decode_queue`). Out of memory,
    the questions not yet answered start again at half the batch size.
    """
    prompts = [encode_prompt(template, tokenizer, e) for e in examples]
    stop_ids = list(template.stop_token_ids) or [tokenizer.eos_token_id]
    markers = turn_markers(template)
    if not sampling.greedy:
        torch.manual_seed(sampling.seed or 0)
    answers: dict[int, Answer] = {}
    size = batch_size
    window = max_positions(model)
    asked = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else max_new_tokens
    if window and max((len(p) + n for p, n in zip(prompts, asked)), default=0) > window:
        # Past its positions a model degrades into noise (or fails): answers stop at the window, said once.
        print(f"note: {max(asked)} new tokens do not fit the model's {window}-token window after the longest "
              "prompt; answers stop at the window.")
    limits = [max(1, min(n, window - len(p))) if window else n for p, n in zip(prompts, asked)]
    ends = RowEnds(tokenizer, limits, [markers] * len(prompts))
    with tqdm(total=len(prompts), desc=desc, unit="question", leave=False) as progress:
        while len(answers) < len(prompts):
            left = sorted((i for i in range(len(prompts)) if i not in answers), key=lambda i: (-asked[i], len(prompts[i])))
            out_of_memory = False
            try:
                for row, tokens in decode_queue(model, [prompts[i] for i in left], tokenizer.pad_token_id,
                                                max(limits), stop_ids, sampling, _rows_of(ends, left), size, device()):
                    answers[left[row]] = decode(tokens, stop_ids, tokenizer, markers)
                    progress.update(1)
            except torch.OutOfMemoryError:
                out_of_memory = True  # handled outside the except block, whose traceback still holds the batch
            if out_of_memory:  # the answers already given are kept
                size = halve_batch(size)
    return [answers[i] for i in range(len(examples))]


def _rows_of(ends: RowEnds, rows: list[int]) -> RowsDone:
    """`ends`, which knows every prompt's limit, asked about the rows of a queue of `rows`' prompts."""
    return lambda queued, new_tokens: ends([rows[i] for i in queued], new_tokens)


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
    text = text if new_turn or cut is not None else trim_unfinished_marker(text, markers)
    # Cut at a new turn: the tokens generated up to the marker, as serve's usage counts them.
    tokens = tokens_for(text, kept, tokenizer) if new_turn else len(kept)
    return Answer(text=text.strip(), stopped=cut is not None and not new_turn, tokens=tokens, new_turn=new_turn)
