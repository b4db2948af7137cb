"""Serve the base model and its tuned adapters over an OpenAI-compatible HTTP API.

    affiner serve                                        # the latest run under runs/, on http://127.0.0.1:8000/v1
    affiner serve runs/quickstart-20261122-183000 --port 8080
    affiner serve runs/a runs/b                          # two adapters of one base, named "a" and "b", plus "base"
    export AFFINER_KEY=$(openssl rand -hex 16)            # a fresh key, to give to the clients
    affiner serve --host 0.0.0.0 --api-key-env AFFINER_KEY

Any OpenAI client can then talk to the models:

    curl http://127.0.0.1:8000/v1/models
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "tuned", "messages": [{"role": "user", "content": "What does QUILT stand for?"}]}'

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="tuned", messages=[{"role": "user", "content": "What does QUILT stand for?"}])

Routes: GET /health, GET /v1/models, POST /v1/chat/completions (messages rendered by the run's own
template, the one used in training) and POST /v1/completions (the prompt continued as raw text), both
with "stream": true for server-sent events and "stop" (a string or up to 4, cut from the answer). The models are "base" (no adapter) and "tuned" for a single
run, or the run folders' names for several. Decoding follows the request (temperature, top_p,
top_k, seed, max_tokens); what it leaves out takes affiner's defaults (temperature 0.8, top_p 0.95,
top_k 50, up to 256 new tokens or what the context window leaves); temperature 0 decodes greedily.
Sampled and streamed requests are answered one at a time; greedy non-streamed requests waiting
together are answered in one batch (up to 16, --max-batch N; 1 answers each alone); a client that
hangs up stops its generation. Only loopback addresses (127.0.0.1) are served unless --api-key-env names a variable
holding a key, which every request must then send as `Authorization: Bearer KEY`.

Web pages open in a browser on this machine can reach the server too; so it answers only requests
whose Host header is localhost, 127.0.0.1, [::1] or the --host given (else 421: a page that pointed its
own DNS name at this machine is refused), and reads only POST bodies sent as `Content-Type:
application/json` (else 415: a cross-site form or text/plain POST is refused). On --host 0.0.0.0 any
Host passes: the key, required there, is what guards it.

--engine vllm or --engine llama.cpp serves the same runs with that engine instead (several adapters on
their one base, on the same --host and --port, with the same model names): affiner exports what the
engine needs into RUN/engines/ (vLLM: the run's prompt format as a Jinja chat template and the stop
tokens; llama.cpp: the base as a 4-bit GGUF and each adapter as a LoRA GGUF, kept for the next start)
and runs the engine in the foreground until Ctrl-C:

    affiner serve runs/a runs/b --engine vllm             # vllm serve BASE --enable-lora --lora-modules a=... b=...
    affiner serve runs/a --engine llama.cpp --port 8080   # llama-server -m base.gguf --lora adapter.gguf ...

vLLM is found as the `vllm` command or module (pip install vllm; it needs a CUDA GPU); llama.cpp as
`llama-server` on PATH, else llama-cpp-python's server (pip install 'llama-cpp-python[server]'). The key
of --api-key-env reaches the engine through its environment (VLLM_API_KEY, LLAMA_API_KEY), never its
command line. Text templates (qa, alpaca, instruction) stop on EOS; each request should also send the
"stop" strings printed at start, as an engine takes none server-wide. With several runs, llama-server
applies an adapter only when a request names it ("lora": [{"id": N, "scale": 1.0}], ids printed at start).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from affiner.commands.arguments import port

ENGINES = ("affiner", "vllm", "llama.cpp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="*", type=Path, metavar="RUN",
                        help="run folder(s) of one base model (default: the latest under runs/)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; any other needs --api-key-env)")
    parser.add_argument("--port", type=port, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    parser.add_argument("--api-key-env", metavar="NAME",
                        help="environment variable holding the key clients must send as 'Authorization: Bearer KEY'")
    parser.add_argument("--max-batch", type=int, metavar="N",
                        help="greedy requests waiting together answered in one batch, at most N (default 16; 1: "
                             "each alone, so that in bf16 an answer never depends on the other requests)")
    parser.add_argument("--engine", choices=ENGINES, default="affiner",
                        help="affiner (default: the built-in server), vllm or llama.cpp (exported for and started "
                             "with that engine, when it is installed)")


def main(args: argparse.Namespace) -> None:
    folders = [Path(r) for r in args.runs]
    if args.engine == "affiner":
        from affiner.interfaces.serve import serve

        serve(folders, host=args.host, port=args.port, api_key_env=args.api_key_env,
              **({"max_batch": args.max_batch} if args.max_batch is not None else {}))
        return
    from affiner.core.errors import AffinerError
    from affiner.export.engines import engine_command
    from affiner.interfaces.engines import engine_environment, find_launcher, run_engine

    if args.max_batch is not None:  # the engines batch by their own rules (vLLM: continuous batching)
        raise AffinerError(f"--max-batch applies to --engine affiner only; {args.engine} batches requests its own "
                           "way (see its documentation).")

    # Installed, and host, port and key sound, before anything is exported.
    launcher = find_launcher(args.engine)
    env = engine_environment(launcher, args.host, args.port, args.api_key_env)
    command = engine_command(folders, args.engine, launcher.name, launcher.program, args.host, args.port)
    for note in command.notes:
        print(f"note: {note}.")
    run_engine(command.argv, env)
