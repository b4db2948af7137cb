"""affiner against its peers on the same work: TRL's SFTTrainer and the Trainer recipe of the reference
projects, training the embedded Gemma 3 270M with LoRA r16 on every projection, on the same tokenised
quickstart rows in the same order, for the same optimizer steps.

The Trainer recipe is the reference projects' as they wrote it: every row tokenised with
`padding="max_length"` (to the quickstart's `data.max_length`, 128, their value too) and
`DataCollatorForLanguageModeling`, so it computes every padded position and learns the prompts. TRL gets
the same unpadded rows as affiner, with its completion-only loss: the fairest peer, not a recipe.

    pip install -e '.[bench]'                 # TRL: a benchmark dependency, never a runtime one
    .venv/bin/python bench/peers.py           # 30 steps each, two rounds (A B C A B C), fp32
    .venv/bin/python bench/peers.py --steps 10 --rounds 1

Prints per contender: seconds per step (median, the first step left out), answer tokens/s and all tokens/s,
peak RSS of its process, and the held-out loss of what it trained, scored by one scorer (affiner's, in
fp32, on the quickstart's 60 held-out questions); then affiner's speed-up over each. Targets: at least 2x
SFTTrainer and 4x the Trainer recipe in s/step, at an equal or better held-out loss.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONTENDERS = ("affiner", "trl", "trainer")
SETTINGS = {"learning_rate": 1e-3, "batch_size": 8, "warmup_ratio": 0.05}


def quickstart_rows(steps: int):
    """The quickstart's training rows, tokenised by affiner (prompt masked), in the order affiner trains them."""
    from affiner.core.config import load_config
    from affiner.core.models import tokenizer_for
    from affiner.core.templates import build_template
    from affiner.data.pipeline import build
    from affiner.data.tokens import tokenize
    from affiner.training.batches import micro_batches

    config = load_config("quickstart")
    tokenizer = tokenizer_for(config)
    template = build_template(config.data.template, tokenizer)
    features = tokenize(build(config.data, tokenizer, template).train, template, tokenizer)
    order = micro_batches([len(f["input_ids"]) for f in features], SETTINGS["batch_size"], config.train.seed, False)
    rows = [features[i] for _ in range(steps) for i in next(order)]
    return config, tokenizer, rows


def train_one(name: str, steps: int, output: Path) -> None:
    """Runs in a process of its own: train, save the adapter in `output`, write timings.json there."""
    os.environ["TQDM_DISABLE"] = "1"
    if name == "affiner":
        return _train_affiner(steps, output)
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    config, tokenizer, rows = quickstart_rows(steps)
    from affiner.core.models import default_target_modules, load_for

    model = load_for(config, full_precision=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=default_target_modules(model),
                      task_type="CAUSAL_LM")
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

    common = dict(per_device_train_batch_size=SETTINGS["batch_size"], max_steps=steps, lr_scheduler_type="cosine",
                  learning_rate=SETTINGS["learning_rate"], warmup_steps=SETTINGS["warmup_ratio"], logging_steps=1,
                  save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), output_dir=str(output),
                  seed=42, dataloader_drop_last=False)
    if name == "trl":
        from trl import SFTConfig, SFTTrainer

        data = Dataset.from_list([{"input_ids": r["input_ids"],
                                   "completion_mask": [int(label != -100) for label in r["labels"]]} for r in rows])
        trainer = SFTTrainer(model=model, args=SFTConfig(**common, completion_only_loss=True, max_length=None),
                             train_dataset=data, processing_class=tokenizer, peft_config=lora, callbacks=[Clock()])
    else:
        from peft import get_peft_model
        from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

        data = Dataset.from_list([padded(r["input_ids"], config.data.max_length, tokenizer.pad_token_id)
                                  for r in rows])
        trainer = Trainer(model=get_peft_model(model, lora), args=TrainingArguments(**common), train_dataset=data,
                          data_collator=DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False),
                          callbacks=[Clock()])
    trainer._get_train_sampler = lambda *args, **kwargs: torch.utils.data.SequentialSampler(data)  # same order
    trainer.train()
    trainer.model.save_pretrained(output / "adapter")
    _write_timings(output, marks, rows, config.data.max_length if name == "trainer" else None)


