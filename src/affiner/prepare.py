"""Clean, filter, split and measure a dataset, and write the train/test files that `train` reads.

    affiner prepare quickstart --output data/glossary
    affiner prepare gpt2-alpaca-lora --output data/alpaca
    affiner prepare gpt2-large-glaive-qlora --output data/glaive
    affiner prepare my-run.yaml --set data.train=faq.csv --set data.columns.instruction=question \\
        --set data.columns.output=answer --set data.languages=[fr] --output data/faq

The `data:` section of the config says what to read and how to clean it; the tokenizer and the
template are the model's own, so "at most max_length tokens" means what it will mean in training.
Each step (read, empty, duplicates, answer words, patterns, language, tokens, split, train/test
overlap) is counted, and every dropped row is kept with its reason in `dropped.jsonl`. The output
folder holds train.jsonl, test.jsonl, prepared.json (counts, token-length percentiles, sha256 of
each file), lengths.png and data_card.md. Train on it with `--set data.train=data/alpaca`; a file
edited after preparing is refused, so the data card always describes the data trained on.

`affiner train` runs the same cleaning in memory when it is given raw data, so preparing first
changes nothing in the rows a model sees: it lets you look at them before paying for training.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import string
import tempfile
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from affiner import data as data_mod
from affiner.config import DataConfig, RunConfig, dump_config, load_config
from affiner.errors import AffinerError
from affiner.runs import replace_folder
from affiner.templates import Example, Template, build_template, render_prompt

PERCENTILES = (50, 90, 95, 99)
Dropped = list[tuple[Example, str]]  # (example, reason)


# ---------------------------------------------------------------------------------------- the ledger


@dataclass
class Ledger:
    """Rows in, dropped (by reason) and kept at each step, per split: the data card's table."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    dropped: Dropped = field(default_factory=list)

    def record(self, side: str, step: str, before: int, kept: list[Example], dropped: Dropped) -> list[Example]:
        reasons: dict[str, int] = {}
        for _, reason in dropped:
            reasons[reason] = reasons.get(reason, 0) + 1
        self.steps.append({"split": side, "step": step, "in": before, "dropped": reasons, "kept": len(kept)})
        self.dropped += dropped
        return kept

    def summary(self) -> str:
        lines = []
        for s in self.steps:
            why = "; ".join(f"{n} {reason}" for reason, n in s["dropped"].items())
            lines.append(f"  {s['split']:<5} {s['step']:<22} {s['in']:>8} -> {s['kept']:>8}" + (f"  ({why})" if why else ""))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------- filters


