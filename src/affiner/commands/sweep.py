"""Sweep a grid of config values: one run per point, resumable, ending with a comparison table and a plot.

    affiner sweep quickstart --grid train.learning_rate=3e-4,1e-3 --grid train.epochs=1,2
    affiner sweep quickstart --grid train.learning_rate=1e-4,3e-4,1e-3 --grid lora.r=4,16 --set train.max_steps=20
    affiner sweep quickstart --grid 'lora.target_modules=[q_proj,v_proj],[q_proj,k_proj,v_proj,o_proj]' --metric rouge_l
    affiner sweep --resume sweeps/quickstart-20261122-183000

Each --grid KEY=V1,V2,... lists values parsed as YAML like --set (1e-4, true, [a, b]); a list value is
written in brackets. The points are every combination, first key outermost. Every point's config is
validated before the first run starts. Each point is one run (named after its values, e.g.
quickstart-lr3e-4-ep2) trained and evaluated like `affiner run`, under the sweep folder's runs/.

The sweep folder (default sweeps/<name>-<timestamp>) gets `sweep.json` (the plan and each point's
status, run folder and metrics, updated after every step), and at the end `sweep.md` and `sweep.csv`
(one row per point: swept values, --metric for base and tuned, held-out loss, final train loss, steps,
duration, run folder; best point marked) and `sweep.png` (the metric against the first swept key).
After Ctrl-C, `--resume` skips finished points, continues an interrupted run from its last checkpoint
and retries failed points. A point that fails is recorded and the sweep goes on; the exit code is 2
if any point failed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from affiner.commands.arguments import add_config_arguments

# The grid module is torch-free: the metric names in --help cost no training import.
from affiner.experiments.grid import DEFAULT_METRIC, METRICS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "YAML file or recipe name (default: quickstart)", "train.max_steps=20")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="a swept config key and its values, e.g. --grid train.learning_rate=1e-4,3e-4 "
                             "(repeatable: every combination is one run; list values in brackets)")
    parser.add_argument("--metric", help=f"metric compared in the table and plot (default: {DEFAULT_METRIC}; "
                                         f"one of {', '.join(METRICS)})")
    parser.add_argument("--output", metavar="DIR", help="the new sweep folder (default: sweeps/<name>-<timestamp>)")
    parser.add_argument("--resume", metavar="SWEEP", help="continue an interrupted sweep folder")


def main(args: argparse.Namespace) -> None:
    from affiner.core.errors import AffinerError
    from affiner.experiments.sweep import load_sweep, plan_sweep, run_sweep

    if args.resume:
        given = [flag for flag, value in (("CONFIG", args.config), ("--grid", args.grid), ("--set", args.overrides),
                                          ("--metric", args.metric), ("--output", args.output)) if value]
        if given:
            raise AffinerError(f"--resume continues a sweep as it was planned; drop {', '.join(given)} "
                               "(or start a new sweep).")
        folder = Path(args.resume)
        load_sweep(folder)  # a folder that is no sweep is said before anything else
    else:
        folder, _ = plan_sweep(args.config, args.grid, args.overrides, args.metric or DEFAULT_METRIC,
                               Path(args.output) if args.output else None)
    run_sweep(folder)
