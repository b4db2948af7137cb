"""Write question/answer conversations about a glossary's acronyms, in its own language, ready for `affiner train`.

    affiner synth glossary.csv --output data/glossary-train.json --test-output data/glossary-test.json
    affiner synth glossary.json --output data/train.json --per-entry 12 --languages en --seed 3
    affiner synth terms.csv --columns acronym=term,definition=meaning --output data/train.json
    affiner synth thesaurus.rdf --output data/train.json      # SKOS: prefLabel, altLabel, definition

    # an LLM writes the conversations, here a local Ollama server:
    affiner synth glossary.csv --output data/glossary-train.json --test-output data/glossary-test.json \\
        --endpoint http://127.0.0.1:11434/v1 --model gemma3:27b
    # or OpenAI, the key read from an environment variable:
    affiner synth glossary.csv --output data/glossary-train.json --endpoint https://api.openai.com/v1 \\
        --model gpt-4o-mini --api-key-env OPENAI_API_KEY

    affiner train llama-3.2-1b-instruct-glossary-lora --set data.train=data/glossary-train.json \\
        --set data.test=data/glossary-test.json
    # without the Hub: the embedded Gemma 3 270M (the summary's last line names the one that fits)
    affiner train quickstart --set data.train=data/glossary-train.json --set data.test=data/glossary-test.json

`affiner generate`, the former name of this verb, still works.

The glossary is a JSON list (or {"data": [...]}), JSONL or CSV of `acronym` and `definition`
(other names with --columns), or SKOS RDF/XML: a concept's shorter label is the acronym, its longer
label the definition, and skos:definition a description; with a single label, skos:definition is the
definition. Entries without an acronym or definition, and exact duplicates, are dropped and counted;
one acronym with two definitions is an error.

The conversations are in the glossary's own language (--languages auto, the default): English or
French, or both when at least a fifth of the entries read as each. An entry's language is its SKOS
xml:lang tags, else a count of English and French function words (the, of, and... / de, la, et...)
and French accents in its definition and description; a glossary of names and acronyms alone gives
English. The summary says what was chosen and why; --languages en, fr or en,fr chooses.

Offline (the default), conversations come from phrasing templates, reproducible with --seed; the
held-out file (--test-output) uses question phrasings never used for training. With --endpoint, any
OpenAI-compatible server writes them; every reply is checked (JSON, roles, the definition word for
word in every answer), retried and de-duplicated, and cached in `$AFFINER_CACHE/generate`, so an
interrupted run resumes where it stopped. The output is the nested glossary layout `train` reads:
one record per acronym, {acronym, ground_truth, languages, conversation: [[user, assistant], ...]}.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from affiner.commands.arguments import non_negative_float, non_negative_int, positive_int

if TYPE_CHECKING:
    from affiner.synth.llm import LLMOptions
    from affiner.synth.synth import Options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("glossary", help="JSON, JSONL or CSV of acronym and definition, or SKOS RDF/XML")
    parser.add_argument("--output", required=True, metavar="FILE", help="training conversations (JSON)")
    parser.add_argument("--per-entry", type=positive_int, default=8, metavar="N",
                        help="training conversations per entry and language (default 8)")
    parser.add_argument("--languages", default="auto", metavar="CODES",
                        help="comma-separated: en, fr; or auto, the glossary's own language(s), detected from its "
                             "definitions and SKOS xml:lang tags (default auto)")
    parser.add_argument("--seed", type=non_negative_int, default=0, metavar="N", help="offline phrasing choice (default 0)")
    parser.add_argument("--test-output", metavar="FILE", help="held-out conversations, with unseen questions")
    parser.add_argument("--test-per-entry", type=positive_int, metavar="K",
                        help="held-out conversations per entry and language (default 2)")
    parser.add_argument("--columns", metavar="KEY=NAME,...",
                        help="the glossary's names for acronym, definition and description, e.g. "
                             "acronym=term,definition=meaning")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    group = parser.add_argument_group("writing with a model (any OpenAI-compatible server)")
    group.add_argument("--endpoint", metavar="URL", help="base URL, e.g. http://127.0.0.1:11434/v1 (Ollama)")
    group.add_argument("--model", help="model name the endpoint serves, e.g. gemma3:27b")
    group.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the API key")
    group.add_argument("--temperature", type=non_negative_float, default=0.7, metavar="T", help="sampling temperature (default 0.7)")
    group.add_argument("--concurrency", type=positive_int, default=4, metavar="N", help="requests in flight at once (default 4)")
    group.add_argument("--max-attempts", type=positive_int, default=3, metavar="N",
                       help="requests per entry and language when replies fall short (default 3)")
    group.add_argument("--timeout", type=non_negative_float, default=300.0, metavar="SECONDS", help="seconds per request (default 300)")


def main(args: argparse.Namespace) -> None:
    from affiner.synth.synth import generate, summary

    options = _options(args)
    print(summary(generate(options), options))


def _options(args: argparse.Namespace) -> Options:
    from affiner.core.errors import AffinerError
    from affiner.synth.synth import Options, parse_columns, parse_languages

    llm = _llm_options(args)
    if args.test_per_entry is not None and not args.test_output:
        raise AffinerError("--test-per-entry needs --test-output FILE, the file that receives the held-out "
                           "conversations.")
    return Options(glossary=Path(args.glossary).expanduser(), output=Path(args.output).expanduser(),
                   per_entry=args.per_entry, languages=parse_languages(args.languages), seed=args.seed,
                   test_output=Path(args.test_output).expanduser() if args.test_output else None,
                   test_per_entry=2 if args.test_per_entry is None else args.test_per_entry,
                   columns=parse_columns(args.columns), llm=llm, overwrite=args.overwrite)


def _llm_options(args: argparse.Namespace) -> LLMOptions | None:
    from affiner.core.errors import AffinerError
    from affiner.synth.llm import LLMOptions, endpoint_settings

    if not args.endpoint:
        if args.model or args.api_key_env:
            raise AffinerError("--model and --api-key-env only apply with --endpoint URL; without it, conversations "
                               "come from the offline phrasings.")
        return None
    if not args.model:
        raise AffinerError("--endpoint needs --model NAME: the name the server knows the model by, for "
                           "example --model gemma3:27b for Ollama.")
    endpoint = endpoint_settings(args.endpoint, args.model, api_key_env=args.api_key_env, timeout=args.timeout,
                                 concurrency=args.concurrency)
    return LLMOptions(endpoint, temperature=args.temperature, max_attempts=args.max_attempts)
