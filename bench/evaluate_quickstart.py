"""`affiner evaluate` on a quickstart run, timed end to end against an earlier affiner on its own quickstart run.

    # an earlier affiner (here: the end of round 1) and a quickstart run trained by it
    git worktree add /tmp/affiner-old f42811b
    PYTHONPATH=/tmp/affiner-old/src .venv/bin/python -m affiner train quickstart --set output_dir=/tmp/old-runs
    .venv/bin/affiner train quickstart --set output_dir=/tmp/new-runs
    .venv/bin/python bench/evaluate_quickstart.py --run /tmp/new-runs/quickstart-* \\
        --baseline-src /tmp/affiner-old/src --baseline-run /tmp/old-runs/quickstart-*

Each contender evaluates in a process of its own (imports, loading, generation, losses, scores, report: what a
user waits for), interleaved A B C D A B C D so that machine noise hits all alike. This affiner runs three ways:
"now" answers with the base afresh (--no-base-cache: a first evaluation), "now, no general" also skips the general
set (--no-general: the no-harm check's cost), "now, base kept" is an evaluation after an earlier one (the base's
answers and losses from $AFFINER_CACHE/base-evaluations). Prints the wall time, the generation time of each model,
the headline scores (which must not change), and the ratios; the target is 3x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def evaluate_once(src: Path, run: Path, flags: tuple[str, ...] = ()) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "TQDM_DISABLE": "1"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "affiner", "evaluate", str(run), *flags], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    summary = json.loads((run / "summary.json").read_text())
    return {"seconds": seconds, "generation": summary.get("generation_seconds", {}),
            "contains": {name: summary[name]["accuracy"] for name in ("base", "tuned")},
            "stopped": {name: summary[name]["stop_rate"] for name in ("base", "tuned")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a quickstart run trained by this checkout")
    parser.add_argument("--baseline-src", type=Path, required=True, help="the src/ folder of the earlier affiner")
    parser.add_argument("--baseline-run", type=Path, required=True, help="a quickstart run trained by it")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    src = Path(__file__).resolve().parents[1] / "src"
    contenders = {"earlier": (args.baseline_src, args.baseline_run, ()),
                  "now": (src, args.run, ("--no-base-cache",)),
                  "no general": (src, args.run, ("--no-base-cache", "--no-general")),
                  "base kept": (src, args.run, ())}  # runs after "now", which kept the base's answers
    results: dict[str, list[dict]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, (src_folder, run, flags) in contenders.items():
            results[name].append(evaluate_once(src_folder, run, flags))
            print(f"  {name}: {results[name][-1]['seconds']:.1f} s", flush=True)
    print(f"\naffiner evaluate on a quickstart run, median of {args.rounds} round(s), {os.cpu_count()} cores")
    print(f"{'':11s}{'wall':>8s}{'base gen':>10s}{'tuned gen':>11s}{'contains base/tuned':>21s}{'stops base/tuned':>18s}")
    wall = {}
    for name, runs in results.items():
        wall[name] = statistics.median(r["seconds"] for r in runs)
        last = runs[-1]
        generation = [statistics.median(float(r["generation"].get(model, 0)) for r in runs) for model in ("base", "tuned")]
        print(f"{name:11s}{wall[name]:7.1f}s{generation[0]:9.1f}s{generation[1]:10.1f}s"
              f"{last['contains']['base']:11.0%} / {last['contains']['tuned']:.0%}"
              f"{last['stopped']['base']:10.0%} / {last['stopped']['tuned']:.0%}")
    for name in ("now", "no general", "base kept"):
        ratio = wall["earlier"] / wall[name]
        same = results[name][-1]["contains"]["tuned"] >= results["earlier"][-1]["contains"]["tuned"]
        print(f"{name} vs earlier: {ratio:.2f}x faster (target >= 3x), tuned score "
              f"{'unchanged' if same else 'LOWER'}: {'PASS' if ratio >= 3 and same else 'FAIL'}")


if __name__ == "__main__":
    main()
