"""Training steps of the instruct recipe with the output head's losses and gradient taken by autograd, chunk by
chunk, and written out (core/loss.py, WRITTEN_OUT_HEAD).

    .venv/bin/python bench/head_speed.py [--batches 6]

The embedded Gemma 3 270M in the precision `auto` picks, LoRA as the recipe sets it, the recipe's first batches
of 8 training rows. Every batch runs through each variant in turn, the order alternating from batch to batch, in
one process after a step that warms up, so that machine noise and warm caches hit both alike; the totals and their
ratio are what to read. Losses must agree to 1e-4 (dropout draws differ from call to call, so gradients are not
compared here: tests/test_head_chunks.py compares them without dropout).
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # per-batch progress bars would bury the figures

import argparse
import time

import torch

from affiner.core import loss
from affiner.core.config import load_config
from affiner.core.models import dtype_for, tokenizer_for
from affiner.core.templates import build_template
from affiner.data.formats import to_examples
from affiner.data.read import read_rows
from affiner.data.tokens import collate, tokenize
from affiner.training.setup import prepare_model

VARIANTS = {"autograd": False, "written out": True}  # loss.WRITTEN_OUT_HEAD


def step(model, batch, dtype) -> float:
    """One forward and backward under the run's autocast; the batch's mean answer-token loss."""
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        total, count = loss.supervised_loss(model, batch)
    (total / count).backward()
    model.zero_grad(set_to_none=True)
    return float(total.detach() / count)


def timed_rounds(model, batches, dtype) -> dict[str, float]:
    names = list(VARIANTS)
    seconds = {name: 0.0 for name in names}
    for i, batch in enumerate(batches):
        order = names[i % len(names):] + names[:i % len(names)]
        losses = {}
        for name in order:
            loss.WRITTEN_OUT_HEAD = VARIANTS[name]
            started = time.perf_counter()
            losses[name] = step(model, batch, dtype)
            seconds[name] += time.perf_counter() - started
        spread = max(losses.values()) - min(losses.values())
        print(f"  batch {i} ({int((batch['labels'] != -100).sum())} answer tokens): "
              + ", ".join(f"{name} {losses[name]:.5f}" for name in names)
              + ("" if spread < 1e-4 else f"   LOSSES DIFFER by {spread:.1e}"), flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=6)
    args = parser.parse_args()
    config = load_config("instruct")
    model = prepare_model(config)
    tokenizer = tokenizer_for(config)
    template = build_template(config.data.template, tokenizer)
    examples = to_examples(read_rows(config.data.train))[:8 * args.batches]
    rows = [f for f in tokenize(examples, template, tokenizer) if len(f["input_ids"]) <= config.data.max_length]
    batches = [collate(rows[i:i + 8], tokenizer.pad_token_id) for i in range(0, len(rows), 8)]
    dtype = dtype_for(config)
    step(model, batches[0], dtype)  # warms up
    print(f"training steps (forward and backward), {dtype}, {torch.get_num_threads()} threads:")
    seconds = timed_rounds(model, batches, dtype)
    print(f"{len(batches)} steps: " + ", ".join(f"{name} {value:.1f} s" for name, value in seconds.items())
          + f"; written out {seconds['autograd'] / seconds['written out']:.2f}x faster")


if __name__ == "__main__":
    main()
