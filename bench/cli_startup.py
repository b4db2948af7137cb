"""Time what a user waits for before affiner says anything: `import affiner.cli` and `affiner --help`
(target: both together under 0.5 s, median of 5), and check that neither imports torch.

    python bench/cli_startup.py
    python bench/cli_startup.py --repeats 9

Each measurement is a new process, as a user runs it. The figures include the Python interpreter's
own start-up; the interpreter alone (`python -c pass`) is printed beside them for reference.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_SECONDS = 0.5
AFFINER = str(Path(sys.executable).with_name("affiner"))
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "python -c 'import affiner.cli'": [sys.executable, "-c", "import affiner.cli"],
    "affiner --help": [AFFINER, "--help"],
}
HEAVY = "import sys, affiner.cli; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'}))"


def median_seconds(command: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    subprocess.run(COMMANDS["affiner --help"], check=True, stdout=subprocess.DEVNULL)  # warm the file cache
    medians = {label: median_seconds(command, args.repeats) for label, command in COMMANDS.items()}
    for label, seconds in medians.items():
        print(f"{label:<34} {seconds:.3f} s (median of {args.repeats})")
    total = medians["python -c 'import affiner.cli'"] + medians["affiner --help"]
    heavy = subprocess.run([sys.executable, "-c", HEAVY], check=True, capture_output=True, text=True).stdout.strip()
    print(f"import affiner.cli + affiner --help  {total:.3f} s (target < {TARGET_SECONDS} s: "
          f"{'met' if total < TARGET_SECONDS else 'MISSED'}); heavy libraries imported: {heavy}")


if __name__ == "__main__":
    main()
