"""Latency of the comparison page (`affiner app`) on the embedded model, through the page's own code path:
`affiner.interfaces.app.load_engine` (what the page caches with st.cache_resource) and
`affiner.interfaces.app.generate_answer`
(what streams each answer into its box).

    .venv/bin/python bench/app_latency.py                                   # the latest run under runs/
    .venv/bin/python bench/app_latency.py runs/quickstart-20261122-183000 --repeats 5

Targets: time to first token under 1 s for a short prompt ("What does QUILT stand for?"), greedy and
sampled, median of 5 after one warm-up; switching adapters under 1 s (the run's adapter loaded twice
under two names on one base: first token right after switching, against first token on the same adapter).
Times are wall-clock, from the call to the first streamed word that is not blank (the streamer sends
whole words), as the page's user waits for them. Run it on a quiet machine: the load average is printed
before and after, and another process busy on the 2 cores multiplies the figures.
"""

from __future__ import annotations

import os

os.environ["TQDM_DISABLE"] = "1"  # loading bars would bury the figures
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from affiner.interfaces import app  # noqa: E402
from affiner.core.settings import Settings  # noqa: E402
from affiner.interfaces.engine import BASE  # noqa: E402
from affiner.core.runfolder import RunFolder  # noqa: E402

PROMPT = "What does QUILT stand for?"
TARGET_SECONDS = 1.0


def first_token(engine, name: str, settings: Settings) -> float:
    """Seconds from the call to the first streamed text that is not blank (the first word the user sees);
    the generation is stopped right after it."""
    started = time.perf_counter()
    seen: list[float] = []
    stop = threading.Event()

    def on_piece(text: str) -> None:
        if not seen and text.strip():
            seen.append(time.perf_counter() - started)
            stop.set()

    app.generate_answer(engine, name, PROMPT, "", settings, on_piece=on_piece, stop=stop)
    if not seen:
        raise SystemExit(f"{name} produced no text for {PROMPT!r}; cannot time the first token.")
    return seen[0]


def median_first_token(engine, name: str, settings: Settings, repeats: int) -> float:
    first_token(engine, name, settings)  # warm-up: the first generation of a process pays one-off setup
    return statistics.median(first_token(engine, name, settings) for _ in range(repeats))


def verdict(seconds: float) -> str:
    return "ok" if seconds < TARGET_SECONDS else f"OVER the {TARGET_SECONDS:.0f} s target"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", help="run folder (default: the latest under runs/)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    latest = RunFolder.latest(Path(__file__).resolve().parents[1] / "runs")
    run = Path(args.run) if args.run else (latest.path if latest else None)
    if run is None:
        raise SystemExit("no run folder: train one with `affiner run` first, or pass a run folder.")
    run = app.resolve_runs([run])[0]
    greedy, sampled = Settings(temperature=0.0, seed=0), Settings(seed=0)

    print(f"load average before: {os.getloadavg()[0]:.2f}")
    started = time.perf_counter()
    engine = app.load_engine((str(run),))
    load_seconds = time.perf_counter() - started
    print(f"run {run}\nbase {RunFolder(run).config().model.base}; page start-up (base + adapter loaded once): "
          f"{load_seconds:.1f} s")
    print(f"\nTime to first token for {PROMPT!r} (median of {args.repeats} after one warm-up):")
    for name in ("tuned", BASE):
        for label, settings in (("greedy", greedy), ("sampled", sampled)):
            seconds = median_first_token(engine, name, settings, args.repeats)
            print(f"  {name:5} {label:7} {seconds:.3f} s  {verdict(seconds)}")
    answer = app.generate_answer(engine, "tuned", PROMPT, "", Settings(temperature=0.0, max_new_tokens=48))
    print(f"  a whole greedy tuned answer: {answer['tokens']} tokens in {answer['seconds']:.2f} s "
          f"({answer['tokens_per_second']:.1f} tokens/s): {answer['text']!r}")

    started = time.perf_counter()
    pair = app.load_engine((str(run), str(run)), names=("first", "second"))
    pair_seconds = time.perf_counter() - started
    print(f"\nSwitching adapters (the run's adapter loaded twice on one base in {pair_seconds:.1f} s):")
    first_token(pair, "first", greedy)
    first_token(pair, "second", greedy)  # warm both adapters
    same, switched = [], []
    for _ in range(args.repeats):
        same.append(first_token(pair, "first", greedy))  # the adapter that is already active
        switched.append(first_token(pair, "second", greedy))  # set_adapter("second") + first token
        first_token(pair, "first", greedy)  # back to "first" for the next round
    set_adapter = []
    for i in range(20):
        t = time.perf_counter()
        pair.model.set_adapter("second" if i % 2 else "first")
        set_adapter.append(time.perf_counter() - t)
    cost = statistics.median(switched) - statistics.median(same)
    print(f"  first token, same adapter:        {statistics.median(same):.3f} s")
    print(f"  first token, just after a switch: {statistics.median(switched):.3f} s  "
          f"{verdict(statistics.median(switched))}")
    print(f"  switch cost (difference):         {cost:+.3f} s  {verdict(cost)}")
    print(f"  set_adapter alone:                {statistics.median(set_adapter) * 1000:.2f} ms (median of 20)")
    print(f"  base loads in this process: {sum(app.ENGINE_LOADS.values())} (one per engine, none per switch)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