def normalized(text: str) -> str:
    """Case, accents' composition, spacing and punctuation removed: "Hello,  World!" == "hello world"."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = text.translate(_PUNCTUATION)
    return " ".join(text.split())


_PUNCTUATION = str.maketrans("", "", string.punctuation + "«»“”‘’…¿¡")


def question_key(example: Example, normalize: bool = True) -> str:
    parts = [*(f"{role}:{content}" for role, content in example.history), example.instruction, example.input]
    return "\x1f".join(normalized(p) if normalize else p for p in parts)


def drop_empty(examples: list[Example]) -> tuple[list[Example], Dropped]:
    kept, dropped = [], []
    for e in examples:
        if not e.instruction.strip():
            dropped.append((e, "empty question"))
        elif not e.response.strip():
            dropped.append((e, "empty answer"))
        else:
            kept.append(e)
    return kept, dropped


def drop_duplicates(examples: list[Example], mode: str) -> tuple[list[Example], Dropped]:
    """Keep the first of identical (question, answer) pairs; `normalized` also catches case/space/punctuation twins."""
    if mode == "none":
        return examples, []
    seen: dict[str, str] = {}
    kept, dropped = [], []
    for e in examples:
        exact = question_key(e, normalize=False) + "\x1e" + e.response
        key = exact if mode == "exact" else question_key(e) + "\x1e" + normalized(e.response)
        if key in seen:
            kind = "exact duplicate" if exact == seen[key] else "near duplicate (case, spaces, punctuation)"
            dropped.append((e, kind))
        else:
            seen[key] = exact
            kept.append(e)
    return kept, dropped


def drop_long_answers(examples: list[Example], max_words: int | None) -> tuple[list[Example], Dropped]:
    if not max_words:
        return examples, []
    reason = f"answer over {max_words} words"
    kept = [e for e in examples if len(e.response.split()) <= max_words]
    return kept, [(e, reason) for e in examples if len(e.response.split()) > max_words]


def drop_by_pattern(examples: list[Example], keep: str | None, drop: str | None) -> tuple[list[Example], Dropped]:
    keep_re, drop_re = (re.compile(p) if p else None for p in (keep, drop))
    kept, dropped = [], []
    for e in examples:
        text = f"{e.instruction}\n{e.input}\n{e.response}"
        if keep_re and not keep_re.search(text):
            dropped.append((e, f"does not match keep_matching {keep!r}"))
        elif drop_re and drop_re.search(text):
            dropped.append((e, f"matches drop_matching {drop!r}"))
        else:
            kept.append(e)
    return kept, dropped


def drop_other_languages(examples: list[Example], languages: list[str] | None) -> tuple[list[Example], Dropped]:
    if not languages:
        return examples, []
    from py3langid.langid import _get_identifier

    identifier = _get_identifier()
    unknown = sorted(set(languages) - set(identifier.nb_classes))
    if unknown:
        raise AffinerError(f"data.languages: {', '.join(unknown)} is not a language code the detector knows "
                           f"(ISO 639-1 codes such as en, fr, de, es; known: {', '.join(identifier.nb_classes)}).")
    kept, dropped = [], []
    for e in examples:
        language, _ = identifier.classify(f"{e.instruction}\n{e.input}\n{e.response}")
        if language in languages:
            kept.append(e)
        else:
            dropped.append((e, f"language {language} not in {', '.join(languages)}"))
    return kept, dropped


def drop_too_many_tokens(examples: list[Example], lengths: list[int], max_length: int) -> tuple[list[Example], Dropped]:
    reason = f"over max_length={max_length} tokens (prompt + answer)"
    kept = [e for e, n in zip(examples, lengths) if n <= max_length]
    return kept, [(e, reason) for e, n in zip(examples, lengths) if n > max_length]


def drop_overlap(test: list[Example], train: list[Example]) -> tuple[list[Example], Dropped]:
    """A held-out question the model trained on measures memory, not learning: drop it from the test side."""
    asked = {question_key(e) for e in train}
    kept = [e for e in test if question_key(e) not in asked]
    return kept, [(e, "question also in train") for e in test if question_key(e) in asked]


# ---------------------------------------------------------------------------------------- the pipeline


@dataclass
class Prepared:
    train: list[Example]
    test: list[Example]
    ledger: Ledger
    lengths: dict[str, list[int]]  # token lengths of every row that reached the token filter, per split
    info: dict[str, Any]  # what data.json / prepared.json record: sources, fingerprints, counts


def clean(examples: list[Example], data: DataConfig, tokenizer, template: Template, ledger: Ledger,
          side: str) -> tuple[list[Example], list[int]]:
    """Every filter of the config, in order, each counted; returns the kept rows and the measured token lengths."""
    steps = [("empty fields", True, lambda rows: drop_empty(rows)),
             ("duplicates", data.dedupe != "none", lambda rows: drop_duplicates(rows, data.dedupe)),
             ("answer words", bool(data.max_response_words),
              lambda rows: drop_long_answers(rows, data.max_response_words)),
             ("patterns", bool(data.keep_matching or data.drop_matching),
              lambda rows: drop_by_pattern(rows, data.keep_matching, data.drop_matching)),
             ("language", bool(data.languages), lambda rows: drop_other_languages(rows, data.languages))]
    for name, active, step in steps:
        if active:  # a filter that is off is not a step: the data card lists what was done
            examples = ledger.record(side, name, len(examples), *step(examples))
    _check_renderable(examples, template)
    lengths = data_mod.token_lengths(examples, template, tokenizer)
    kept = ledger.record(side, "tokens", len(examples), *drop_too_many_tokens(examples, lengths, data.max_length))
    return kept, lengths


def _check_renderable(examples: list[Example], template: Template) -> None:
    multi_turn = next((e for e in examples if e.history), None)
    if multi_turn is not None and not template.is_chat:
        render_prompt(template, multi_turn)  # raises the template's own error, naming the row


def read_examples(source: str, data: DataConfig, split_name: str, ledger: Ledger, side: str) -> list[Example]:
    rows = data_mod.read_rows(source, split_name)
    examples = data_mod.to_examples(rows, data.format, data.columns)
    ledger.steps.append({"split": side, "step": "read", "in": len(rows), "dropped": {}, "kept": len(examples)})
    if side == "train" and data.max_rows and len(examples) > data.max_rows:
        examples = ledger.record(side, "max_rows", len(examples), examples[: data.max_rows],
                                 [(e, f"beyond max_rows={data.max_rows}") for e in examples[data.max_rows:]])
    return examples


def build(data: DataConfig, tokenizer, template: Template) -> Prepared:
    """The rows a run trains and is evaluated on: read, cleaned, split, de-overlapped, measured."""
    ledger = Ledger()
    train = read_examples(data.train, data, data.split, ledger, "train")
    if not train:
        raise AffinerError(f"{data.train} holds no rows.")
    train, train_lengths = clean(train, data, tokenizer, template, ledger, "train")
    if not train:
        reasons = "; ".join(f"{n} {reason}" for step in ledger.steps for reason, n in step["dropped"].items())
        raise AffinerError(f"no row of {data.train} survives cleaning ({reasons}), so there is nothing to train "
                           "on. Loosen the filters (data.max_length, data.max_response_words, data.keep_matching, "
                           "data.drop_matching, data.languages) or fix the data.")
    test_source = data.test or (data.train if data_mod.is_prepared(data.train) else None)
    if test_source:
        test_split = "test" if data_mod.is_prepared(test_source) else data.split
        test = read_examples(test_source, data, test_split, ledger, "test")
        test, test_lengths = clean(test, data, tokenizer, template, ledger, "test")
        origin = test_source
    else:
        before = len(train)
        train, test = data_mod.split(train, data.test_size, data.seed)
        ledger.steps.append({"split": "train", "step": "split", "in": before, "dropped": {}, "kept": len(train)})
        ledger.steps.append({"split": "test", "step": "split", "in": before, "dropped": {}, "kept": len(test)})
        origin = f"{data.test_size} of {data.train} held out with seed {data.seed}"
    test = ledger.record("test", "overlap with train", len(test), *drop_overlap(test, train))
    info = {"train": {"source": data.train, "examples": len(train), "sha256": data_mod.fingerprint(train)},
            "test": {"source": origin, "examples": len(test), "sha256": data_mod.fingerprint(test)},
            "groups": {"train": len({e.group for e in train if e.group}),
                       "test": len({e.group for e in test if e.group}),
                       "on_both_sides": len({e.group for e in train if e.group} & {e.group for e in test if e.group})},
            "format": data.format, "template": data.template, "steps": ledger.steps}
    for side, source in (("train", data.train), ("test", test_source)):
        if data_mod.is_prepared(source):  # the prepared files' own fingerprints, as their data card shows them
            manifest = json.loads((Path(source).expanduser() / data_mod.PREPARED_FILE).read_text(encoding="utf-8"))
            info[side]["prepared"] = {"folder": source, **manifest["files"].get(f"{side}.jsonl", {})}
    # Lengths are measured before any split: with a split, they describe both sides together.
    lengths = {"train": train_lengths, "test": test_lengths} if test_source else {"all": train_lengths}
    return Prepared(train, test, ledger, lengths, info)


# ---------------------------------------------------------------------------------------- measures


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


# ---------------------------------------------------------------------------------------- writing


def canonical_record(example: Example) -> dict[str, Any]:
    """Alpaca-shaped, so the prepared file is readable by any tool; extra fields only when used."""
    record: dict[str, Any] = {"instruction": example.instruction, "input": example.input, "output": example.response}
    if example.history:
        record["history"] = [{"role": role, "content": content} for role, content in example.history]
    if example.reference:
        record["reference"] = example.reference
    if example.group:
        record["group"] = example.group
    record["origin"] = example.source
    return record


def write_jsonl(records: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise AffinerError(f"{output} already exists; pass another --output, or --overwrite to replace it "
                           "(the old folder is only removed once the new one is complete).")
    if output.exists() and not (output / data_mod.PREPARED_FILE).is_file():
        raise AffinerError(f"{output} exists and was not written by affiner prepare; --overwrite only replaces "
                           "prepared folders. Pass another --output.")


def write_prepared(prepared: Prepared, config: RunConfig, output: Path, overwrite: bool) -> Path:
    """Write everything into a fresh sibling folder, then move it into place: no half-written output."""
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        _write_into(staging, prepared, config)
        replace_folder(staging, output)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return output


def _write_into(folder: Path, prepared: Prepared, config: RunConfig) -> None:
    data = config.data
    write_jsonl([canonical_record(e) for e in prepared.train], folder / "train.jsonl")
    write_jsonl([canonical_record(e) for e in prepared.test], folder / "test.jsonl")
    write_jsonl([{**canonical_record(e), "reason": reason} for e, reason in prepared.ledger.dropped],
                folder / "dropped.jsonl")
    plot_lengths(prepared.lengths, data.max_length, folder / "lengths.png")
    files = {name: {"rows": rows, "sha256": data_mod.file_sha256(folder / name)}
             for name, rows in (("train.jsonl", len(prepared.train)), ("test.jsonl", len(prepared.test)))}
    manifest = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "tokenizer": config.model.base, "template": data.template, "max_length": data.max_length,
                "files": files, "steps": prepared.ledger.steps, "groups": prepared.info["groups"],
                "token_lengths": {side: percentiles(v) for side, v in prepared.lengths.items()},
                "over_max_length": {side: sum(n > data.max_length for n in v) for side, v in prepared.lengths.items()},
                "data": data.model_dump(mode="json")}
    (folder / data_mod.PREPARED_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")
    (folder / "config.yaml").write_text(dump_config(config), encoding="utf-8")
    (folder / "data_card.md").write_text(data_card(prepared, config, manifest), encoding="utf-8")


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
        lines += [f"- **Question:** {_quote(question)}", f"  **Answer:** {_quote(e.response)}"]
    lines += ["", "## Use it", "", "```bash", f"affiner train {config.name} --set data.train=<this folder> --set data.test=<this folder>",
              "affiner evaluate RUN --test <this folder>", "```", ""]
    return "\n".join(lines)


def _quote(text: str, width: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


# ---------------------------------------------------------------------------------------- command line


def prepare(config: RunConfig, output: Path, overwrite: bool = False, label: str = "CONFIG") -> Path:
    from affiner.models import load_tokenizer

    output = output.expanduser()
    check_output(output, overwrite)  # before minutes of work, not after
    tokenizer = load_tokenizer(config.model.base)
    template = build_template(config.data.template, tokenizer, config.data.system_prompt)
    prepared = build(config.data, tokenizer, template)
    folder = write_prepared(prepared, config, output, overwrite)
    print(prepared.ledger.summary())
    for side, values in prepared.lengths.items():
        if values:
            stats = percentiles(values)
            print(f"  {'train + test' if side == 'all' else side} tokens: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    print(f"wrote {folder}: train.jsonl ({len(prepared.train)} rows), test.jsonl ({len(prepared.test)} rows), "
          f"dropped.jsonl ({len(prepared.ledger.dropped)}), data_card.md, lengths.png")
    print(f"next: affiner train {label} --set data.train={folder} --set data.test={folder}")
    return folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config or recipe name whose data: section to prepare "
                                                  "(default: quickstart)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set data.max_length=1024 (repeatable)")
    parser.add_argument("--output", type=Path, help="folder to write (default: data/<config name>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier prepared folder")


def main(args: argparse.Namespace) -> None:
    config = load_config(args.config, args.overrides)
    prepare(config, args.output or Path("data") / config.name, args.overwrite, label=args.config or "quickstart")
