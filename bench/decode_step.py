"""Greedy decode steps with a repetition penalty: transformers' RepetitionPenaltyLogitsProcessor against affiner's
AnswerRepetitionPenalty (core/decoding.py), and without a penalty, on the embedded Gemma 3 270M.

    .venv/bin/python bench/decode_step.py [--batch 32] [--steps 64] [--rounds 2]

The instruct recipe's first held-out prompts, in the precision `auto` picks, decoded `--steps` new tokens with no
stop (every row stays in the batch), each variant in turn, the order alternating from round to round, in one
process after a warm-up decode. Prints milliseconds per decode step and their ratios; the two penalties must give
the same tokens.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import time
from dataclasses import replace

from affiner.core import decoding
from affiner.core.decoding import decode_rows, left_pad
from affiner.core.settings import GREEDY
from affiner.core.templates import encode_prompt
from instruct_questions import instruct_questions


def transformers_penalty(settings, prompt_width: int) -> list:
    from transformers import RepetitionPenaltyLogitsProcessor

    return [RepetitionPenaltyLogitsProcessor(settings.repetition_penalty, prompt_ignore_length=prompt_width)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    config, tokenizer, model, template, examples = instruct_questions(args.batch)
    input_ids, attention = left_pad([encode_prompt(template, tokenizer, e) for e in examples], tokenizer.pad_token_id)
    penalised = replace(GREEDY, repetition_penalty=config.eval.repetition_penalty)
    ours = decoding.penalties
    variants = {"transformers' penalty": (penalised, transformers_penalty), "affiner's penalty": (penalised, ours),
                "no penalty": (GREEDY, ours)}
    decode_rows(model, input_ids, attention, 4, [], penalised)  # warm-up
    seconds, tokens = dict.fromkeys(variants, 0.0), {}
    for round_ in range(args.rounds):
        for name in (list(variants) if round_ % 2 == 0 else list(reversed(variants))):
            settings, processors = variants[name]
            decoding.penalties = processors  # what decode_rows's picker builds its processors from
            started = time.perf_counter()
            tokens[name] = decode_rows(model, input_ids, attention, args.steps, [], settings)
            seconds[name] += time.perf_counter() - started
    decoding.penalties = ours
    assert tokens["transformers' penalty"] == tokens["affiner's penalty"], "the two penalties chose other tokens"
    steps = args.steps * args.rounds
    reference = seconds["transformers' penalty"]
    print(f"{args.batch} rows, {args.steps} steps x {args.rounds} rounds, {model.dtype}")
    for name, total in seconds.items():
        print(f"  {name:22s} {total / steps * 1000:6.1f} ms/step  {reference / total:4.2f}x transformers' penalty")
    print("  the two penalties chose the same tokens")


if __name__ == "__main__":
    main()
