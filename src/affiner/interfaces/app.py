"""Compare the base model and tuned models side by side in the browser (a Streamlit page).

    affiner app                                    # the latest run, and every finished run on its base
    affiner app runs/quickstart-20261122-183000
    affiner app runs/a runs/b --port 8600          # several adapters of one base: loaded once, switched by name
    affiner app --host 0.0.0.0                     # reachable from other machines (default: this one only)

The "Compare" page sends one instruction (and an optional input) to the base model and to the
selected tuned models, with the same decoding settings, and streams their answers next to each
other with time to first token, total time and tokens per second; the session's comparisons can be
downloaded as CSV. The "Runs" page shows each run's training curves, its config and its evaluation
report. A link can open the page on a prompt and generate at once (shareable):

    http://127.0.0.1:8501/?prompt=What+does+QUILT+stand+for%3F&greedy=1
    query parameters: prompt, input, greedy (1/0), temperature, top_p, top_k, max_new_tokens, seed,
    models (comma-separated adapter names), page (compare or runs)
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import os
import subprocess
import sys
import threading
from collections import Counter
from contextlib import closing
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from affiner.core.errors import AffinerError
from affiner.core.runfolder import CONFIG_FILE, RUN_FILE, RunFolder, base_key, model_names, require_one_base

RUNS_ENV = "AFFINER_APP_RUNS"  # the run folders the page serves, joined with os.pathsep
PAGE_SCRIPT = Path(__file__).with_name("app_page.py")
ENGINE_LOADS: Counter = Counter()  # how many times a base model was loaded, per tuple of run folders


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="*", metavar="RUN",
                        help="run folder(s) of one base model (default: the latest finished run under runs/ "
                             "and every finished run that shares its base)")
    parser.add_argument("--port", type=int, default=8501, help="port of the page (default: 8501)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only)")


def main(args: argparse.Namespace) -> None:
    folders = resolve_runs([Path(r) for r in args.runs])
    command = streamlit_command(folders, port=args.port, host=args.host)
    env = {**os.environ, RUNS_ENV: os.pathsep.join(str(f) for f in folders)}
    names = model_names(folders)
    print(f"Comparing base ({RunFolder(folders[0]).config().model.base}) with "
          f"{', '.join(f'{n} ({f})' for n, f in zip(names, folders))}")
    print(f"Open http://{'127.0.0.1' if args.host in {'0.0.0.0', '::'} else args.host}:{args.port}/ "
          "(Ctrl-C to stop)", flush=True)
    process = subprocess.Popen(command, env=env)
    try:
        code = process.wait()
    except KeyboardInterrupt:
        # The terminal's Ctrl-C reached Streamlit too; give it a moment to close its sessions.
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.terminate()
            process.wait()
        raise
    if code != 0:
        raise AffinerError(f"the page server stopped with exit code {code} (see its message above); if port "
                           f"{args.port} is taken, choose another with --port.")


def streamlit_command(folders: list[Path], port: int = 8501, host: str = "127.0.0.1") -> list[str]:
    """The `streamlit run` command line that serves the page on these run folders."""
    return [sys.executable, "-m", "streamlit", "run", str(PAGE_SCRIPT),
            "--server.headless", "true", "--server.port", str(port), "--server.address", host,
            "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer",
            "--", *[str(f) for f in folders]]


# ---------------------------------------------------------------------------------------- run folders


def _usable(folder: Path) -> bool:
    """A finished run with an adapter, whose config still validates."""
    run = RunFolder(folder)
    return (folder / CONFIG_FILE).is_file() and run.is_finished and run.has_adapter


def _base_key(folder: Path) -> tuple | None:
    try:
        return base_key(RunFolder(folder).config())
    except AffinerError:
        return None  # an older run whose config no longer validates is not worth failing the page for


def default_runs(output_dir: str | Path = "runs") -> list[Path]:
    """The latest finished run with an adapter, then every other finished one on the same base, newest first."""
    root = Path(output_dir)
    finished = [p for p in root.glob("*/") if (p / RUN_FILE).is_file() and _usable(p)]
    if not finished:
        latest = RunFolder.latest(root)
        if latest is None:
            raise AffinerError(f"there is no run under {root}/ to compare yet: train one with `affiner run` "
                               "(the quickstart, a few minutes on a CPU), then start `affiner app` again; "
                               "or name run folders: affiner app RUN ...")
        raise AffinerError(f"no finished LoRA/QLoRA run under {root}/ (the latest, {latest}, is "
                           f"{latest.status}{'' if latest.has_adapter else ', without adapter'}): finish "
                           "one with `affiner run` or `affiner train --resume RUN`, or name run folders.")
    finished.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    key = _base_key(finished[0])
    return [finished[0], *(folder for folder in finished[1:] if _base_key(folder) == key)]


def resolve_runs(folders: list[Path], output_dir: str | Path = "runs") -> list[Path]:
    """The run folders to serve, checked now so that a mistake is reported before the server starts."""
    runs = [RunFolder.open(f) for f in folders] or [RunFolder(f) for f in default_runs(output_dir)]
    for run in runs:
        if not run.is_finished:
            raise AffinerError(f"{run} has not finished training (status: {run.status}); finish it with "
                               f"`affiner train --resume {run}` or compare another run.")
        if run.config().method == "full":
            raise AffinerError(f"{run} is a full fine-tune: the page puts adapters on one base, and a full "
                               "fine-tune has none. Compare LoRA or QLoRA runs.")
        if not run.has_adapter:
            raise AffinerError(f"{run} has no adapter (adapter_config.json); was it trained by affiner?")
    require_one_base(runs, "the page compares adapters of one base: start one page per base.")
    checked = [run.path.resolve() for run in runs]
    if len(set(checked)) != len(checked):
        raise AffinerError("the same run folder is named twice.")
    return checked


def runs_from_environment(argv: list[str] | None = None) -> list[Path]:
    """The page's run folders: $AFFINER_APP_RUNS, else the arguments after `--` of `streamlit run`, else the default."""
    value = os.environ.get(RUNS_ENV, "").strip()
    if value:
        return resolve_runs([Path(p) for p in value.split(os.pathsep) if p])
    argv = sys.argv if argv is None else argv
    if argv and Path(argv[0]).resolve() == PAGE_SCRIPT.resolve() and argv[1:]:
        return resolve_runs([Path(p) for p in argv[1:]])
    return resolve_runs([])


