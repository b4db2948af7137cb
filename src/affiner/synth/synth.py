"""A glossary's acronyms made into question/answer conversations for `affiner train`: the options, the
run (`generate`), the output files and the summary.

    options = Options(glossary=Path("glossary.csv"), output=Path("data/train.json"),
                      test_output=Path("data/test.json"))
    print(summary(generate(options), options))

The glossary is read by `glossary.read_glossary`; its languages are detected (`language`) unless
`Options.languages` names them; the conversations come from the phrasing banks (`offline`), or from a
model at an endpoint when `Options.llm` is set (`llm`). The output is the
nested glossary layout `train` reads: one record per acronym,
{acronym, ground_truth, languages, conversation: [[user, assistant], ...]}.
"""

from __future__ import annotations

import difflib
import shlex
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from affiner.core.errors import AffinerError
from affiner.core.yaml_input import set_argument
from affiner.core.hub import hub_reachable
from affiner.core.files import json_text, remove_leftovers, write_together
from affiner.synth.banks import LANGUAGES
from affiner.synth.glossary import COLUMN_KEYS, Glossary, read_glossary
from affiner.synth.language import LanguageChoice, detect_languages
from affiner.synth.llm import EndpointReport, LLMOptions, llm_pairs
from affiner.synth.offline import offline_capacity, offline_pairs
from affiner.synth.terms import Pairs

RECIPE = "llama-3.2-1b-instruct-glossary-lora"  # the next step when the Hub can be reached
OFFLINE_RECIPE = "quickstart"  # the embedded Gemma 3 270M and the qa template: nothing to download


@dataclass(frozen=True)
class Options:
    glossary: Path
    output: Path
    per_entry: int = 8
    languages: tuple[str, ...] | None = None  # None: detected from the glossary (`language.detect_languages`)
    seed: int = 0
    test_output: Path | None = None
    test_per_entry: int = 2
    columns: dict[str, str] = field(default_factory=dict)
    llm: LLMOptions | None = None  # None: the offline phrasings write the conversations
    overwrite: bool = False


@dataclass
class Result:
    glossary: Glossary
    languages: LanguageChoice  # the languages written, and why
    train: list[dict[str, Any]]  # records in the nested glossary layout
    test: list[dict[str, Any]]
    counts: dict[str, Counter]  # "train"/"test" -> conversations per language
    endpoint: EndpointReport | None = None  # with Options.llm: requests, cache hits, dropped conversations
    written: list[tuple[Path, int, int]] = field(default_factory=list)  # (file, records, conversations)


def generate(options: Options, say: Callable[[str], None] = print) -> Result:
    """Read the glossary, write the conversations, and the output file(s); raises AffinerError on bad input."""
    _check_options(options)
    _check_outputs(options)
    glossary = read_glossary(options.glossary, options.columns)
    choice = detect_languages(glossary.entries) if options.languages is None \
        else LanguageChoice(options.languages, "as --languages asked")
    languages = choice.languages
    held_out = options.test_per_entry if options.test_output else 0
    report = None
    if options.llm is None:
        train, test = offline_pairs(glossary.entries, languages, options.per_entry, held_out, options.seed)
    else:
        train, test, report = llm_pairs(glossary.entries, languages, options.per_entry, held_out, options.llm, say)
    result = Result(glossary, choice, _records(glossary, languages, train), _records(glossary, languages, test),
                    {"train": _per_language(train), "test": _per_language(test)}, report)
    files = [(options.output, result.train)] + ([(options.test_output, result.test)] if options.test_output else [])
    for path, records in files:
        if not records:
            raise AffinerError(f"no conversation for {path}: nothing was written.{_why_none(result, options)}")
    if not options.overwrite and (appeared := [str(path) for path, _ in files if path.exists()]):
        raise AffinerError(f"{', '.join(appeared)} appeared while synth ran (another command writing there?) and was "
                           "left untouched; nothing was written. Choose another file, or pass --overwrite.")
    _write_outputs(files)
    result.written = [(path, len(records), sum(len(r["conversation"]) for r in records)) for path, records in files]
    return result


def _why_none(result: Result, options: Options) -> str:
    """Why the held-out file got no conversation (training's are refused earlier, entry by entry): with an
    endpoint, each entry and language kept at most --per-entry usable ones, and those go to training first."""
    report = result.endpoint
    if report is None:
        return ""
    short = "; ".join(report.short[:5]) + (f" (and {len(report.short) - 5} more)" if len(report.short) > 5 else "")
    dropped = report.drops.describe()
    return (f" The endpoint's usable conversations all went to training: the first --per-entry {options.per_entry} "
            f"of each entry and language are trained on, the rest held out"
            + (f"; fewer than asked for: {short}" if short else "")
            + (f"; dropped: {dropped}" if dropped else "")
            + ". The good replies are cached: run the same command again with a higher --max-attempts (now "
              f"{options.llm.max_attempts}) to ask only for the missing ones, or lower --per-entry.")


