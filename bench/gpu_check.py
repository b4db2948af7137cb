"""The GPU check: train, evaluate and export tiny models on every precision path, one line per path.

On a machine with one NVIDIA GPU, from a clean clone and without network (the packages affiner
needs that the machine lacks come as wheels in a folder WHEELS; the check itself downloads nothing):

    git clone REPO affiner && cd affiner
    python3 -m venv .venv
    .venv/bin/python -m pip install --no-index --find-links WHEELS -e '.[qlora]' pytest
    .venv/bin/python -c "import torch; print(torch.cuda.is_available())"   # True: a CUDA build of torch
    .venv/bin/python bench/gpu_check.py                     # ~4 tiny paths, a few minutes at most
    .venv/bin/python bench/gpu_check.py --with-embedded     # also 30 LoRA steps of the embedded Gemma 3 270M

WHEELS must hold a CUDA build of torch (PyPI's Linux x86_64 torch wheel and its nvidia-* wheels),
bitsandbytes for the QLoRA path (without it that path is a SKIP) and pytest, whose tests/conftest.py
builds the tiny random models. Paths: LoRA fp32, bf16 and fp16, and QLoRA NF4 (compute dtype auto),
all on a tiny Llama (fp16 on Gemma 3 is refused by design). Each path trains through affiner's own
API, as a user would (`load_config` on a YAML file, `train_and_evaluate`, then `export(merged=True)`),
and PASSes when training finished, every logged loss is finite, the last below the first, the tuned
held-out loss below the base's, and the merged weights are finite. Each line gives the path, its
status, training speed (the answer tokens the loss is on, summed from metrics.jsonl, over run.json's
train_seconds), peak GPU memory over the whole path (train, evaluate, export), the dtype it trained
in (affiner's `dtype_for(config)`), the held-out loss base→tuned and its seconds. The last line is
the summary that README's GPU section records, e.g.

    GPU check 2026-11-28 NVIDIA H200 (sm90), torch 2.13.0, affiner 0.1.0: 4 PASS, 0 FAIL, 0 SKIP in 212 s

Exit code 0 when no path FAILs, 1 otherwise, 2 when there is no GPU. Flags: `--cpu` runs the fp32
path alone on the CPU (it tests this script's logic where there is no GPU; tests/test_gpu_check.py
does); `--with-embedded` adds the embedded model; `--keep DIR` works in DIR (new or empty) and keeps
it, with each path's log and a failure's traceback; `--max-seconds N` (default 480): paths not
started within N seconds of the start are SKIP. Without --keep everything is written in a temporary
folder; the user's runs/ is never touched. HF_HUB_OFFLINE=1 is set. The embedded model's one-time
GGUF conversion is cached in ~/.cache/affiner, as for every affiner command.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import json
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

# torch and affiner are imported inside the functions: --cpu must hide the GPU before torch starts.
if TYPE_CHECKING:
    from affiner.core.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = "embedded:gemma-3-270m"
# Invented definitions from words the tiny tokenizer knows (it was trained on conftest's CORPUS), so
# that rows stay short; acronyms are their initials.
WORDS = ["Queue", "Unified", "Index", "Lookup", "Tables", "Federated", "Registry", "Open", "Nautical", "Data",
         "Modular", "Archive", "Prototype", "Lab", "Experiments", "Geospatial", "Layer", "Technical"]
QUESTIONS = ["What does {a} stand for?", "Define {a}.", "What is {a}?", "Expand the acronym {a}."]


@dataclass(frozen=True)
class Check:
    """One path: a training method and the config's model.precision, on the tiny Llama or the embedded model."""
    name: str
    method: str
    precision: str
    embedded: bool = False


TINY_PATHS = [Check("lora-fp32", "lora", "fp32"), Check("lora-bf16", "lora", "bf16"),
              Check("lora-fp16", "lora", "fp16"), Check("qlora-nf4", "qlora", "auto")]
EMBEDDED_PATH = Check("embedded-lora", "lora", "auto", embedded=True)