# ---------------------------------------------------------------------------------------- generation


def load_engine(folders: tuple[str, ...], names: tuple[str, ...] | None = None):
    """The base of the runs loaded once with every run's adapter; the page caches what this returns."""
    from affiner.interfaces.engine import Engine

    paths = [Path(f) for f in folders]
    engine = Engine.from_runs(paths, names=list(names) if names else model_names(paths))
    ENGINE_LOADS[tuple(folders)] += 1
    return engine


def messages_for(instruction: str, input_text: str = "") -> list[dict[str, str]]:
    message = {"role": "user", "content": instruction}
    if input_text.strip():
        message["input"] = input_text
    return [message]


def generate_answer(engine, name: str, instruction: str, input_text: str, settings,
                    on_piece: Callable[[str], None] | None = None, stop: threading.Event | None = None) -> dict:
    """Stream one model's answer, calling `on_piece(text so far)` per piece; returns the answer and its timings."""
    from affiner.interfaces.engine import Reply

    reply = Reply()
    with closing(engine.stream(name, messages_for(instruction, input_text), settings, stop=stop,
                               reply=reply)) as pieces:
        for _ in pieces:
            if on_piece is not None:
                on_piece(reply.text)
    return {"text": reply.text.strip(), "tokens": reply.tokens, "stopped": reply.stopped,
            "prompt_tokens": reply.prompt_tokens, "first_token_seconds": reply.first_token_seconds,
            "seconds": reply.seconds, "tokens_per_second": reply.tokens_per_second}


def settings_dict(settings) -> dict:
    return asdict(settings)


# ---------------------------------------------------------------------------------------- display helpers

BOX_STYLES = {
    "base": "background:#e7f0fd;border:1px solid #9ec1f5;border-left:5px solid #2f6fd6;",
    "tuned": "background:#e6f6ea;border:1px solid #98d4a6;border-left:5px solid #2e9a4b;",
}


def answer_box(kind: str, text: str, name: str = "", pending: bool = False) -> str:
    """The HTML of one answer: a blue box for the base, a green one for a tuned model; the text is escaped."""
    if kind not in BOX_STYLES:
        raise ValueError(f"unknown answer kind {kind!r}")
    body = html.escape(text).replace("\r\n", "\n").replace("\n", "<br>") if text else ""
    if not body:
        body = "<em style='color:#5b6770'>" + ("generating…" if pending else "(empty answer)") + "</em>"
    return (f'<div class="answer answer-{kind}" data-testid="answer-{kind}" data-model="{html.escape(name)}" '
            f'style="{BOX_STYLES[kind]}color:#17202a;border-radius:6px;padding:0.75rem 0.9rem;'
            f'min-height:3.2rem;line-height:1.5;white-space:normal;overflow-wrap:anywhere">{body}</div>')


def timing_line(answer: dict) -> str:
    first = answer.get("first_token_seconds")
    first_text = f"{first:.2f} s" if first is not None else "–"
    return (f"first token {first_text} · total {answer['seconds']:.2f} s · {answer['tokens']} tokens · "
            f"{answer['tokens_per_second']:.1f} tokens/s")


def comparisons_csv(comparisons: list[dict]) -> str:
    """One row per comparison: instruction, input, settings, then each model's answer, tokens and seconds."""
    fields = ["instruction", "input", "temperature", "top_p", "top_k", "max_new_tokens", "seed"]
    for comparison in comparisons:
        for name in comparison["answers"]:
            for suffix in ("answer", "tokens", "seconds", "first_token_seconds"):
                if f"{name} {suffix}" not in fields:
                    fields.append(f"{name} {suffix}")
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for comparison in comparisons:
        settings = comparison["settings"]
        row = {"instruction": comparison["instruction"], "input": comparison["input"],
               **{k: settings.get(k) for k in ("temperature", "top_p", "top_k", "max_new_tokens", "seed")}}
        for name, answer in comparison["answers"].items():
            first = answer.get("first_token_seconds")
            row.update({f"{name} answer": answer["text"], f"{name} tokens": answer["tokens"],
                        f"{name} seconds": round(answer["seconds"], 3),
                        f"{name} first_token_seconds": None if first is None else round(first, 3)})
        writer.writerow(row)
    return out.getvalue()


def read_metrics(folder: Path):
    """metrics.jsonl as a DataFrame indexed by step (None when the run logged nothing)."""
    import pandas as pd

    rows = RunFolder(folder).log()
    if not rows:
        return None
    frame = pd.DataFrame(rows)
    if "step" not in frame:
        return None
    return frame.drop_duplicates("step", keep="last").set_index("step").sort_index()
