"""Generation with a refilled batch against batch after batch, on the instruct recipe's held-out questions.

    .venv/bin/python bench/generation_queue.py [--questions 128] [--batch 64] [--rounds 1]

The embedded Gemma 3 270M (the instruct recipe's base, in the precision `auto` picks) answers the first
`--questions` held-out instructions with the recipe's decoding (greedy, repetition penalty 1.2, up to 256 tokens)
two ways, in turn in one process: "batches" as affiner decoded before `decode_queue` (a batch of `--batch` questions
runs until its last row ends, on transformers' own cache, which copies itself at every step), and "queue" (rows
that end make room for the next questions, whose caches join the running one; the cache grows in place). Prints
seconds, tokens written and the ratio. In bf16 a batch's shapes round near-ties differently, so a few answers
(and the token counts) differ between the two; in fp32 (AFFINER_CPU_BF16=0) they are the same answers.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import time

from transformers import DynamicCache

from affiner.core import kv_cache
from affiner.evaluation.generation import eval_decoding, generate
from instruct_questions import instruct_questions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    config, tokenizer, model, template, examples = instruct_questions(args.questions)
    joinable, new_cache = kv_cache.joinable, kv_cache.new_cache
    ways = {"batches": (lambda cache: False, lambda model: DynamicCache(config=model.config)),
            "queue": (joinable, new_cache)}
    seconds, tokens = dict.fromkeys(ways, 0.0), {}
    for round_ in range(args.rounds):
        for name in (list(ways) if round_ % 2 == 0 else list(reversed(ways))):
            kv_cache.joinable, kv_cache.new_cache = ways[name]  # what decode_queue calls
            started = time.perf_counter()
            answers = generate(model, tokenizer, template, examples, config.eval.max_new_tokens, args.batch,
                               eval_decoding(config))
            seconds[name] += time.perf_counter() - started
            tokens[name] = sum(a.tokens for a in answers)
    kv_cache.joinable, kv_cache.new_cache = joinable, new_cache
    print(f"{len(examples)} questions, batch {args.batch}, {args.rounds} round(s), {model.dtype}")
    for name, total in seconds.items():
        print(f"  {name:8s} {total / args.rounds:6.1f} s  {tokens[name]:6d} tokens written")
    print(f"  queue: {seconds['batches'] / seconds['queue']:.2f}x faster")


if __name__ == "__main__":
    main()
