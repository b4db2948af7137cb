"""The grid of a sweep: `--grid KEY=V1,V2,...` parsed and checked, expanded into points, and the name
each point's run gets. Nothing here trains or imports torch, so `affiner sweep --help` can read the
metric names from this module.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import yaml

from affiner.core.errors import AffinerError
from affiner.core.formatting import METRIC_INFO

DEFAULT_METRIC = "contains"
# The headline metrics an evaluation reports for the base and the tuned model (metrics.json).
METRICS = (*METRIC_INFO, "judge")
# Short forms of common keys in point names: quickstart-lr1e-4-ep2.
ABBREVIATIONS = {"learning_rate": "lr", "epochs": "ep", "max_steps": "steps", "batch_size": "bs",
                 "gradient_accumulation": "ga", "warmup_ratio": "wu", "weight_decay": "wd", "target_modules": "tm",
                 "dropout": "do", "max_length": "len", "scheduler": "", "method": "", "optimizer": "", "base": ""}
RESERVED = ("name", "output_dir")  # the sweep sets these for every point

Grid = list[tuple[str, list[str]]]


def split_values(text: str) -> list[str]:
    """Split `a,[b,c],{d: e}` at top-level commas only; quotes and brackets protect their commas."""
    values, current, depth, quote = [], [], 0, None
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth < 0:
                raise AffinerError(f"closes a bracket it never opened: {text!r}")
        elif char == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    if depth or quote:
        raise AffinerError(f"has an unclosed {'quote' if quote else 'bracket'}: {text!r}")
    values.append("".join(current).strip())
    return values


def parse_value(text: str) -> Any:
    """A grid value, parsed as YAML like --set (a string when it is not valid YAML)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_grid(items: list[str], overrides: list[str] | None = None) -> Grid:
    """`--grid KEY=V1,V2` strings as [(key, [value texts])], checked: keys once, values distinct, no --set clash."""
    if not items:
        raise AffinerError("give at least one --grid KEY=V1,V2,..., for example "
                           "--grid train.learning_rate=1e-4,3e-4 (or --resume SWEEP to continue a sweep).")
    grid: Grid = []
    for item in items:
        key, values = parse_item(item)
        clash = next((k for k, _ in grid if overlaps(k, key)), None)
        if clash:
            raise AffinerError(f"--grid {key} is given twice" if clash == key else
                               f"--grid {key} and --grid {clash} overlap (one is inside the other)")
        grid.append((key, values))
    for item in overrides or []:
        check_override(item, grid)
    return grid


def parse_item(item: str) -> tuple[str, list[str]]:
    """One `--grid KEY=V1,V2` as (key, [value texts]), each value given once."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or not text.strip():
        raise AffinerError(f"--grid {item!r} must look like section.key=value1,value2, for example "
                           "--grid train.learning_rate=1e-4,3e-4.")
    if key in RESERVED:
        raise AffinerError(f"--grid {key}: the sweep sets {key} for every point (use --output for the sweep "
                           "folder, --set name=NAME for the runs' name).")
    try:
        values = split_values(text)
    except AffinerError as exc:
        raise AffinerError(f"--grid {key} {exc}") from None
    if any(not v for v in values):
        raise AffinerError(f"--grid {item!r} has an empty value; separate values with single commas, "
                           "and write a list value in brackets: [a,b].")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise AffinerError(f"--grid {key} lists {', '.join(repeated)} more than once.")
    return key, values


def check_override(item: str, grid: Grid) -> None:
    """A `--set KEY=VALUE` for every point may not touch a swept key, nor move the runs out of the sweep."""
    set_key = item.partition("=")[0].strip()
    clash = next((k for k, _ in grid if overlaps(k, set_key)), None)
    if clash:
        raise AffinerError(f"{set_key} is both set (--set {item}) and swept (--grid {clash}=...); "
                           "drop one of them.")
    if set_key == "output_dir":
        raise AffinerError("--set output_dir: the runs of a sweep go under its folder's runs/; "
                           "choose the sweep folder with --output DIR.")


def overlaps(a: str, b: str) -> bool:
    """The same key, or one a section holding the other."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def expand(grid: Grid) -> list[dict[str, str]]:
    """Every combination of the grid's values, first key outermost, as {key: value text}."""
    keys = [key for key, _ in grid]
    return [dict(zip(keys, combination)) for combination in itertools.product(*(values for _, values in grid))]


def set_value(raw: dict, key: str, value: Any) -> None:
    """raw[section][...][name] = value for a dotted key, creating missing sections."""
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise AffinerError(f"--grid {key}: '{part}' is a value, not a section.")
        node = child
    node[parts[-1]] = value


def get_value(data: dict, key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


def point_name(base: str, overrides: dict[str, str]) -> str:
    """`quickstart` + {train.learning_rate: 1e-4, train.epochs: 2} -> `quickstart-lr1e-4-ep2`."""
    parts = [base]
    for key, text in overrides.items():
        last = key.rsplit(".", 1)[-1]
        short = ABBREVIATIONS.get(last, last)
        if "/" in text and not text.startswith("["):
            text = text.rstrip("/").rsplit("/", 1)[-1]  # a path: its last part
        value = re.sub(r"[\[\]{}'\"\s]", "", text).replace(",", ".").replace(":", "=")
        value = re.sub(r"[^A-Za-z0-9._-]", "_", value)[:40]
        parts.append(f"{short}{value}")
    return "-".join(p for p in parts if p)


def describe_point(overrides: dict[str, str]) -> str:
    return ", ".join(f"{key}={text}" for key, text in overrides.items())
