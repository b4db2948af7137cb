"""Time the quickstart from a cold cache (GGUF conversion included) and check the issue's targets.

    .venv/bin/python bench/quickstart.py            # ~8-10 min on a 2-core CPU

Targets: at most 15 minutes; tuned answers correct for >= 80 % of held-out glossary questions and
base for <= 10 %; tuned answers stop (EOS) before the limit for >= 90 %, base for <= 20 %.
Every figure is read from the summary.json that affiner computed; exits 1 if a target is missed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "AFFINER_CACHE": str(Path(scratch) / "cache")}
        started = time.time()
        result = subprocess.run([sys.executable, "-m", "affiner", "run", "--set", f"output_dir={scratch}/runs"],
                                env=env, capture_output=True, text=True)
        minutes = (time.time() - started) / 60
        if result.returncode != 0:
            print(result.stderr[-3000:])
            return 1
        folder = next(Path(scratch, "runs").iterdir())
        summary = json.loads((folder / "summary.json").read_text())
        perplexity = json.loads((folder / "metrics.json").read_text())["metrics"]["perplexity"]
        summary["base_perplexity"], summary["tuned_perplexity"] = perplexity["base"]["mean"], perplexity["tuned"]["mean"]
        run = json.loads((folder / "run.json").read_text())
    base, tuned = summary["base"], summary["tuned"]
    checks = [
        ("wall time (min, cold cache)", minutes, minutes <= 15, "<= 15"),
        ("tuned perplexity < base", summary["tuned_perplexity"], summary["tuned_perplexity"] < summary["base_perplexity"],
         f"< {summary['base_perplexity']:.2f}"),
        ("tuned correct", tuned["accuracy"], tuned["accuracy"] >= 0.80, ">= 0.80"),
        ("base correct", base["accuracy"], base["accuracy"] <= 0.10, "<= 0.10"),
        ("tuned stop rate", tuned["stop_rate"], tuned["stop_rate"] >= 0.90, ">= 0.90"),
        ("base stop rate", base["stop_rate"], base["stop_rate"] <= 0.20, "<= 0.20"),
    ]
    seconds = summary["generation_seconds"]
    print(f"questions: {tuned['questions']}, training: {run['train_seconds']:.0f} s, "
          f"base answers: {seconds['base']:.0f} s, tuned answers: {seconds['tuned']:.0f} s")
    for name, value, ok, target in checks:
        print(f"{name:28s} {value:8.2f}  target {target:8s} {'ok' if ok else 'MISSED'}")
    return 0 if all(ok for *_, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