def _check_options(options: Options) -> None:
    problems = []
    if options.per_entry < 1:
        problems.append(f"--per-entry must be at least 1 (got {options.per_entry})")
    if options.test_output is not None and options.test_per_entry < 1:
        problems.append(f"--test-per-entry must be at least 1 (got {options.test_per_entry})")
    unknown = [code for code in options.languages or () if code not in LANGUAGES]
    if unknown or options.languages == ():
        problems.append(f"--languages has unknown language code(s) {', '.join(map(repr, unknown)) or '(none)'}; "
                        f"supported: {', '.join(LANGUAGES)}")
    if options.llm is not None:
        problems += _llm_problems(options.llm)
    if problems:
        raise AffinerError(f"affiner synth cannot run: {'; '.join(problems)}.")
    if options.llm is None:
        for count, held, flag in ((options.per_entry, False, "--per-entry"),
                                  (options.test_per_entry if options.test_output else 0, True, "--test-per-entry")):
            if count > offline_capacity(held):
                raise AffinerError(f"{flag} {count} is more than the offline phrasings can give without repeating "
                                   f"a question: the maximum is {offline_capacity(held)} per entry and language. "
                                   f"Lower {flag}, or let a model write the conversations with --endpoint.")


def _llm_problems(llm: LLMOptions) -> list[str]:
    problems = []
    if llm.endpoint.concurrency < 1:
        problems.append(f"--concurrency must be at least 1 (got {llm.endpoint.concurrency})")
    if llm.max_attempts < 1:
        problems.append(f"--max-attempts must be at least 1 (got {llm.max_attempts})")
    if llm.temperature < 0:
        problems.append(f"--temperature must be 0 or more (got {llm.temperature:g})")
    return problems


def _check_outputs(options: Options) -> None:
    paths = [options.output] + ([options.test_output] if options.test_output else [])
    if options.test_output and options.output.resolve() == options.test_output.resolve():
        raise AffinerError(f"--output and --test-output are the same file ({options.output}); the held-out "
                           "conversations need a file of their own.")
    for path in paths:
        if path.resolve() == options.glossary.resolve():
            raise AffinerError(f"the output {path} is the glossary itself; write the conversations elsewhere.")
        if path.is_dir():
            raise AffinerError(f"the output {path} is a folder; name a file, e.g. {path / 'glossary-train.json'}.")
        if path.suffix.lower() not in OUTPUT_SUFFIXES:
            raise AffinerError(f"the output {path} must be a .json or .jsonl file: prepare and train read the "
                               f"conversations by the file's suffix (e.g. {path.with_suffix('.json')}).")
        if path.exists() and not options.overwrite:
            raise AffinerError(f"{path} already exists and was left untouched; pass --overwrite to replace it, or "
                               "choose another file.")
        cleaned = remove_leftovers(path.parent, named=path.name)  # a killed earlier run's temporary file
        if cleaned:
            print(f"note: removed what an interrupted affiner left beside {path}: {', '.join(cleaned)}")


def _per_language(pairs: Pairs) -> Counter:
    counts: Counter = Counter()
    for (_, language), conversations in pairs.items():
        counts[language] += len(conversations)
    return counts


def _records(glossary: Glossary, languages: tuple[str, ...], conversations: Pairs) -> list[dict[str, Any]]:
    """One record per acronym (per localized acronym, for SKOS labels that differ by language)."""
    records: dict[tuple[int, str, str], dict[str, Any]] = {}
    for index, entry in enumerate(glossary.entries):
        for language in languages:
            found = conversations.get((index, language), [])
            if not found:
                continue
            term = entry.in_language(language)
            record = records.setdefault((index, term.acronym, term.definition), {
                "acronym": term.acronym, "ground_truth": term.definition, "languages": [], "conversation": []})
            record["languages"].append(language)
            record["conversation"] += found
    return list(records.values())


OUTPUT_SUFFIXES = (".json", ".jsonl")


def _text_of(path: Path, records: list[dict[str, Any]]) -> str:
    """A JSON list of the records, or for a .jsonl file one record per line: what its suffix tells readers."""
    if path.suffix.lower() == ".jsonl":
        return "".join(json_text(record, indent=None) for record in records)  # each ends its line
    return json_text(records, indent=1)