def padded(input_ids: list[int], length: int, pad_id: int) -> dict:
    """A row as the reference recipe tokenised it: `padding="max_length"`, the padding masked from attention
    (and from the loss by the collator, which labels every other position)."""
    pad = length - len(input_ids)
    return {"input_ids": input_ids + [pad_id] * pad, "attention_mask": [1] * len(input_ids) + [0] * pad}


def _train_affiner(steps: int, output: Path) -> None:
    from affiner.core.config import load_config
    from affiner.experiments import workflow

    config = load_config("quickstart", [f"output_dir={output}", f"train.max_steps={steps}", "train.logging_steps=1",
                                        "model.precision=fp32", "train.group_by_length=false"])  # the others' order
    run = workflow.train(config)
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (output / "adapter").symlink_to(run)
    _, _, rows = quickstart_rows(steps)
    _write_timings(output, [record["seconds"] for record in log], rows)


def _write_timings(output: Path, marks: list[float], rows: list[dict], padded_to: int | None = None) -> None:
    """Seconds per step, and per step the answer tokens learned and the positions computed (padding included)."""
    steps = [b - a for a, b in zip(marks, marks[1:])]  # the first step (warm-up) has no mark before it
    per_step = len(rows) / max(len(marks), 1)
    answer = sum(sum(label != -100 for label in r["labels"]) for r in rows) / len(rows) * per_step
    total = (padded_to or sum(len(r["input_ids"]) for r in rows) / len(rows)) * per_step
    (output / "timings.json").write_text(json.dumps({"seconds_per_step": statistics.median(steps),
                                                     "answer_tokens_per_step": answer, "tokens_per_step": total}))


def held_out_loss(adapter: Path) -> float:
    from affiner.core.config import load_config
    from affiner.core.models import load_for, tokenizer_for
    from affiner.core.templates import build_template
    from affiner.data.pipeline import build
    from affiner.evaluation.scoring import held_out_losses

    config = load_config("quickstart", ["model.precision=fp32"])
    tokenizer = tokenizer_for(config)
    template = build_template(config.data.template, tokenizer)
    questions = build(config.data, tokenizer, template).test
    model = load_for(config, adapter=adapter.resolve())
    sums, counts = held_out_losses(model, tokenizer, template, questions, 8)
    return sum(sums) / sum(counts)


def measure(name: str, steps: int, folder: Path) -> dict:
    output = folder / f"{name}-{time.monotonic_ns()}"
    output.mkdir()
    child = subprocess.Popen([sys.executable, __file__, "--child", name, "--steps", str(steps), "--output", str(output)],
                             env={**os.environ, "AFFINER_CPU_BF16": "0"}, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"{name} failed (exit status {status})")
    timings = json.loads((output / "timings.json").read_text())
    return {**timings, "peak_mib": usage.ru_maxrss / 1024, "loss": held_out_loss(output / "adapter")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return train_one(args.child, args.steps, args.output)
    results: dict[str, list[dict]] = {name: [] for name in CONTENDERS}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.rounds):
            for name in CONTENDERS:  # interleaved: machine noise hits every contender alike
                results[name].append(measure(name, args.steps, Path(folder)))
                print(f"  {name}: {results[name][-1]['seconds_per_step']:.3f} s/step", flush=True)
    table = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in results.items()}
    print(f"\n{args.steps} steps of {SETTINGS['batch_size']} rows, fp32, median of {args.rounds} round(s), "
          f"{os.cpu_count()} cores")
    print(f"{'':10s}{'s/step':>8s}{'answer tok/s':>14s}{'tok/s':>9s}{'peak RSS':>11s}{'held-out loss':>15s}")
    for name, row in table.items():
        print(f"{name:10s}{row['seconds_per_step']:8.3f}{row['answer_tokens_per_step'] / row['seconds_per_step']:14.0f}"
              f"{row['tokens_per_step'] / row['seconds_per_step']:9.0f}{row['peak_mib']:9.0f} MiB{row['loss']:15.4f}")
    ours = table["affiner"]["seconds_per_step"]
    for name, target in (("trl", 2.0), ("trainer", 4.0)):
        ratio = table[name]["seconds_per_step"] / ours
        better = table["affiner"]["loss"] <= table[name]["loss"] * 1.01
        print(f"affiner vs {name}: {ratio:.2f}x faster per step (target >= {target}x), held-out loss "
              f"{'equal or better' if better else 'worse'}: {'PASS' if ratio >= target and better else 'FAIL'}")


if __name__ == "__main__":
    main()
