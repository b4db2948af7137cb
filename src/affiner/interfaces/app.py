"""What the page of `affiner app` runs on, outside Streamlit: which run folders it compares (checked
before the page server starts), the key a page reachable from other machines asks for, the engine it
loads once, one answer streamed with its timings, the answer boxes and the comparisons as CSV.
`launch` starts the page server; app_page.py is the page.
"""

from __future__ import annotations

import csv
import hmac
import html
import io
import os
import signal
import subprocess
import sys
import threading
import warnings
from collections import Counter
from contextlib import closing
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from affiner.core.errors import AffinerError
from affiner.core.formatting import format_value
from affiner.core.net import is_loopback
from affiner.core.runfolder import RunFolder, base_key, model_names, require_adapter_weights, require_one_base
from affiner.interfaces.quiet import quiet_libraries

RUNS_ENV = "AFFINER_APP_RUNS"  # the run folders the page serves, joined with os.pathsep
KEY_ENV = "AFFINER_APP_KEY"  # the key the page asks for before showing anything (unset: no key)
PAGE_SCRIPT = Path(__file__).with_name("app_page.py")
ENGINE_LOADS: Counter = Counter()  # how many times a base model was loaded, per tuple of run folders


def launch(folders: list[Path], host: str = "127.0.0.1", port: int = 8501, api_key_env: str | None = None) -> None:
    """Serve the page on the run folders (default: the latest finished run and its siblings) until Ctrl-C;
    the key the page asks for, if any, is read from the environment variable `api_key_env`."""
    key = page_key_for(host, api_key_env)
    folders = resolve_runs(folders)
    env = {**os.environ, RUNS_ENV: os.pathsep.join(str(f) for f in folders)}
    env.pop(KEY_ENV, None)  # a key left in the caller's environment must not lock a page started without one
    if key is not None:
        env[KEY_ENV] = key  # the environment, unlike the command line, is not visible to other users
    names = model_names(folders)
    print(f"Comparing base ({RunFolder(folders[0]).config().model.base}) with "
          f"{', '.join(f'{n} ({display_path(f)})' for n, f in zip(names, folders))}")
    print(f"Open http://{'127.0.0.1' if host in {'', '0.0.0.0', '::'} else host}:{port}/ (Ctrl-C to stop)"
          + (" and give the key" if key else ""), flush=True)
    code = wait_for_page_server(subprocess.Popen(streamlit_command(folders, port=port, host=host), env=env))
    if code != 0:
        raise AffinerError(f"the page server stopped with exit code {code} (see its message above); if port "
                           f"{port} is taken, choose another with --port.")


def page_key_for(host: str, api_key_env: str | None) -> str | None:
    """The key the page will ask for; refused, before anything is loaded, on a public address without one."""
    from affiner.core.net import read_api_key

    key = read_api_key(api_key_env)
    if key is None and not is_loopback(host):
        raise AffinerError(f"refusing to serve the page on {host or 'all interfaces'} without a key: anyone who "
                           "can reach this machine could read the runs and generate with the models. Put a key "
                           "in an environment variable and pass its name: export AFFINER_KEY=$(openssl rand -hex "
                           f"16), then affiner app --host {host or '0.0.0.0'} --api-key-env AFFINER_KEY (the page "
                           "asks for the key before showing anything); or keep the default --host 127.0.0.1.")
    return key


def page_key() -> str | None:
    """The key this page asks for (set by `launch`), None when it needs none."""
    return os.environ.get(KEY_ENV) or None


def key_matches(sent: str, key: str) -> bool:
    """Whether `sent` is the key, compared in constant time: timing must not reveal how much of a guess was right."""
    return hmac.compare_digest(sent.strip().encode("utf-8"), key.strip().encode("utf-8"))