def _write_outputs(files: list[tuple[Path, list[dict[str, Any]]]]) -> None:
    """Every file written, or none: a failure leaves the earlier files as they were."""
    try:
        for path, _ in files:
            path.parent.mkdir(parents=True, exist_ok=True)
        write_together({path: _text_of(path, records) for path, records in files})
    except OSError as error:
        raise AffinerError(f"cannot write {error.filename or 'the output'}: {error.strerror or error}.") from None


# ---------------------------------------------------------------------------------------- summary


def summary(result: Result, options: Options) -> str:
    glossary = result.glossary
    drops = glossary.drops
    lines = [f"{options.glossary}: read {glossary.read} entries, kept {len(glossary.entries)}"
             + (f", dropped {drops.total}: {drops.describe()}" if drops.total else "")]
    lines.append(f"languages: {', '.join(result.languages.languages)} ({result.languages.reason})")
    per_language = []
    for language in result.languages.languages:
        text = f"{language} {result.counts['train'][language]} train"
        if options.test_output:
            text += f" + {result.counts['test'][language]} held-out"
        per_language.append(text)
    lines.append(f"conversations: {', '.join(per_language)}")
    if options.llm is not None and result.endpoint is not None:
        lines += _endpoint_lines(result.endpoint, options.llm)
    for path, records, conversations in result.written:
        lines.append(f"wrote {path} ({records} records, {conversations} conversations)")
    lines.append(next_step(options, len(glossary.entries)))
    return "\n".join(lines)


def next_step(options: Options, entries: int) -> str:
    """The `affiner train` line that learns the output, with the recipe this machine can run and why, as a
    shell comment so that the line still pastes as it is."""
    if hub_reachable():
        recipe, why = RECIPE, "Llama 3.2 1B Instruct from the Hub (gated: accept its licence, set HF_TOKEN)"
    else:
        recipe, why = OFFLINE_RECIPE, "the Hub is unreachable: the embedded Gemma 3 270M, nothing to download"
    # The recipe's own test file holds other acronyms: without a held-out file of ours, hold out part of ours.
    if not options.test_output and entries < 2:  # a held-out split of one entry leaves nothing to train on
        return (f"next: affiner synth {shlex.quote(str(options.glossary))} --output {shlex.quote(str(options.output))} "
                "--test-output held-out.json --overwrite  # one entry: held-out questions about it need a file of "
                "their own, then train on both")
    test = set_argument("data.test", str(options.test_output)) if options.test_output else "--set data.test=null"
    return f"next: affiner train {recipe} {set_argument('data.train', str(options.output))} {test}  # {why}"


def _endpoint_lines(report: EndpointReport, llm: LLMOptions) -> list[str]:
    line = (f"endpoint {llm.endpoint.url} ({llm.endpoint.model}): {report.requests_sent} requests sent, "
            f"{report.cache_hits} replies from the cache")
    if report.drops.total:
        line += f"; dropped {report.drops.total} conversations: {report.drops.describe()}"
    lines = [line]
    if report.short:
        lines.append(f"fewer conversations than asked for: {', '.join(report.short[:10])}"
                     + (", ..." if len(report.short) > 10 else "") + " (rerun with a higher --max-attempts to ask "
                                                                     "for more)")
    return lines


# ---------------------------------------------------------------------------------------- parsing arguments


def parse_columns(text: str | None) -> dict[str, str]:
    """--columns "acronym=term,definition=meaning" as {"acronym": "term", "definition": "meaning"}."""
    if not text:
        return {}
    columns = {}
    for item in text.split(","):
        key, sep, name = (part.strip() for part in item.partition("="))
        if not sep or not key or not name:
            raise AffinerError(f"--columns {text!r}: each item must look like key=name, for example "
                               "--columns acronym=term,definition=meaning.")
        if key not in COLUMN_KEYS:
            close = difflib.get_close_matches(key, COLUMN_KEYS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise AffinerError(f"--columns: unknown key '{key}' (known keys: {', '.join(COLUMN_KEYS)}).{hint}")
        columns[key] = name
    return columns


def parse_languages(text: str) -> tuple[str, ...] | None:
    """--languages "en,FR" as ("en", "fr"), "auto" as None (detected from the glossary); refuses codes without
    phrasing banks."""
    if text.strip().lower() == "auto":
        return None
    codes = tuple(dict.fromkeys(code.strip().lower() for code in text.split(",") if code.strip()))
    unknown = [code for code in codes if code not in LANGUAGES]
    if unknown or not codes:
        raise AffinerError(f"--languages {text!r}: unknown language code(s) {', '.join(unknown) or '(none given)'}; "
                           f"supported: {', '.join(LANGUAGES)} (e.g. --languages en,fr), or auto.")
    return codes
