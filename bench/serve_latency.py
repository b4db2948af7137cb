"""Serving latency: time to first token of `affiner serve`, through the official openai client, streaming.

    .venv/bin/python bench/serve_latency.py                                  # the latest run under runs/
    .venv/bin/python bench/serve_latency.py runs/quickstart-20261122-191348 --requests 5 --model base

The run's base model is loaded once (the embedded Gemma 3 270M for the quickstart run), the server is
started on 127.0.0.1 in this process, and one short chat prompt is sent N times, one after the other.
Time to first token is measured at the client, from sending the request to the first chunk that
carries text. Target: median under 1 s on a 2-core CPU. Run it alone: other jobs on the machine
slow generation down (the load average is printed with the figures).
"""

from __future__ import annotations

import os

os.environ["TQDM_DISABLE"] = "1"  # progress bars of the model loading would bury the figures

import argparse
import statistics
import threading
import time
from pathlib import Path

from openai import OpenAI

from affiner.interfaces.engine import Engine
from affiner.core.runfolder import RunFolder
from affiner.interfaces.serve import make_server

PROMPT = "What does QUILT stand for?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", help="run folder (default: the latest under runs/)")
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--model", default="tuned", help="tuned (default) or base")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    args = parser.parse_args()
    latest = RunFolder.latest()
    folder = Path(args.run) if args.run else (latest.path if latest else None)
    if folder is None:
        raise SystemExit("no run folder given and none under runs/; train one with: affiner run")

    started = time.perf_counter()
    engine = Engine.from_runs([folder])
    loading = time.perf_counter() - started
    server = make_server(engine, "127.0.0.1", 0, None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="unused", max_retries=0)
    print(f"{folder}: base and adapter loaded in {loading:.1f} s; {args.requests} streamed requests to "
          f"'{args.model}', up to {args.max_tokens} tokens, temperature {args.temperature:g}")

    first_tokens, totals, tokens = [], [], []
    answer = ""
    try:
        for i in range(args.requests):
            sent = time.perf_counter()
            first = None
            text = []
            stream = client.chat.completions.create(
                model=args.model, messages=[{"role": "user", "content": PROMPT}], max_tokens=args.max_tokens,
                temperature=args.temperature, stream=True, stream_options={"include_usage": True})
            for chunk in stream:
                if chunk.usage is not None:
                    tokens.append(chunk.usage.completion_tokens)
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first if first is not None else time.perf_counter() - sent
                    text.append(chunk.choices[0].delta.content)
            totals.append(time.perf_counter() - sent)
            first_tokens.append(first if first is not None else totals[-1])
            answer = "".join(text)
            print(f"  request {i + 1}: first token {first_tokens[-1]:.3f} s, total {totals[-1]:.3f} s, "
                  f"{tokens[-1] if tokens else '?'} tokens", flush=True)
    finally:
        server.shutdown()
        server.stop()

    median = statistics.median(first_tokens)
    print(f"answer: {answer!r}")
    print(f"median time to first token: {median:.3f} s ({'within' if median < 1 else 'OVER'} the 1 s target); "
          f"median total {statistics.median(totals):.3f} s; all {args.requests} requests {sum(totals):.2f} s")
    print(f"load average while measuring: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