def wait_for_page_server(process: subprocess.Popen) -> int:
    """The page server's exit code; on Ctrl-C, once it has closed (the terminal's Ctrl-C reached it too). A
    SIGTERM or SIGHUP (kill, a closed terminal, a service manager stopping affiner) reaches affiner alone: the
    page server, holding the models, is stopped before affiner exits, not left serving on the port."""
    def stop_both(signum: int, frame) -> None:
        process.terminate()  # not waited for here: the interrupted wait() still holds the process's lock
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop_both) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return process.wait()
    except (KeyboardInterrupt, SystemExit):
        _end(process, grace=10)  # Streamlit closes its sessions on its own Ctrl-C: give it a moment
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _end(process: subprocess.Popen, grace: float) -> None:
    """The page server ended: after `grace` seconds of its own shutting down, terminated, at last killed."""
    try:
        process.wait(timeout=grace)
        return
    except subprocess.TimeoutExpired:
        process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def streamlit_command(folders: list[Path], port: int = 8501, host: str = "127.0.0.1") -> list[str]:
    """The `streamlit run` command line that serves the page on these run folders."""
    return [sys.executable, "-m", "streamlit", "run", str(PAGE_SCRIPT),
            "--server.headless", "true", "--server.port", str(port), "--server.address", host,
            "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer",
            "--", *[str(f) for f in folders]]


# ---------------------------------------------------------------------------------------- run folders


def _base_key(run: RunFolder) -> tuple | None:
    try:
        return base_key(run.config())
    except AffinerError:
        return None  # an older run whose config no longer validates is not worth failing the page for


def default_runs(output_dir: str | Path = "runs") -> list[Path]:
    """The latest finished run with an adapter, then every other finished one on the same base, newest first."""
    root = Path(output_dir)
    runs = RunFolder.all_under(root) if root.is_dir() else []
    finished = [run for run in runs if run.is_finished and run.has_adapter and _base_key(run) is not None]
    if not finished:
        latest = max(runs, key=lambda run: run.path.stat().st_mtime, default=None)
        if latest is None:
            raise AffinerError(f"there is no run under {root}/ to compare yet: train one with `affiner run` "
                               "(the quickstart, a few minutes on a CPU), then start `affiner app` again; "
                               "or name run folders: affiner app RUN ...")
        raise AffinerError(f"no finished LoRA/QLoRA run under {root}/ (the latest, {latest}, is "
                           f"{latest.status}{'' if latest.has_adapter else ', without adapter'}): finish "
                           "one with `affiner run` or `affiner train --resume RUN`, or name run folders.")
    finished.sort(key=lambda run: run.path.stat().st_mtime, reverse=True)
    key = _base_key(finished[0])
    return [run.path for run in finished if _base_key(run) == key]


def resolve_runs(folders: list[Path], output_dir: str | Path = "runs") -> list[Path]:
    """The run folders to serve, checked now so that a mistake is reported before the server starts."""
    runs = [RunFolder.open(f) for f in folders] or [RunFolder(f) for f in default_runs(output_dir)]
    for run in runs:
        run.require_finished("compare it")
        if run.config().method == "full":
            raise AffinerError(f"{run} is a full fine-tune: the page puts adapters on one base, and a full "
                               "fine-tune has none. Compare LoRA or QLoRA runs.")
        if not run.has_adapter:
            raise AffinerError(f"{run} has no adapter (adapter_config.json); was it trained by affiner?")
        require_adapter_weights(run.path)
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


def hide_library_deprecations() -> None:
    """Deprecation notices raised inside transformers, peft and torch are for their maintainers, as `affiner`'s
    other verbs judge too; the page's process would otherwise print them in its user's terminal."""
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|peft|torch|accelerate)(\.|$)")


def load_engine(folders: tuple[str, ...], names: tuple[str, ...] | None = None):
    """The base of the runs loaded once with every run's adapter; the page caches what this returns."""
    from affiner.interfaces.engine import Engine

    paths = [Path(f) for f in folders]
    with quiet_libraries:
        engine = Engine.from_runs(paths, names=list(names) if names else model_names(paths))
    ENGINE_LOADS[tuple(folders)] += 1
    return engine


# The page's fields follow the run's template: (label of the main field, label of the input field or None when
# the template has no input of its own).
FIELD_LABELS = {"alpaca": ("Instruction", "Input (optional)"), "instruction": ("Instruction", "Input (optional)"),
                "qa": ("Question", None), "chat": ("Message", None)}


def field_labels(template: str) -> tuple[str, str | None]:
    return FIELD_LABELS.get(template, ("Instruction", "Input (optional)"))


def messages_for(instruction: str, input_text: str = "") -> list[dict[str, str]]:
    message = {"role": "user", "content": instruction}
    if input_text.strip():
        message["input"] = input_text
    return [message]


