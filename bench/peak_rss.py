"""Peak memory of `affiner prepare` on a file with one huge row: a 50 MB single-row JSONL (and CSV) beside
a few normal rows (target: peak RSS under 1 GB; before the length shortcut it was 13 GB).

    python bench/peak_rss.py
    python bench/peak_rss.py --megabytes 200 --formats jsonl --model path/to/model

Each file is prepared by a new `affiner prepare` process, offline (HF_HUB_OFFLINE=1), with the embedded
default model's tokenizer unless --model says otherwise; its peak RSS is the child's own ru_maxrss
(os.wait4). A first run on the normal rows alone is the baseline: the interpreter, torch and the tokenizer
(it also converts the embedded model once, if this machine has not yet).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TARGET_MB = 1024
AFFINER = str(Path(sys.executable).with_name("affiner"))
NORMAL = [{"question": f"What does item {i} stand for?", "answer": f"Item {i} stands for thing number {i}."}
          for i in range(8)]


def write_data(folder: Path, fmt: str, megabytes: int, name: str) -> Path:
    """The normal rows, then (unless megabytes is 0) one row whose answer is `megabytes` of words."""
    huge = ("lorem ipsum dolor sit amet " * (megabytes * 2**20 // 27 + 1))[: megabytes * 2**20]
    path = folder / f"{name}.{fmt}"
    with path.open("w", encoding="utf-8") as out:
        if fmt == "csv":
            out.write("question,answer\n")
            out.writelines(f"{r['question']},{r['answer']}\n" for r in NORMAL)
            out.write(f'Is this long?,"{huge}"\n' if huge else "")  # quoted: the costlier way to read it
        else:
            out.writelines(json.dumps(r) + "\n" for r in NORMAL)
            out.write(json.dumps({"question": "Is this long?", "answer": huge}) + "\n" if huge else "")
    return path


def write_config(folder: Path, model: str, train: Path) -> Path:
    config = {"name": "peak-rss", "model": {"base": model},
              "data": {"train": str(train), "template": "qa", "max_length": 128, "test_size": 2}}
    path = folder / f"{train.stem}.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    return path


def prepare_peak_mb(config: Path, output: Path, log: Path) -> tuple[int, float]:
    """(exit code, peak RSS in MB) of one `affiner prepare` process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with log.open("w") as out:
        child = subprocess.Popen([AFFINER, "prepare", str(config), "--output", str(output)], env=env,
                                 stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not the largest child's so far
    child.returncode = os.waitstatus_to_exitcode(status)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return child.returncode, usage.ru_maxrss * scale / 2**20


def dropped_for_length(output: Path) -> str:
    steps = json.loads((output / "prepared.json").read_text(encoding="utf-8"))["steps"]
    return "; ".join(f"{n} {reason}" for s in steps if s["step"] in ("characters", "tokens")
                     for reason, n in s["dropped"].items()) or "nothing dropped for length"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=50)
    parser.add_argument("--formats", nargs="+", default=["jsonl", "csv"], choices=["jsonl", "csv"])
    parser.add_argument("--model", default="embedded:gemma-3-270m")
    args = parser.parse_args()
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        runs = [("baseline", write_data(folder, "jsonl", 0, "baseline"))]
        runs += [(fmt, write_data(folder, fmt, args.megabytes, "huge")) for fmt in args.formats]
        for label, train in runs:
            output = folder / f"out-{label}"
            code, peak = prepare_peak_mb(write_config(folder, args.model, train), output, folder / f"{label}.log")
            if code != 0:
                print(f"{label}: affiner prepare exited with {code}:\n{(folder / f'{label}.log').read_text()[-2000:]}")
                failed = True
                continue
            size = train.stat().st_size / 2**20
            over = label != "baseline" and peak >= TARGET_MB
            failed |= over
            verdict = "" if label == "baseline" else f" (target < {TARGET_MB} MB: {'FAIL' if over else 'PASS'})"
            print(f"{label:<8} {size:7.1f} MB file  peak RSS {peak:7.0f} MB{verdict}; {dropped_for_length(output)}")
    print("FAIL" if failed else "PASS")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