@dataclass
class Result:
    name: str
    status: str  # PASS, FAIL or SKIP
    reason: str = ""  # why it failed or was skipped, one line
    tokens_per_s: float | None = None
    peak_mib: float | None = None
    dtype: str = "-"
    base_loss: float | None = None
    tuned_loss: float | None = None
    seconds: float | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true",
                        help="no GPU: run the fp32 LoRA path on the CPU (tests this script's own logic)")
    parser.add_argument("--with-embedded", action="store_true",
                        help=f"also train {EMBEDDED} with LoRA in auto precision for 30 steps")
    parser.add_argument("--keep", metavar="DIR", type=Path,
                        help="work in DIR (new or empty) and keep it: run folders, exports, one log per path")
    parser.add_argument("--max-seconds", type=float, default=480,
                        help="paths not started within this many seconds are SKIP (default 480)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------- inputs


def write_qa(path: Path, rows: int = 40) -> Path:
    """~40 question/answer rows about invented acronyms: enough for 30 steps that mean something."""
    import random

    rng, seen, lines = random.Random(0), set(), []
    while len(lines) < rows:
        words = rng.sample(WORDS, 3)
        acronym = "".join(w[0] for w in words)
        if acronym in seen:
            continue
        seen.add(acronym)
        question = QUESTIONS[len(lines) % len(QUESTIONS)].format(a=acronym)
        lines.append(json.dumps({"question": question, "answer": f"{acronym} stands for {' '.join(words)}."}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def config_for(check: Check, folder: Path, base: Path, data: Path) -> RunConfig:
    """The run's config, loaded from a YAML file as `affiner run CONFIG` loads it."""
    from conftest import write_config

    from affiner.core.config import load_config

    if check.embedded:  # the quickstart recipe, shortened, as `affiner run --set ...` would do it
        return load_config("quickstart", [f"output_dir={folder / 'runs'}", f"name={check.name}",
                                          "train.max_steps=30", "train.logging_steps=1", "eval.max_questions=20"])
    path = write_config(folder, base, data, name=check.name, method=check.method,
                        model={"precision": check.precision},
                        data={"test_size": 8, "max_length": 256},
                        train={"max_steps": 30, "batch_size": 4},
                        eval={"max_new_tokens": 8, "batch_size": 8})
    return load_config(str(path))


# ---------------------------------------------------------------------------------------- one path


def run_check(check: Check, work: Path, base: Path, data: Path, on_gpu: bool) -> Result:
    """Train, evaluate and export one path; its affiner output goes to work/NAME/log.txt."""
    import torch

    from affiner.core.models import dtype_for
    from affiner.experiments.workflow import train_and_evaluate
    from affiner.export.export import export

    folder = work / check.name
    folder.mkdir(parents=True)
    started = time.time()
    if on_gpu:  # each path's peak is its own
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with output_to(folder / "log.txt"):
        config = config_for(check, folder, base, data)
        dtype = str(dtype_for(config)).removeprefix("torch.")  # what the loop autocasts to, the base loads in
        run, evaluation = train_and_evaluate(config)
        exported = export(run, folder / "export", merged=True, gguf=False)
    result = Result(check.name, "PASS", dtype=f"nf4/{dtype}" if check.method == "qlora" else dtype,
                    peak_mib=torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None)
    problems = measure(result, run, evaluation) + merged_problems(exported / "merged")
    result.seconds = time.time() - started
    if problems:
        result.status, result.reason = "FAIL", "; ".join(problems)
    return result


def measure(result: Result, run: Path, evaluation: dict) -> list[str]:
    """Fill in speed and losses from what affiner wrote; returns what falls short of a PASS."""
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
               if line.strip()]
    steps = [r for r in records if "loss" in r]
    problems = [] if info.get("status") == "finished" else [f"run status is {info.get('status')}"]
    if info.get("train_seconds"):  # rounded to 0.1 s: a tiny run on a fast GPU can read 0
        result.tokens_per_s = sum(r.get("tokens", 0) for r in steps) / info["train_seconds"]
    losses = [float(r["loss"]) for r in steps]
    if len(losses) < 2:
        problems.append(f"{len(losses)} logged loss(es), need 2")
    elif not all(math.isfinite(x) for x in losses):
        problems.append("a logged loss is not finite")
    elif losses[-1] >= losses[0]:
        problems.append(f"last loss {losses[-1]:.4f} is not below the first {losses[0]:.4f}")
    held_out = evaluation.get("metrics", {}).get("loss")
    if not held_out:
        return problems + ["the evaluation has no held-out loss"]
    result.base_loss, result.tuned_loss = held_out["base"]["mean"], held_out["tuned"]["mean"]
    if not result.tuned_loss < result.base_loss:
        problems.append(f"tuned held-out loss {result.tuned_loss:.4f} is not below base {result.base_loss:.4f}")
    return problems


def merged_problems(folder: Path) -> list[str]:
    """Whether the export wrote merged weights, every one finite."""
    import torch
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return [f"no merged weights in {folder}"]
    bad = [name for f in files for name, t in load_file(str(f)).items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    return [f"merged weights not finite: {', '.join(bad[:3])}"] if bad else []


def skip_reason(check: Check, elapsed: float, limit: float) -> str | None:
    """Why a path is not started: the time budget is spent, or QLoRA lacks bitsandbytes."""
    if elapsed >= limit:
        return f"not started: {elapsed:.0f} s of the --max-seconds {limit:.0f} spent"
    if check.method == "qlora":
        try:  # it prints its own diagnostics on import; they go nowhere
            with output_to(Path(os.devnull)):
                importlib.import_module("bitsandbytes")
        except Exception as exc:  # ImportError, or a RuntimeError from a bitsandbytes without its CUDA library
            return f"bitsandbytes is not importable ({one_line(exc)})"
    return None


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Everything printed meanwhile into `path`, at the file-descriptor level: native code (the tokenizers
    trainer) and handlers bound to sys.stderr at import (transformers' logging) print there too."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, saved_fd in zip((1, 2), saved):
                os.dup2(saved_fd, fd)
                os.close(saved_fd)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text[:300]}"


# ---------------------------------------------------------------------------------------- output


def fmt(value: float | None, spec: str, unit: str) -> str:
    return "-" if value is None else f"{value:{spec}} {unit}"


# path, status, training speed, peak GPU memory, dtype trained in, held-out loss, seconds
COLUMNS = "{:<14} {:<4}  {:>16}  {:>12}  {:<13}  {:<15}  {:>6}"


def header() -> str:
    return COLUMNS.format("path", "", "training speed", "peak GPU mem", "trained in", "held-out loss", "time")


def line(r: Result) -> str:
    loss = "-" if r.base_loss is None else f"{r.base_loss:.3f}→{r.tuned_loss:.3f}"
    return COLUMNS.format(r.name, r.status, fmt(r.tokens_per_s, ",.0f", "tok/s"), fmt(r.peak_mib, ",.0f", "MiB"),
                          r.dtype, loss, fmt(r.seconds, ".0f", "s"))


def device_label(on_gpu: bool) -> str:
    import torch

    if not on_gpu:
        return "on the CPU (--cpu, no GPU used)"
    major, minor = torch.cuda.get_device_capability(0)
    return f"{torch.cuda.get_device_name(0)} (sm{major}{minor})"


def summary(results: list[Result], on_gpu: bool, seconds: float) -> str:
    import torch

    import affiner

    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    return (f"GPU check {datetime.date.today().isoformat()} {device_label(on_gpu)}, torch {torch.__version__}, "
            f"affiner {affiner.__version__}: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP "
            f"in {seconds:.0f} s")


# ---------------------------------------------------------------------------------------- main


def run_all(checks: list[Check], work: Path, on_gpu: bool, limit: float, started: float, kept: bool) -> list[Result]:
    from conftest import make_tiny_llama

    with output_to(work / "build.log"):
        base = make_tiny_llama(work / "tiny-llama")
    data = write_qa(work / "qa.jsonl")
    results = []
    for check in checks:
        reason = skip_reason(check, time.time() - started, limit)
        if reason:
            result = Result(check.name, "SKIP", reason)
        else:
            path_started = time.time()
            try:
                result = run_check(check, work, base, data, on_gpu)
            except Exception as exc:  # a broken path is reported and the next one still runs
                result = failure(check, exc, work / check.name / "log.txt", kept)
                result.seconds = time.time() - path_started
        print(line(result), flush=True)
        if result.reason:
            print(f"{'':14} {result.reason}", flush=True)
        results.append(result)
    return results


def failure(check: Check, exc: Exception, log: Path, kept: bool) -> Result:
    """A path that raised: one line on screen, the traceback at the end of its log."""
    if log.parent.is_dir():
        with open(log, "a", encoding="utf-8") as out:
            traceback.print_exception(exc, file=out)
    where = f"traceback in {log}" if kept else "rerun with --keep DIR for the traceback"
    return Result(check.name, "FAIL", f"{one_line(exc)} ({where})")


def work_folder(keep: Path | None) -> contextlib.AbstractContextManager[str]:
    if keep is None:
        return tempfile.TemporaryDirectory(prefix="affiner-gpu-check-")
    keep.mkdir(parents=True, exist_ok=True)
    return contextlib.nullcontext(str(keep.resolve()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    if args.keep is not None and args.keep.exists() and (not args.keep.is_dir() or any(args.keep.iterdir())):
        print(f"GPU check: --keep {args.keep} exists and is not an empty folder; give a new or empty one.")
        return 2
    if args.cpu:  # hidden before torch initialises CUDA, so that affiner's device() is the CPU
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded; a missing file is an error, not a wait
    import torch

    on_gpu = not args.cpu
    if on_gpu and not torch.cuda.is_available():
        print(f"GPU check: no GPU: torch {torch.__version__} sees no CUDA device (its CUDA build: "
              f"{torch.version.cuda}). Run it on a machine with an NVIDIA GPU and a CUDA build of torch, "
              "or with --cpu to test the script on the CPU.")
        return 2
    sys.path.insert(0, str(ROOT / "tests"))  # tests/conftest.py builds the tiny models
    try:
        importlib.import_module("conftest")  # it imports pytest
    except ImportError as exc:
        print(f"GPU check: cannot import tests/conftest.py ({one_line(exc)}); install pytest.")
        return 2
    checks = [TINY_PATHS[0]] if args.cpu else list(TINY_PATHS)
    checks += [EMBEDDED_PATH] if args.with_embedded else []
    print(header())
    with work_folder(args.keep) as work:
        previous = Path.cwd()
        os.chdir(work)  # anything written relative to the current folder lands here, never in the user's runs/
        try:
            results = run_all(checks, Path(work), on_gpu, args.max_seconds, started, args.keep is not None)
        finally:
            os.chdir(previous)
    print(summary(results, on_gpu, time.time() - started))
    return 1 if any(r.status == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