def generate_answer(engine, name: str, instruction: str, input_text: str, settings,
                    on_piece: Callable[[str], None] | None = None, stop: threading.Event | None = None,
                    reply=None) -> dict:
    """Stream one model's answer, calling `on_piece(text so far)` per piece; returns the answer and its timings.
    `reply` (an engine Reply) holds what was said so far, should the page be stopped mid-answer."""
    from affiner.interfaces.engine import Reply, how_it_ended

    reply = reply if reply is not None else Reply()
    with quiet_libraries, closing(engine.stream(name, messages_for(instruction, input_text), settings, stop=stop,
                                                reply=reply)) as pieces:
        for _ in pieces:
            if on_piece is not None:
                on_piece(reply.text)
    return answer_of(reply, how_it_ended(reply, settings.max_new_tokens))


STOPPED = "stopped before its end (the page was stopped or changed)"


def answer_of(reply, ended: str = STOPPED) -> dict:
    """An answer as the page shows and keeps it (by default one cut short by the page: what was said so far)."""
    return {"text": reply.text.strip(), "tokens": reply.tokens, "stopped": reply.stopped, "ended": ended,
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
    first_text = human_duration(first) if first is not None else "–"
    ended = f" · {answer['ended']}" if answer.get("ended") else ""
    return (f"first token {first_text} · total {human_duration(answer['seconds'])} · {answer['tokens']} tokens · "
            f"{format_value(answer['tokens_per_second'], 'count')} tokens/s{ended}")


def run_facts(run: RunFolder) -> str:
    """The Runs page's line about a run: status, steps, training time, when it finished (what run.json has)."""
    try:
        info = run.info()
    except (OSError, ValueError):
        info = {}
    facts = [f"status **{info.get('status', '?')}**"]
    if "steps" in info:
        facts.append(f"steps {info['steps']}")
    if isinstance(info.get("train_seconds"), (int, float)):
        facts.append(f"training {human_duration(info['train_seconds'])}")
    if "finished" in info:
        facts.append(f"finished {info['finished']}")
    return " · ".join(facts)


def human_duration(seconds: float) -> str:
    """'0.53 s', '42 s', '2 min 13 s', '1 h 05 min': as precise as a person reads a duration."""
    if seconds < 10:
        return f"{seconds:.2f} s" if seconds < 1 else f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def display_path(path: Path, cwd: Path | None = None) -> str:
    """A path as typed where the page was started: relative to the current folder when under it, else under
    ~ when under the home folder, else absolute."""
    path, cwd = Path(path).resolve(), (cwd or Path.cwd()).resolve()
    if path.is_relative_to(cwd):
        return str(path.relative_to(cwd))
    home = Path.home().resolve()
    return f"~/{path.relative_to(home)}" if path.is_relative_to(home) else str(path)


DECODING_FIELDS = ("temperature", "top_p", "top_k", "max_new_tokens", "seed", "repetition_penalty")


def comparisons_download(comparisons: list[dict]) -> bytes:
    """The CSV as downloaded: UTF-8 with a byte-order mark, without which Excel reads "été" as "Ã©tÃ©"."""
    return comparisons_csv(comparisons).encode("utf-8-sig")


def comparisons_csv(comparisons: list[dict]) -> str:
    """One row per comparison: instruction, input, settings, then each model's answer, tokens and seconds."""
    fields = ["instruction", "input", *DECODING_FIELDS]
    for comparison in comparisons:
        for name in comparison["answers"]:
            for suffix in ("answer", "ended", "tokens", "seconds", "first_token_seconds"):
                if f"{name} {suffix}" not in fields:
                    fields.append(f"{name} {suffix}")
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for comparison in comparisons:
        settings = comparison["settings"]
        row = {"instruction": comparison["instruction"], "input": comparison["input"],
               **{k: settings.get(k) for k in DECODING_FIELDS}}
        for name, answer in comparison["answers"].items():
            first = answer.get("first_token_seconds")
            row.update({f"{name} answer": answer["text"], f"{name} ended": answer.get("ended", ""),
                        f"{name} tokens": answer["tokens"],
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
    # A row edited by hand ("step": "x", "loss": "NaN") is left out, not a traceback over the whole page.
    frame = frame.apply(pd.to_numeric, errors="coerce").dropna(subset=["step"])
    return frame.drop_duplicates("step", keep="last").set_index("step").sort_index() if len(frame) else None
