"""Training step time with logits computed only on supervised tokens vs the model's own full-logits loss.

    .venv/bin/python bench/loss_head.py

On the embedded Gemma 3 270M the output head (262k vocabulary x 640) costs more than the 18 blocks;
the prompt's logits are never used by the loss, so affiner skips them. Both variants run in the same
process on the same batches, alternating, so machine noise hits both; the ratio is what to read.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # per-batch progress bars would bury the figures

import statistics
import time

import torch

from affiner.core.config import load_config
from affiner.data.formats import to_examples
from affiner.data.read import read_rows
from affiner.data.tokens import collate, tokenize
from affiner.core.models import load_tokenizer
from affiner.core.templates import build_template
from affiner.core.loss import supervised_loss
from affiner.training.setup import prepare_model


def main(repeats: int = 5) -> None:
    config = load_config("quickstart")
    tokenizer = load_tokenizer(config.model.base)
    template = build_template("qa", tokenizer)
    examples = to_examples(read_rows(config.data.train))[:8]
    batch = collate(tokenize(examples, template, tokenizer), tokenizer.pad_token_id)
    model = prepare_model(config)
    supervised = int((batch["labels"] != -100).sum())

    def response_only():
        loss, n = supervised_loss(model, batch)
        (loss / n).backward()

    def full_logits():
        model(**batch).loss.backward()

    times = {"response-only logits": [], "full logits": []}
    for _ in range(repeats + 1):  # the first round warms up
        for name, step in (("response-only logits", response_only), ("full logits", full_logits)):
            started = time.perf_counter()
            step()
            model.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values[1:]) for name, values in times.items()}
    print(f"batch: {batch['input_ids'].shape[0]} rows x {batch['input_ids'].shape[1]} tokens, "
          f"{supervised} supervised, {torch.get_num_threads()} threads")
    for name, value in medians.items():
        print(f"{name:22s} {value:.3f} s/step (median of {repeats})")
    print(f"speed-up: {medians['full logits'] / medians['response-only logits']:.2f}x")


if __name__ == "__main__":
    main()
