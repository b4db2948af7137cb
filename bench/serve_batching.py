"""Request batching of `affiner serve`: 16 concurrent greedy requests against the same 16 sent one at a time.

    .venv/bin/affiner train quickstart                                   # a run in ~80 s, if there is none
    .venv/bin/python bench/serve_batching.py                             # the latest run under runs/
    .venv/bin/python bench/serve_batching.py --run runs/quickstart-20261122-191348 --requests 16 --model base

The run's base and adapter are loaded once and served on 127.0.0.1 in this process; the questions are the
run's held-out ones, asked through the official openai client with temperature 0 and the quickstart's
48-token limit. One warm-up request, then the requests one after another (each alone: `Engine.stream`),
then all of them at once (the server batches those waiting: `Engine.complete_batch`). Target: the
concurrent wall time at least 3x shorter, with answers, finish reasons and token counts identical (token
for token with --fp32; in bf16, the run's precision on most machines, a batch rounds differently and a
near-tie between two tokens can flip, so a few answers may differ).
Run it alone: other jobs on the machine change the figures (the load average is printed with them).
"""

from __future__ import annotations

import os

os.environ["TQDM_DISABLE"] = "1"  # progress bars of the model loading would bury the figures

import argparse  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

from openai import OpenAI  # noqa: E402

from affiner.core.models import load_for, tokenizer_for  # noqa: E402
from affiner.core.runfolder import RunFolder  # noqa: E402
from affiner.interfaces.engine import Engine  # noqa: E402
from affiner.interfaces.serve import make_server  # noqa: E402

TARGET_RATIO = 3.0


def questions(folder: Path, count: int) -> list[list[dict[str, str]]]:
    held_out = RunFolder.open(folder).held_out()
    if len(held_out) < count:
        raise SystemExit(f"{folder} has {len(held_out)} held-out questions; {count} are needed (--requests).")
    return [[{"role": "user", "content": e.instruction} | ({"input": e.input} if e.input else {})]
            for e in held_out[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="run folder (default: the latest under runs/)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--model", default="tuned", help="tuned (default) or base")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--fp32", action="store_true",
                        help="compute in fp32 rather than the run's precision (bf16 on most CPUs and GPUs): a batch's "
                             "padding and shapes change bf16 roundings, which can turn a near-tie of two tokens")
    args = parser.parse_args()
    latest = RunFolder.latest()
    folder = Path(args.run) if args.run else (latest.path if latest else None)
    if folder is None:
        raise SystemExit("no run folder given and none under runs/; make one with: affiner train quickstart")
    asked = questions(folder, args.requests)

    if args.fp32:
        run = RunFolder.open(folder)
        engine = Engine.on_base(load_for(run.config(), full_precision=True), tokenizer_for(run.config(), folder),
                                run.template(), {"tuned": folder})
    else:
        engine = Engine.from_runs([folder])
    batches: list[int] = []
    real = engine.complete_batch
    engine.complete_batch = lambda name, asks: batches.append(len(asks)) or real(name, asks)
    server = make_server(engine, "127.0.0.1", 0, None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=600)

    def ask(messages: list[dict[str, str]]) -> tuple[str, str, int]:
        reply = client.chat.completions.create(model=args.model, messages=messages, max_tokens=args.max_tokens,
                                               temperature=0)
        return reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage.completion_tokens

    try:
        ask(asked[0])  # warm-up: the first generation of a process pays one-off setup
        started = time.perf_counter()
        alone = [ask(messages) for messages in asked]
        sequential = time.perf_counter() - started
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=len(asked)) as pool:
            together = list(pool.map(ask, asked))
        concurrent = time.perf_counter() - started
    finally:
        server.shutdown()
        server.stop()

    ratio = sequential / concurrent
    same = sum(a == b for a, b in zip(alone, together))
    print(f"{folder}: {len(asked)} held-out questions to '{args.model}' ({'fp32' if args.fp32 else 'run precision'}), "
          f"greedy, up to {args.max_tokens} tokens ({sum(t for _, _, t in alone)} answer tokens in all)")
    print(f"one at a time: {sequential:.2f} s; all at once: {concurrent:.2f} s in batches of {batches}; "
          f"{ratio:.1f}x ({'within' if ratio >= TARGET_RATIO else 'UNDER'} the {TARGET_RATIO:g}x target)")
    print(f"answers identical: {same}/{len(asked)}")
    print(f"load average while measuring: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    for a, b in zip(alone, together):
        if a != b:
            print(f"  alone:    {a}\n  together: {b}")
    if same != len(asked) and args.fp32:  # in bf16 a batch's other roundings may flip a near-tie; in fp32, a bug
        raise SystemExit(1)


if __name__ == "__main__":
    main()
