"""The quickstart trained in fp32 and in bf16 on this CPU: seconds per step, and the held-out loss each reaches.

    .venv/bin/python bench/cpu_precision.py              # the whole quickstart (90 steps) in each precision
    .venv/bin/python bench/cpu_precision.py --steps 20   # seconds per step only, sooner

`precision: auto` picks bf16 on a CPU whose bf16 matrix products are at least 1.5x faster than fp32 (AMX,
AVX512-BF16; measured at start-up); the target is at least 1.4x faster steps at a held-out loss within 2 %
of fp32's, and on a CPU without native bf16, auto stays fp32 (no slower than before). Each precision trains
in its own process (AFFINER_CPU_BF16 pins auto's answer), fp32 and bf16 alternating when --rounds > 1; the
held-out loss of both runs is scored by one scorer, in fp32, on the quickstart's 60 held-out questions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def train(precision: str, steps: int | None, root: Path) -> Path:
    output = root / precision
    overrides = ["--set", f"output_dir={output}", "--set", "train.logging_steps=1"]
    if steps:
        overrides += ["--set", f"train.max_steps={steps}"]
    env = {**os.environ, "AFFINER_CPU_BF16": "1" if precision == "bf16" else "0", "TQDM_DISABLE": "1"}
    subprocess.run([sys.executable, "-m", "affiner", "train", "quickstart", *overrides], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    (run,) = sorted(output.iterdir(), key=lambda p: p.stat().st_mtime)[-1:]
    return run


def seconds_per_step(run: Path) -> float:
    """The median step, from the log's timestamps (the first step, which pays for warm-up, left out)."""
    seconds = [json.loads(line)["seconds"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(b - a for a, b in zip(seconds[1:], seconds[2:]))


def held_out_loss(run: Path) -> float:
    """Mean loss per held-out answer token, the tuned model loaded in fp32 (one scorer for both runs)."""
    from affiner.core.models import load_for
    from affiner.core.runfolder import RunFolder
    from affiner.evaluation.scoring import held_out_losses

    folder = RunFolder(run)
    config = folder.config()
    model = load_for(config.model_copy(update={"model": config.model.model_copy(update={"precision": "fp32"})}),
                     adapter=run)
    from affiner.core.models import tokenizer_for

    sums, counts = held_out_losses(model, tokenizer_for(config, run), folder.template(), folder.held_out(), 8)
    return sum(sums) / sum(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help="train this many steps only (no held-out loss then)")
    parser.add_argument("--rounds", type=int, default=1, help="fp32 and bf16 alternating this many times")
    args = parser.parse_args()
    from affiner.core.devices import cpu_bf16_speedup

    print(f"bf16 matrix products on this CPU: {cpu_bf16_speedup():.1f}x fp32's speed ({os.cpu_count()} cores)")
    results: dict[str, list] = {"fp32": [], "bf16": []}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.rounds):
            for precision in ("fp32", "bf16"):
                run = train(precision, args.steps, Path(folder))
                loss = None if args.steps else held_out_loss(run)
                results[precision].append((seconds_per_step(run), loss))
                print(f"{precision}: {results[precision][-1][0]:.3f} s/step"
                      + (f", held-out loss {loss:.4f}" if loss is not None else ""), flush=True)
    fp32 = statistics.median(s for s, _ in results["fp32"])
    bf16 = statistics.median(s for s, _ in results["bf16"])
    verdict = "PASS" if fp32 / bf16 >= 1.4 else "FAIL"
    line = f"bf16 steps {fp32 / bf16:.2f}x faster than fp32 (target >= 1.4x): {verdict}"
    if not args.steps:
        losses = {p: statistics.median(loss for _, loss in results[p]) for p in results}
        gap = losses["bf16"] / losses["fp32"] - 1
        line += f"; held-out loss fp32 {losses['fp32']:.4f}, bf16 {losses['bf16']:.4f} ({gap:+.1%}, target within 2 %)"
    print(line)


if __name__ == "__main__":
    main()
