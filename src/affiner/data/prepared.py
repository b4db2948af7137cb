"""Write a prepared dataset folder: train/test/dropped files, counts, token-length histogram, data card.

The folder is written into a staging sibling and moved into place only once complete, so an
earlier prepared folder is never left half-replaced.
"""

from __future__ import annotations

import shlex
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from affiner.core.config import RunConfig, dump_config
from affiner.core.formatting import shorten
from affiner.core.yaml_input import set_argument
from affiner.core.files import check_replaceable, file_sha256, folder_written_whole, write_atomic, write_json, write_jsonl
from affiner.core.templates import Example, build_template
from affiner.data.pipeline import Prepared, build
from affiner.data.read import PREPARED_FILE

PERCENTILES = (50, 90, 95, 99)


def percentiles(lengths: list[int]) -> dict[str, int]:
    if not lengths:
        return {}
    import numpy as np

    values = np.percentile(np.asarray(lengths), PERCENTILES)
    return {**{f"p{p}": round(float(v)) for p, v in zip(PERCENTILES, values)}, "max": int(max(lengths))}


def plot_lengths(lengths: dict[str, list[int]], max_length: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.6), dpi=110)
    top = max(max((max(v) for v in lengths.values() if v), default=1), max_length)
    bins = min(80, max(10, top // 4))
    for side, color in (("all", "#2e7d32"), ("train", "#2e7d32"), ("test", "#1565c0")):
        if lengths.get(side):
            label = f"{'train + test' if side == 'all' else side} ({len(lengths[side])} rows)"
            axis.hist(lengths[side], bins=bins, range=(0, top), alpha=0.6, color=color, label=label)
    axis.axvline(max_length, color="#c62828", linestyle="--", label=f"max_length = {max_length}")
    axis.set_xlabel("tokens per row (prompt + answer)")
    axis.set_ylabel("rows")
    axis.set_title("Token lengths before the token filter")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def canonical_record(example: Example) -> dict[str, Any]:
    """Alpaca-shaped, so the prepared file is readable by any tool; extra fields only when used."""
    record: dict[str, Any] = {"instruction": example.instruction, "input": example.input, "output": example.response}
    if example.history:
        record["history"] = [{"role": role, "content": content} for role, content in example.history]
    if example.reference:
        record["reference"] = example.reference
    if example.key:
        record["key"] = example.key
    if example.group:
        record["group"] = example.group
    record["origin"] = example.source
    return record


def write_prepared(prepared: Prepared, config: RunConfig, output: Path, overwrite: bool) -> Path:
    """Write everything into a fresh sibling folder, then move it into place: no half-written output."""
    check_replaceable(output, overwrite, PREPARED_FILE, "prepare")
    with folder_written_whole(output) as staging:
        _write_into(staging, prepared, config)
    return output


def _write_into(folder: Path, prepared: Prepared, config: RunConfig) -> None:
    data = config.data
    write_jsonl(folder / "train.jsonl", [canonical_record(e) for e in prepared.train])
    write_jsonl(folder / "test.jsonl", [canonical_record(e) for e in prepared.test])
    write_jsonl(folder / "dropped.jsonl", [{**canonical_record(e), "reason": reason} for e, reason in prepared.ledger.dropped])
    plot_lengths(prepared.lengths, data.max_length, folder / "lengths.png")
    files = {name: {"rows": rows, "sha256": file_sha256(folder / name)}
             for name, rows in (("train.jsonl", len(prepared.train)), ("test.jsonl", len(prepared.test)))}
    manifest = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "tokenizer": config.model.base, "template": data.template, "max_length": data.max_length,
                "files": files, "steps": prepared.ledger.steps, "groups": prepared.info["groups"],
                "token_lengths": {side: percentiles(v) for side, v in prepared.lengths.items()},
                "over_max_length": {side: sum(n > data.max_length for n in v) for side, v in prepared.lengths.items()},
                "data": data.model_dump(mode="json")}
    write_json(folder / PREPARED_FILE, manifest)
    write_atomic(folder / "config.yaml", dump_config(config))
    write_atomic(folder / "data_card.md", data_card(prepared, config, manifest))


def data_card(prepared: Prepared, config: RunConfig, manifest: dict[str, Any]) -> str:
    data = config.data
    lines = [f"# Data card: {config.name}", "",
             f"Prepared by `affiner prepare` on {manifest['created']} from `{data.train}`"
             + (f" and `{data.test}`" if data.test else "") + f" (format {data.format}, template {data.template}, "
             f"tokens counted with the tokenizer of `{config.model.base}`).", "",
             "## Files", "", "| file | rows | sha256 |", "|---|---:|---|"]
    lines += [f"| {name} | {f['rows']} | `{f['sha256'][:16]}…` |" for name, f in manifest["files"].items()]
    lines += [f"| dropped.jsonl | {len(prepared.ledger.dropped)} | every dropped row, with its reason |", "",
              "## What happened to the rows", "", "| split | step | in | dropped | kept | why |",
              "|---|---|---:|---:|---:|---|"]
    for s in prepared.ledger.steps:
        why = "; ".join(f"{n} {reason}" for reason, n in s["dropped"].items())
        lines.append(f"| {s['split']} | {s['step']} | {s['in']} | {sum(s['dropped'].values())} | {s['kept']} | {why} |")
    lines += ["", f"## Token lengths (prompt + answer, before the max_length={data.max_length} filter)", "",
              "| split | rows | " + " | ".join(f"p{p}" for p in PERCENTILES) + " | max | over max_length |",
              "|---|---:|" + "---:|" * (len(PERCENTILES) + 2)]
    for side, values in prepared.lengths.items():
        if values:
            stats = manifest["token_lengths"][side]
            lines.append(f"| {'train + test' if side == 'all' else side} | {len(values)} | " + " | ".join(str(stats[f'p{p}']) for p in PERCENTILES)
                         + f" | {stats['max']} | {manifest['over_max_length'][side]} |")
    lines += ["", "![token lengths](lengths.png)", "", "## Split", ""]
    if data.test:
        lines.append(f"Test rows come from `{data.test}`.")
    else:
        lines.append(f"{data.test_size} of the rows held out with seed {data.seed}; rows sharing a group "
                     "(`group` column, or one acronym's paraphrases) stay on one side.")
    groups = manifest["groups"]
    if groups["train"] or groups["test"]:
        lines.append(f"Groups: {groups['train']} in train, {groups['test']} in test, "
                     f"{groups['on_both_sides']} on both sides"
                     + (" (a separate test file may ask about the same items in other words)." if data.test else "."))
    lines += ["", "## First rows", ""]
    for e in prepared.train[:3]:
        question = f"{e.instruction}\n\n{e.input}" if e.input else e.instruction
        lines += [f"- **Question:** {shorten(question, 300, '…')}", f"  **Answer:** {shorten(e.response, 300, '…')}"]
    # The config saved beside the data, not the recipe's name: a YAML file of the user's may not be at hand.
    lines += ["", "## Use it", "", "```bash",
              "affiner train <this folder>/config.yaml --set data.train=<this folder> --set data.test=<this folder>",
              "affiner evaluate RUN --test <this folder>", "```", ""]
    return "\n".join(lines)


def prepare(config: RunConfig, output: Path, overwrite: bool = False, label: str = "CONFIG") -> Path:
    from affiner.core.models import context_length, tokenizer_for

    output = output.expanduser()
    check_replaceable(output, overwrite, PREPARED_FILE, "prepare")  # before minutes of work, not after
    tokenizer = tokenizer_for(config)
    template = build_template(config.data.template, tokenizer, config.data.system_prompt)
    prepared = build(config.data, tokenizer, template, context_length(config))
    folder = write_prepared(prepared, config, output, overwrite)
    print(prepared.ledger.summary())
    for side, values in prepared.lengths.items():
        if values:
            stats = percentiles(values)
            print(f"  {'train + test' if side == 'all' else side} tokens: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    print(f"wrote {folder}: train.jsonl ({len(prepared.train)} rows), test.jsonl ({len(prepared.test)} rows), "
          f"dropped.jsonl ({len(prepared.ledger.dropped)}), data_card.md, lengths.png")
    print(f"next: affiner train {shlex.quote(label)} {set_argument('data.train', str(folder))} "
          f"{set_argument('data.test', str(folder))}")
    return folder
