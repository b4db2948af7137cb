"""List runs with their scores, or compare several side by side.

    affiner runs                                  # every run under runs/: model, data, method, time, scores
    affiner runs --dir sweeps/quickstart-20261122-210000/runs
    affiner runs sweeps/quickstart-20261122-210000/runs   # the same: a folder in place of list
    affiner runs compare runs/quickstart-20261122-183000 runs/quickstart-20261122-191348
    affiner runs compare runs/a runs/b --json     # the same, for scripts

A run folder describes itself (config.yaml, run.json, data.json, metrics.jsonl, and after
`affiner evaluate`, metrics.json): both views are read from those files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", default="list", metavar="list|compare|DIR",
                        help="list (default) or compare the RUN folders given; a folder lists the runs under it")
    parser.add_argument("runs", nargs="*", type=Path, metavar="RUN", help="run folders to compare")
    parser.add_argument("--dir", type=Path, default=Path("runs"), help="where to look for runs (default: runs)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def main(args: argparse.Namespace) -> None:
    from affiner.core.errors import AffinerError
    from affiner.experiments.runs import compare_runs, describe_runs, format_comparison, list_runs

    for folder in (args.action, args.dir):  # a run folder given where a folder of runs is expected
        if (Path(folder) / "run.json").is_file():
            raise AffinerError(f"{folder} is a run folder: affiner runs --dir {Path(folder).parent} lists it "
                               "with the others; affiner runs compare RUN RUN ... compares runs.")
    if args.action not in ("list", "compare"):
        if not Path(args.action).is_dir():
            raise AffinerError(f"affiner runs {args.action}: not list, compare or a folder of runs; e.g. affiner runs, "
                               "affiner runs --dir sweeps/NAME/runs, affiner runs compare runs/a runs/b.")
        if args.runs or args.dir != Path("runs"):
            raise AffinerError(f"affiner runs {args.action}: one folder to list the runs of (or --dir); to compare "
                               "run folders: affiner runs compare RUN RUN ...")
        args.action, args.dir = "list", Path(args.action)
    if args.action == "list":
        if args.runs:
            raise AffinerError("affiner runs lists the runs under --dir; to compare folders: "
                               "affiner runs compare RUN RUN ...")
        if args.json:
            print(json.dumps(describe_runs(args.dir), indent=2, ensure_ascii=False))
        else:
            print(list_runs(args.dir))
        return
    if len(args.runs) < 2:
        raise AffinerError("affiner runs compare needs at least two run folders, e.g. "
                           "affiner runs compare runs/a runs/b.")
    comparison = compare_runs(args.runs)
    print(json.dumps(comparison, indent=2, ensure_ascii=False) if args.json else format_comparison(comparison))
