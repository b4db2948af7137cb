"""Scores of answers against references, and the teacher-forced loss of the reference answers."""

from __future__ import annotations

import torch

from affiner.core.loss import kept_head_buffers, token_losses
from affiner.core.devices import device
from affiner.core.templates import Example, Template
from affiner.core.models import max_positions
from affiner.data.tokens import collate, token_lengths, tokenize
from affiner.evaluation import metrics
from affiner.evaluation.generation import Answer, halve_batch


# Padded positions scored in one batch of held-out losses (eval.batch_size still caps the rows): rows sorted by length
# fill batches by tokens, so many short rows go together and a long one pads no short one to its length. Measured on
# the instruct recipe's training probe (its first 32 held-out rows, references of 10-300 tokens; Gemma 3 270M in
# bf16 with its LoRA adapter, 2 cores): one batch of 32 padded to the longest 22-23 s, by length within BATCH_TOKENS
# 15 s.
BATCH_TOKENS = 4096


@torch.no_grad()
def held_out_losses(model, tokenizer, template: Template, examples: list[Example],
                    batch_size: int = 16) -> tuple[list[float], list[int]]:
    """Summed loss and token count of each example's reference answer (with its EOS), teacher-forced; a reference
    running past the model's context is scored on the part that fits (`over_context` counts them), a row without
    an answer to score (a --test row with a reference only) counts (0.0, 0): no tokens, no weight. None at all
    ([], []) when no row has one.
    Rows are batched by length, up to `batch_size` rows and BATCH_TOKENS padded positions a batch. A batch out of
    memory is retried at half its rows; the finished batches are kept."""
    scored = [i for i, e in enumerate(examples) if has_answer(e)]
    if not scored:
        return [], []
    sums, counts = _losses(model, tokenizer, template, [examples[i] for i in scored], batch_size)
    all_sums, all_counts = [0.0] * len(examples), [0] * len(examples)
    for i, total, count in zip(scored, sums, counts):
        all_sums[i], all_counts[i] = total, count
    return all_sums, all_counts


def has_answer(example: Example) -> bool:
    """Whether a held-out row has a question and an answer whose loss can be taken."""
    return bool(example.instruction.strip() and example.response.strip())


def _losses(model, tokenizer, template: Template, examples: list[Example], batch_size: int) -> tuple[list, list]:
    context = max_positions(model)
    features = [{k: v[:context] for k, v in f.items()} if context else f
                for f in tokenize(examples, template, tokenizer)]
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    lengths = [len(features[i]["input_ids"]) for i in order]
    sums, counts = [], []
    start, size = 0, batch_size
    with kept_head_buffers():  # on a CPU, the head's [positions x vocabulary] tensors reused batch to batch
        while start < len(order):
            rows_here = [features[i] for i in order[start:start + rows_fitting(lengths, start, size, BATCH_TOKENS)]]
            batch = {k: v.to(device()) for k, v in collate(rows_here, tokenizer.pad_token_id).items()}
            try:
                losses, rows = token_losses(model, batch)
            except torch.OutOfMemoryError:
                losses = None  # handled outside the except block, whose traceback still holds the batch's tensors
            if losses is None:
                del batch
                size = halve_batch(len(rows_here))
                continue
            n_rows = batch["input_ids"].shape[0]
            sums += torch.zeros(n_rows, device=losses.device).index_add_(0, rows, losses).tolist()
            counts += torch.bincount(rows, minlength=n_rows).tolist()
            start += len(rows_here)
    by_example = sorted(zip(order, sums, counts))
    return [s for _, s, _ in by_example], [c for _, _, c in by_example]


def rows_fitting(lengths: list[int], start: int, max_rows: int, max_tokens: int) -> int:
    """How many rows from `start` of ascending `lengths` make one batch: at most `max_rows`, and at most `max_tokens`
    positions once padded to its longest (the last); at least one row."""
    n = 1
    while start + n < len(lengths) and n < max_rows and (n + 1) * lengths[start + n] <= max_tokens:
        n += 1
    return n


def over_context(model, tokenizer, template: Template, examples: list[Example]) -> int:
    """How many examples' prompt + reference run past the model's context (their loss is on the part that fits)."""
    context = max_positions(model)
    return sum(n > context for n in token_lengths(examples, template, tokenizer)) if context else 0


def key_of(example: Example, key_before: str | None = None) -> str:
    """The part of the reference that makes an answer right: the row's own key, else the reference's text before
    `key_before` (eval.key_before), else "" (no key: "contains the key" falls back to the whole reference)."""
    if example.key:
        return example.key
    if key_before and key_before in example.expected:
        return example.expected.split(key_before, 1)[0].strip()
    return ""


def score_answers(examples: list[Example], answers: list[Answer], key_before: str | None = None) -> list[dict[str, float]]:
    """Every score of every answer; "contains_key" only when some row has a key (its own, or by `key_before`)."""
    scores = [metrics.per_example_scores(e.instruction, e.expected, a.text, e.input) | {"stopped": float(a.stopped),
                                                                              "new_turn": float(a.new_turn),
                                                                              "tokens": float(a.tokens)}
              for e, a in zip(examples, answers)]
    for row, similarity in zip(scores, metrics.embedding_similarity([a.text for a in answers],
                                                                    [e.expected for e in examples])):
        row["embedding"] = similarity
    keys = [key_of(e, key_before) for e in examples]
    if any(keys):
        for row, key, example, answer in zip(scores, keys, examples, answers):
            row["contains_key"] = float(metrics.contains_reference(answer.text, key or example.expected))
    return scores


def correct(scores: dict[str, float]) -> float:
    """The headline's verdict on one answer: it contains the key when the rows have keys, else the reference."""
    return scores.get("contains_key", scores["contains"])


def headline(scores: list[dict[str, float]]) -> dict:
    """The two figures of the quickstart, as counts and rates: answers right (by the headline's measure,
    `judged_by`) and answers that stopped."""
    n = len(scores)
    correct_answers = int(sum(correct(s) for s in scores))
    stopped = int(sum(s["stopped"] for s in scores))
    return {"questions": n, "correct": correct_answers, "accuracy": correct_answers / n if n else 0.0,
            "judged_by": "contains_key" if scores and "contains_key" in scores[0] else "contains", "stopped": stopped,
            "stop_rate": stopped / n if n else 0.0,
            "mean_answer_tokens": sum(s["tokens"] for s in scores) / n if n else 0.0}
