"""Training steps of this checkout against another affiner's source, in processes of their own, alternating.

    .venv/bin/python bench/train_against.py --baseline-src /tmp/affiner-old/src            # instruct, 8 steps
    .venv/bin/python bench/train_against.py --baseline-src /tmp/affiner-old/src --recipe quickstart --steps 30
    .venv/bin/python bench/train_against.py --baseline-src /tmp/affiner-old/src --steps 6 --probe-every 2
    .venv/bin/python bench/train_against.py --baseline-set lora.dropout=0.05 --steps 16   # a setting, one source

Each round trains the recipe for --steps steps (no held-out probes unless --probe-every) once with each source, the order alternating
from round to round so that machine noise hits both; per process: the training seconds run.json records, system
time, minor page faults (memory mapped and touched page by page), peak RSS, and the last step's training loss.
The totals' ratio is what to read. With --baseline-set (and no --baseline-src) both run this checkout, the baseline
with the settings given: the cost of a setting, measured the same way. A change of arithmetic may move the loss a little (bf16 rounds differently).
With --probe-every the last probe's held-out loss is printed too, and the peak RSS includes the probes'.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHECKOUT_SRC = Path(__file__).resolve().parent.parent / "src"


def train_once(src: Path, recipe: str, steps: int, root: Path, probe_every: int | None = None,
               settings: list[str] = ()) -> dict:
    """One training process on `src`, the recipe with `settings` (KEY=VALUE) on top: its figures."""
    output = Path(tempfile.mkdtemp(dir=root))
    env = {**os.environ, "PYTHONPATH": str(src), "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "affiner", "train", recipe, "--set", f"train.max_steps={steps}",
               "--set", f"eval.every_steps={probe_every or 'null'}", "--set", f"output_dir={output}",
               "--set", "train.logging_steps=1", *(part for setting in settings for part in ("--set", setting))]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    errors = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)  # this process's own resource usage
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"training with {src} failed:\n{errors[-2000:]}")
    (run,) = list(output.iterdir())
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"train_seconds": json.loads((run / "run.json").read_text())["train_seconds"], "usage": usage,
            "loss": [r for r in log if "loss" in r][-1]["loss"],
            "eval_loss": next((r["eval_loss"] for r in reversed(log) if "eval_loss" in r), None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-src", type=Path, default=CHECKOUT_SRC,
                        help="the src/ folder of the other affiner (default: this checkout's)")
    parser.add_argument("--baseline-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting of the baseline's training only (repeatable)")
    parser.add_argument("--recipe", default="instruct")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--probe-every", type=int, help="probe the held-out loss every N steps (default: no probes)")
    args = parser.parse_args()
    sources = {"baseline": args.baseline_src.resolve(), "this checkout": CHECKOUT_SRC}
    totals = dict.fromkeys(sources, 0.0)
    with tempfile.TemporaryDirectory() as root:
        for round_ in range(args.rounds):
            names = list(sources)[round_ % 2:] + list(sources)[:round_ % 2]
            for name in names:
                figures = train_once(sources[name], args.recipe, args.steps, Path(root), args.probe_every,
                                     args.baseline_set if name == "baseline" else [])
                usage = figures["usage"]
                totals[name] += figures["train_seconds"]
                print(f"round {round_ + 1}, {name}: training {figures['train_seconds']:.1f} s, system "
                      f"{usage.ru_stime:.1f} s, minor faults {usage.ru_minflt / 1e6:.2f} M, peak RSS "
                      f"{usage.ru_maxrss / 2**20:.2f} GB, last loss {figures['loss']:.4f}"
                      + (f", last probe {figures['eval_loss']:.5f}" if figures["eval_loss"] is not None else ""),
                      flush=True)
    print(f"{args.recipe}, {args.steps} steps x {args.rounds} rounds: baseline {totals['baseline']:.1f} s, this "
          f"checkout {totals['this checkout']:.1f} s: {totals['baseline'] / totals['this checkout']:.2f}x")


if __name__ == "__main__":
    main()
