"""YAML as affiner reads it: configs and sweep files, with `--set key.path=value` overrides.

Stricter than YAML's safe loader where a silent choice would surprise: a key given twice in one mapping is an
error; a string that is no text (a lone surrogate) is found by its key path; a value quoted in an error is
shortened, whatever a file's aliases make of it.
"""

from __future__ import annotations

import json
import reprlib
import shlex
from typing import Any

import yaml

from affiner.core.errors import AffinerError
from affiner.core.files import is_text


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: the second `train:`
    section would otherwise silently replace the first. Keys brought in by a merge (`<<: *defaults`) may be
    given again: overriding them is what a merge is for."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)):  # a list as a key is refused below, as unhashable
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key!r} is given twice (first on line {seen[key]}); keep one", key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def parse_yaml(label: str, text: str) -> dict[str, Any]:
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506  (a SafeLoader: no Python objects)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise AffinerError(f"{label} is not valid YAML{where}: {problem}.") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise AffinerError(f"{label} must be a mapping of sections (model:, data:, train:, ...), "
                           f"not a {type(raw).__name__}.")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` strings; values are parsed as YAML so `1e-4`, `true`, `[a, b]` work."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise AffinerError(f"--set {item!r} must look like section.key=value, "
                               f"for example --set train.learning_rate=1e-4.")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise AffinerError(f"--set {item!r}: '{part}' is a value, not a section.")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError:
            node[parts[-1]] = value
    return raw


def set_argument(key: str, value: str) -> str:
    """`--set key=value` as a shell reads it and as `apply_overrides` reads it back: a value YAML would read as
    something else ("glossary #2.json" as "glossary", "null" as nothing, "1e-4" as a number) is quoted for YAML,
    then the whole for the shell. What affiner advises must run as printed."""
    try:
        same = yaml.safe_load(value) == value
    except yaml.YAMLError:
        same = False
    text = value if same else json.dumps(value, ensure_ascii=False)  # a JSON string is a YAML double-quoted one
    return f"--set {shlex.quote(f'{key}={text}')}"


def first_non_text(tree: Any, path: str = "", seen: set[int] | None = None) -> str | None:
    """The key path of the first string that cannot be written as UTF-8 (a lone surrogate), or None. Each
    list or mapping is visited once: YAML aliases can make a small file a tree of billions of shared nodes."""
    seen = set() if seen is None else seen
    if isinstance(tree, str):
        return None if is_text(tree) else path
    if not isinstance(tree, (dict, list)) or id(tree) in seen:
        return None
    seen.add(id(tree))
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for key, value in items:
        inner = f"{path}.{key}".lstrip(".") if isinstance(tree, dict) else f"{path}[{key}]"
        if isinstance(key, str) and not is_text(key):
            return inner
        if (found := first_non_text(value, inner, seen)) is not None:
            return found
    return None


# A value quoted in an error is shortened: YAML aliases can make a small file hold a value of billions of items.
_SHOWN = reprlib.Repr()  # Python 3.11's takes no arguments
_SHOWN.maxstring = _SHOWN.maxother = 120
_SHOWN.maxlist = _SHOWN.maxdict = _SHOWN.maxtuple = 6
_SHOWN.maxlevel = 2


def shortened(value: Any) -> str:
    """`value`'s repr, at most a few hundred characters whatever its size."""
    return _SHOWN.repr(value)
