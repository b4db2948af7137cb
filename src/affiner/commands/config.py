"""Show every config key of a recipe or YAML file: its value, its default, its type and what it trades off.

    affiner config                                      # the quickstart recipe, the default of every verb
    affiner config gpt2-alpaca-lora                     # any shipped recipe, by name
    affiner config quickstart --set train.learning_rate=1e-4 --set lora.r=8   # what --set would change
    affiner config quickstart --changed                 # only the keys set away from their default
    affiner config runs/quickstart-20261122-183000/config.yaml --changed   # what a run was trained with
    affiner config quickstart --yaml > my-run.yaml      # a file of your own to edit, then:
    affiner train my-run.yaml

Keys are grouped by section (model, lora, data, train, eval, eval.judge) and marked * where the value
differs from the default. The config is validated first: a misspelt key or a value out of range is an
error naming it, exactly as `affiner train` would report it.
"""

from __future__ import annotations

import argparse
import shutil
import textwrap
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from affiner.commands.arguments import add_config_arguments

CHANGED_MARK = "*"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "YAML file or recipe name to show (default: quickstart)", "train.learning_rate=1e-4")
    parser.add_argument("--changed", action="store_true", help="show only the keys whose value is not the default")
    parser.add_argument("--yaml", action="store_true",
                        help="print the whole config as YAML instead, every key filled in: a file to start from")


def main(args: argparse.Namespace) -> None:
    from affiner.core.config import dump_config, load_config, resolve_config_path

    config = load_config(args.config, args.overrides)
    if args.yaml:
        print(dump_config(config), end="")
        return
    label, _ = resolve_config_path(args.config)
    width = min(shutil.get_terminal_size((100, 24)).columns, 120)
    print(f"{label}{' with --set ' + ' '.join(args.overrides) if args.overrides else ''}  "
          f"({CHANGED_MARK}: not the default)")
    for title, rows in sections(config):
        shown = [row for row in rows if row["changed"] or not args.changed]
        if shown:
            print(f"\n{title}")
            print("\n".join(format_row(row, width) for row in shown))


def sections(config: BaseModel) -> list[tuple[str, list[dict[str, Any]]]]:
    """(section title, one row per key) for the top level, then each section and sub-section, depth first."""
    found: list[tuple[str, list[dict[str, Any]]]] = []

    def walk(model: BaseModel, prefix: str, title: str) -> None:
        rows, nested = [], []
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                nested.append((value, f"{prefix}{name}", field.description))
            else:
                rows.append(describe(f"{prefix}{name}", value, field))
        found.append((title, rows))
        for section, key, about in nested:  # a sub-section (eval.judge) right after its parent
            walk(section, f"{key}.", f"{key}: {about}" if about else key)

    walk(config, "", "top level")
    return found


def describe(key: str, value: Any, field: FieldInfo) -> dict[str, Any]:
    """One key as shown: its value, its default (none when required), its type and its explanation."""
    required = field.is_required()
    default = None if required else field.get_default(call_default_factory=True)
    return {"key": key, "value": value_text(value), "default": value_text(default), "required": required,
            "type": type_text(field), "description": field.description or "", "changed": required or value != default}


def format_row(row: dict[str, Any], width: int) -> str:
    """`  train.learning_rate = 0.001 *   (default 0.0002; number > 0)`, then the explanation, indented."""
    mark = f" {CHANGED_MARK}" if row["changed"] else ""
    default = "required" if row["required"] else f"default {row['default']}"
    head = f"  {row['key']} = {row['value']}{mark}   ({default}; {row['type']})"
    body = textwrap.fill(row["description"], width=width, initial_indent=" " * 6, subsequent_indent=" " * 6,
                         break_on_hyphens=False)
    return f"{head}\n{body}"


def value_text(value: Any) -> str:
    """A value as it is written in YAML: null, true, 0.0002, [q_proj, v_proj], {a: b}."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {value_text(v)}" for k, v in value.items()) + "}"
    return str(value)


TYPE_NAMES = {str: "text", int: "whole number", float: "number", bool: "true or false"}
BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def type_text(field: FieldInfo) -> str:
    """The annotation in words, bounds included: "number > 0", "whole number >= 1, or null"."""
    parts = typing.get_args(field.annotation) if is_union(field.annotation) else (field.annotation,)
    optional = type(None) in parts
    text = " or ".join(annotation_text(p) for p in parts if p is not type(None))
    return f"{with_bounds(text, field.metadata)}, or null" if optional else with_bounds(text, field.metadata)


def with_bounds(text: str, rules: list) -> str:
    """`text` followed by the bounds among `rules` (annotated-types' Gt, Ge... or a Field holding them)."""
    rules = [inner for rule in rules for inner in (rule.metadata if isinstance(rule, FieldInfo) else [rule])]
    bounds = [f"{sign} {value_text(getattr(rule, name))}" for rule in rules
              for name, sign in BOUNDS.items() if getattr(rule, name, None) is not None]
    return f"{text} {', '.join(bounds)}" if bounds else text


def is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def annotation_text(annotation: Any) -> str:
    origin, parts = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(str(p) for p in parts) if len(parts) > 1 else str(parts[0])
    if origin is list:
        inner = annotation_text(parts[0]) if parts else "values"
        return f"list from {inner.removeprefix('one of ')}" if inner.startswith("one of ") else f"list of {inner}"
    if origin is dict:
        return "mapping of names"
    if origin is typing.Annotated:  # epochs: Annotated[float, Field(gt=0)] | Literal["auto"]
        return with_bounds(annotation_text(parts[0]), list(parts[1:]))
    return TYPE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))
