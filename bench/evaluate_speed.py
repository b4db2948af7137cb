"""Evaluation speed: affiner's batched generation with the adapter merged, against one-by-one generation
with the unmerged adapter, on the embedded Gemma 3 270M.

    .venv/bin/python bench/evaluate_speed.py                 # a fresh adapter with random weights
    .venv/bin/python bench/evaluate_speed.py --run runs/quickstart-20261122-183000

Target: 60 held-out questions, up to 48 new tokens, in at most half the time of one-by-one
generation. Both are timed in this one process, one after the other; the ratio is what to read.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # per-batch progress bars would bury the figures

import argparse
import tempfile
import time
from pathlib import Path

import torch

from affiner.core.config import load_config
from affiner.data.formats import to_examples
from affiner.data.read import read_rows
from affiner.evaluation.generation import generate
from affiner.core.models import default_target_modules, load_model, load_tokenizer
from affiner.core.templates import build_template


def random_adapter(base: str, folder: Path) -> Path:
    """A LoRA adapter with non-zero weights, so that it changes the answers as a trained one does."""
    from peft import LoraConfig, get_peft_model

    model = load_model(base)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=default_target_modules(model),
                                                  init_lora_weights=False, task_type="CAUSAL_LM"))
    peft_model.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a finished run folder whose adapter to use")
    parser.add_argument("--questions", type=int, default=60)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=20)
    args = parser.parse_args()
    config = load_config("quickstart")
    tokenizer = load_tokenizer(config.model.base)
    template = build_template("qa", tokenizer)
    examples = to_examples(read_rows(config.data.test))[: args.questions]
    with tempfile.TemporaryDirectory() as scratch:
        adapter = Path(args.run) if args.run else random_adapter(config.model.base, Path(scratch) / "adapter")
        unmerged = load_model(config.model.base, adapter=adapter)
        started = time.perf_counter()
        single = [generate(unmerged, tokenizer, template, [e], args.max_new_tokens, 1)[0] for e in examples]
        one_by_one = time.perf_counter() - started
        merged = load_model(config.model.base, adapter=adapter).merge_and_unload()
        started = time.perf_counter()
        batched = generate(merged, tokenizer, template, examples, args.max_new_tokens, args.batch_size)
        affiner_way = time.perf_counter() - started
    same = sum(a.text == b.text for a, b in zip(single, batched))
    tokens = sum(a.tokens for a in batched)
    print(f"{len(examples)} questions, up to {args.max_new_tokens} new tokens, {tokens} generated, "
          f"{torch.get_num_threads()} threads, adapter: {args.run or 'random'}")
    print(f"one by one, unmerged adapter : {one_by_one:7.1f} s")
    print(f"batched ({args.batch_size}), merged adapter: {affiner_way:7.1f} s")
    print(f"ratio: {affiner_way / one_by_one:.2f} (target <= 0.50); identical answers: {same}/{len(examples)}")


if __name__ == "__main__":
    main()
