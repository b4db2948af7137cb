"""Peak memory of a training step on the embedded Gemma 3 270M (262,144-token vocabulary) as the answer
tokens per batch grow 4x: with the output head computed in chunks of supervised positions, the logits'
share stays bounded; computed whole (HEAD_CHUNK made huge), it grows with the answer tokens.

    .venv/bin/python bench/head_memory.py

Each measurement is one LoRA training step (forward and backward) in a process of its own; its peak RSS is
read from the kernel (wait4). Target: 4x the answer tokens without 4x the peak memory.
"""

from __future__ import annotations

import os
import subprocess
import sys

STEP = r"""
import os, sys, torch
os.environ["TQDM_DISABLE"] = "1"
from affiner.core import loss
from affiner.core.config import load_config
from affiner.training.setup import prepare_model
answer_tokens, chunked = int(sys.argv[1]), sys.argv[2] == "chunked"
if not chunked:
    loss.HEAD_CHUNK = 10 ** 9
config = load_config("quickstart")
model = prepare_model(config)
rows, length = 4, answer_tokens // 4 + 8
ids = torch.randint(10, 1000, (rows, length))
labels = ids.clone()
labels[:, :8] = -100  # the prompt: 8 tokens a row
total, count = loss.supervised_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
(total / count).backward()
"""


def peak_mib(answer_tokens: int, mode: str) -> float:
    process = subprocess.Popen([sys.executable, "-c", STEP, str(answer_tokens), mode],
                               env={**os.environ, "AFFINER_CPU_BF16": "0"})
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"the step with {answer_tokens} answer tokens ({mode}) failed")
    return usage.ru_maxrss / 1024


def main() -> None:
    small, large = 1024, 4096
    rows = {mode: (peak_mib(small, mode), peak_mib(large, mode)) for mode in ("chunked", "whole")}
    for mode, (a, b) in rows.items():
        print(f"head {mode:8s} {small} answer tokens: {a:7.0f} MiB   {large}: {b:7.0f} MiB   ({b / a:.2f}x)")
    growth = rows["chunked"][1] / rows["chunked"][0]
    print(f"4x the answer tokens: peak memory {growth:.2f}x with the chunked head (target < 4x; whole head "
          f"{rows['whole'][1] / rows['whole'][0]:.2f}x): {'PASS' if growth < 4 else 'FAIL'}")


if __name__ == "__main__":
    main()
