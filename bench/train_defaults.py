"""Two candidate training defaults, measured on the quickstart: `train.group_by_length` and `torch.compile`.

    .venv/bin/python bench/train_defaults.py                  # both
    .venv/bin/python bench/train_defaults.py --only grouping
    .venv/bin/python bench/train_defaults.py --only compile --steps 12

grouping: the whole quickstart trained twice (group_by_length off, on; same seed, precision auto), each in a
process of its own: padded positions, s/step (median), and the held-out loss of the adapter it trained
(fp32, one scorer). A default is worth switching on only where the held-out loss does not get worse
(measured: on, since round 2).

compile: one LoRA model of the quickstart, its decoder layers compiled one by one (regional compilation:
each distinct layer compiles once, as PyTorch recommends for transformer blocks) against eager, on the same
batches: seconds to the first step (compilation included) and the median of the next steps' s/step.
Kept as a default only where it wins per step and compiles in seconds.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def quickstart_features():
    from affiner.core.config import load_config
    from affiner.core.models import tokenizer_for
    from affiner.core.templates import build_template
    from affiner.data.pipeline import build
    from affiner.data.tokens import tokenize

    config = load_config("quickstart")
    tokenizer = tokenizer_for(config)
    template = build_template(config.data.template, tokenizer)
    split = build(config.data, tokenizer, template)
    return config, tokenizer, template, tokenize(split.train, template, tokenizer), split.test


def padded_share(lengths: list[int], batch_size: int, seed: int, grouped: bool, epochs: float) -> float:
    from affiner.training.batches import epoch_batches

    batches = [b for epoch in range(int(epochs)) for b in epoch_batches(lengths, batch_size, seed, epoch, grouped)]
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - real / padded


def train_grouped(grouped: bool, output: Path) -> None:
    """In a child process: train the quickstart, write s/step and the held-out loss to output/result.json."""
    from affiner.core.config import load_config
    from affiner.core.models import load_for
    from affiner.evaluation.scoring import held_out_losses
    from affiner.experiments import workflow

    config = load_config("quickstart", [f"output_dir={output}", f"train.group_by_length={str(grouped).lower()}"])
    run = workflow.train(config)
    info = json.loads((run / "run.json").read_text())
    _, tokenizer, template, _, questions = quickstart_features()
    scorer = load_config("quickstart", ["model.precision=fp32"])
    sums, counts = held_out_losses(load_for(scorer, adapter=run), tokenizer, template, questions, 16)
    (output / "result.json").write_text(json.dumps({"seconds_per_step": info["train_seconds"] / info["steps"],
                                                    "loss": sum(sums) / sum(counts)}))


def grouping() -> None:
    config, _, _, features, _ = quickstart_features()
    lengths = [len(f["input_ids"]) for f in features]
    print(f"grouping: quickstart, {len(lengths)} rows, batch {config.train.batch_size}, {config.train.epochs} epochs")
    for grouped in (False, True):
        with tempfile.TemporaryDirectory() as folder:
            subprocess.run([sys.executable, __file__, "--child-grouped", str(grouped), "--output", folder], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            result = json.loads((Path(folder) / "result.json").read_text())
        share = padded_share(lengths, config.train.batch_size, config.train.seed, grouped, config.train.epochs)
        print(f"  group_by_length {str(grouped).lower():5s}: padded positions {share:5.1%}, "
              f"{result['seconds_per_step']:.3f} s/step, held-out loss {result['loss']:.4f}", flush=True)


def compile_trial(steps: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from affiner.core.loss import supervised_loss
    from affiner.core.models import default_target_modules, load_for
    from affiner.data.tokens import collate

    config, tokenizer, _, features, _ = quickstart_features()
    batches = [collate(features[i:i + 8], tokenizer.pad_token_id) for i in range(0, 8 * (steps + 1), 8)]
    print(f"compile: quickstart LoRA r16, {steps + 1} steps of 8 rows, {torch.get_num_threads()} threads")
    for compiled in (False, True):
        torch.manual_seed(0)
        base = load_for(config)
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=default_target_modules(base),
                                                task_type="CAUSAL_LM"))
        if compiled:
            for layer in model.get_base_model().model.layers:
                layer.compile()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        marks = [time.perf_counter()]
        for batch in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=base.dtype == torch.bfloat16):
                loss, count = supervised_loss(model, batch)
            (loss / count).backward()
            optimizer.step()
            optimizer.zero_grad()
            marks.append(time.perf_counter())
        per_step = statistics.median(b - a for a, b in zip(marks[1:], marks[2:]))
        print(f"  {'compiled' if compiled else 'eager':8s}: first step {marks[1] - marks[0]:6.1f} s, "
              f"then {per_step:.3f} s/step", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("grouping", "compile"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--child-grouped", choices=("True", "False"), help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_grouped:
        return train_grouped(args.child_grouped == "True", args.output)
    if args.only in (None, "grouping"):
        grouping()
    if args.only in (None, "compile"):
        compile_trial(args.steps)


if __name__ == "__main__":
    main()
