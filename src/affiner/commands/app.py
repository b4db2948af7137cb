"""Compare the base model and tuned models side by side in the browser (a Streamlit page).

    affiner app                                    # the latest run, and every finished run on its base
    affiner app runs/quickstart-20261122-183000
    affiner app runs/a runs/b --port 8600          # several adapters of one base: loaded once, switched by name
    export AFFINER_KEY=$(openssl rand -hex 16)     # a fresh key, to give to the people who may use the page
    affiner app --host 0.0.0.0 --api-key-env AFFINER_KEY   # reachable from other machines (default: this one only)

The "Compare" page sends one instruction (and an optional input) to the base model and to the
selected tuned models, with the same decoding settings, and streams their answers next to each
other with time to first token, total time and tokens per second; the session's comparisons can be
downloaded as CSV. The "Runs" page shows each run's training curves, its config and its evaluation
report. A link can open the page on a prompt and generate at once (shareable):

    http://127.0.0.1:8501/?prompt=What+does+QUILT+stand+for%3F&greedy=1
    query parameters: prompt, input, greedy (1/0), temperature, top_p, top_k, max_new_tokens, seed,
    repetition_penalty, models (comma-separated adapter names), page (compare or runs)

On any --host but a loopback one (127.0.0.1, localhost, ::1) the page needs a key: --api-key-env
names the environment variable holding it, and each browser session must type it into the page's
password field before anything (runs, answers) is shown. Without one, affiner app refuses to start.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from affiner.commands.arguments import port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="*", type=Path, metavar="RUN",
                        help="run folder(s) of one base model (default: the latest finished run under runs/ "
                             "and every finished run that shares its base)")
    parser.add_argument("--port", type=port, default=8501, help="port of the page (default: 8501)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only; any other needs "
                             "--api-key-env)")
    parser.add_argument("--api-key-env", metavar="NAME",
                        help="environment variable holding the key the page asks for before showing anything")


def main(args: argparse.Namespace) -> None:
    from affiner.interfaces.app import launch

    launch([Path(r) for r in args.runs], host=args.host, port=args.port, api_key_env=args.api_key_env)
