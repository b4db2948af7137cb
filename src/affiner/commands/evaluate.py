"""Before/after evaluation: the base model and every tuned model answer the same held-out questions.

    affiner evaluate runs/quickstart-20261122-183000
    affiner evaluate runs/a runs/b                        # several adapters of one base, side by side
    affiner evaluate --model gpt2 --adapter my-lora --test questions.jsonl --template alpaca --output eval-1
    affiner evaluate runs/a --test questions.jsonl --max-new-tokens 48
    affiner evaluate runs/a --temperature 0.7 --top-p 0.95 --top-k 50 --seed 1
    affiner evaluate runs/a --judge-endpoint http://127.0.0.1:11434/v1 --judge-model gemma3:27b
    affiner evaluate runs/a --judge-endpoint https://api.openai.com/v1 --judge-model gpt-4o-mini \\
        --judge-api-key-env OPENAI_API_KEY

All models see prompts rendered by the run's saved template and decode with the same settings;
they differ only by the adapter. Every score is computed here, per question, and aggregated with a
bootstrap interval. The run folder gets `summary.json`, `metrics.json`, `answers.csv`, `report.md`,
a self-contained `report.html` and plots; an earlier evaluation is moved to `evaluations/N/`.
Several runs evaluated together: each run folder gets its own evaluation (base against that run), and
the side-by-side comparison goes to the first run's `comparison/` folder.

With --test FILE, questions the run trained on (word for word, or up to case, spacing and punctuation)
are left out of the scores and listed in the report (--keep-overlap keeps them). With --key-before SEP
(or eval.key_before, or a `key` field per row), "contains the key" is scored beside "contains the
reference" and becomes the headline: an answer with the right key and a reworded rest is right.

Exit code 3 when the judge could not judge some answers (endpoint down, unreadable replies): everything
is written, the report says how many and why, and running the same command again asks only for the
missing verdicts (the others come from the judge's cache).
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from affiner.commands.arguments import (add_renamed, non_negative_int, positive_int, probability, repetition_penalty,
                                        seed, temperature)
from affiner.core.config import HEADLINES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="*", metavar="RUN", help="run folder(s) of one base model")
    add_renamed(parser, "--model", "--base", metavar="MODEL",
                help="instead of runs: a base model (Hub id, folder, .gguf, embedded:gemma-3-270m) with --adapter")
    parser.add_argument("--adapter", action="append", default=[], metavar="DIR",
                        help="with --model: a LoRA adapter folder (plain peft format); repeatable")
    parser.add_argument("--template", choices=["alpaca", "instruction", "qa", "chat"],
                        help="with --model: the prompt template the adapters were trained with (default: the "
                             "template.json saved beside them, as affiner's exports have, else alpaca)")
    parser.add_argument("--output", metavar="DIR", help="with --model: the folder that receives the report")
    parser.add_argument("--test", metavar="FILE", help="held-out file to answer instead of the run's own test split")
    parser.add_argument("--keep-overlap", action="store_true",
                        help="with --test: also score the questions the run trained on (by default they are left "
                             "out of the scores, counted and listed in the report: they measure memory)")
    parser.add_argument("--key-before", metavar="SEP",
                        help="score 'contains the key' too, the key of a reference being its text before SEP (e.g. "
                             "':' for 'Expansion: a description'); it becomes the headline (default: eval.key_before; "
                             "a row's own `key` field wins)")
    parser.add_argument("--headline", choices=HEADLINES,
                        help="the figure the report, the table's example and `affiner runs` lead with, and that "
                             "ranks the largest wins (default: eval.headline, or auto: contains_key when rows have "
                             "keys, else contains); open-ended answers read better by rouge_l, chrf or embedding")
    parser.add_argument("--general", action=argparse.BooleanOptionalAction, default=None,
                        help="also answer affiner's general set, the no-harm check (default: eval.general; "
                             "--no-general saves 80 answers and losses per model)")
    parser.add_argument("--no-base-cache", dest="base_cache", action="store_false",
                        help="answer with the base again even if an earlier evaluation with the same base weights, "
                             "questions, template and decoding kept its answers and losses")
    parser.add_argument("--max-new-tokens", type=positive_int, metavar="N",
                        help="answer length limit (default: eval.max_new_tokens)")
    parser.add_argument("--max-questions", type=positive_int, metavar="N", help="answer only the first N questions")
    parser.add_argument("--batch-size", type=positive_int, metavar="N",
                        help="questions generated together (default: eval.batch_size)")
    _add_decoding_arguments(parser)
    _add_judge_arguments(parser)
    _add_benchmark_arguments(parser)


def _add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=temperature, default=0.0, metavar="T",
                        help="sampling temperature; 0 (default) decodes greedily")
    parser.add_argument("--top-p", type=probability, default=1.0, metavar="P",
                        help="nucleus sampling, above 0 and at most 1 (default 1: off)")
    parser.add_argument("--top-k", type=non_negative_int, default=0, metavar="K",
                        help="sample among the K likeliest tokens; 0 (default) keeps every token")
    parser.add_argument("--seed", type=seed, default=0, metavar="N",
                        help="seed of the sampling (default 0)")
    parser.add_argument("--repetition-penalty", type=repetition_penalty, metavar="R",
                        help="above 1, tokens the answer already holds are made less likely, for base and "
                             "tuned alike: a looping model stops looping (default: eval.repetition_penalty; 1: off)")


def _add_judge_arguments(parser: argparse.ArgumentParser) -> None:
    judge = parser.add_argument_group("an LLM judge (any OpenAI-compatible server; default: the run's eval.judge)")
    add_renamed(judge, "--judge-endpoint", "--judge-url", metavar="URL",
                help="base URL of the judge's endpoint, e.g. http://127.0.0.1:11434/v1 (Ollama)")
    judge.add_argument("--judge-model", metavar="NAME", help="model name the judge endpoint serves, e.g. gemma3:27b")
    add_renamed(judge, "--judge-api-key-env", "--judge-key-env", metavar="VAR",
                help="environment variable holding the judge's API key")
    judge.add_argument("--judge-mode", choices=["absolute", "pairwise", "both"],
                       help="absolute grades each answer against the reference, pairwise asks which of base and "
                            "tuned is better, both (default) does both")


def _add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    bench = parser.add_argument_group(
        "standard benchmarks through EleutherAI's lm-evaluation-harness (pip install 'affiner[benchmarks]')")
    bench.add_argument("--benchmarks", metavar="TASKS",
                       help="lm-eval tasks separated by commas, e.g. arc_easy,hellaswag: each runs on the base and on "
                            "every tuned model, and the report pairs their scores with standard errors")
    bench.add_argument("--benchmarks-include", metavar="DIR",
                       help="a folder of your own lm-eval task YAML files (a relative data_files path in them is read "
                            "from the working folder; an absolute one works from anywhere)")
    bench.add_argument("--benchmarks-limit", type=positive_int, metavar="N",
                       help="at most N items per task: a quick check, not the published benchmark")


def main(args: argparse.Namespace) -> None:
    from affiner.core.errors import AffinerError
    from affiner.core.settings import Settings
    from affiner.evaluation.evaluate import evaluate, require_judged
    from affiner.evaluation.plan import plan_adapters
    from affiner.evaluation.table import format_table

    sampling = Settings(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    judge = {key: value for key, value in (("url", args.judge_endpoint), ("model", args.judge_model),
                                           ("api_key_env", args.judge_api_key_env), ("mode", args.judge_mode))
             if value is not None}  # each over the run's own eval.judge
    if bool(args.runs) == bool(args.model):
        raise AffinerError("give either run folders (affiner evaluate RUN ...) or --model MODEL with --adapter DIR.")
    unused = [flag for flag, value in (("--adapter", args.adapter), ("--output", args.output),
                                       ("--template", args.template)) if value and args.runs]
    unused += [flag for flag, value in (("--benchmarks-include", args.benchmarks_include),
                                        ("--benchmarks-limit", args.benchmarks_limit)) if value and args.benchmarks is None]
    if unused:
        raise AffinerError(f"{', '.join(unused)} would be ignored here: --adapter, --output and --template go with "
                           "--model (a run folder brings its adapter and template, and its evaluation goes into it), "
                           "--benchmarks-include and --benchmarks-limit with --benchmarks TASKS.")
    plan = None
    if args.model:
        if not args.adapter:
            raise AffinerError("--model needs at least one --adapter DIR to compare with.")
        plan = plan_adapters(args.model, [Path(a) for a in args.adapter], args.test, args.template,
                             Path(args.output) if args.output else None, args.max_questions,
                             key_before=args.key_before)
    evaluation = evaluate([Path(r) for r in args.runs], test=args.test, max_new_tokens=args.max_new_tokens,
                          max_questions=args.max_questions, batch_size=args.batch_size, sampling=sampling,
                          judge=judge, plan=plan, benchmarks=_benchmarks(args),
                          keep_overlap=args.keep_overlap, key_before=args.key_before, general=args.general,
                          reuse_base=args.base_cache, repetition_penalty=args.repetition_penalty,
                          headline=args.headline)
    report = Path(evaluation["report"])
    print(format_table(evaluation))
    print(f"Report: {report}")
    if len(args.runs) > 1:
        print(f"Each run's own evaluation (base against it): {', '.join(str(Path(r) / report.name) for r in args.runs)}")
    require_judged(evaluation, report, rerun_command(args))


def _benchmarks(args: argparse.Namespace):
    from affiner.evaluation.benchmarks import Benchmarks

    if args.benchmarks is None:
        return None  # an empty --benchmarks "" is refused by name, not taken for none
    return Benchmarks([t.strip() for t in args.benchmarks.split(",") if t.strip()],
                      Path(args.benchmarks_include) if args.benchmarks_include else None, args.benchmarks_limit)


def rerun_command(args: argparse.Namespace) -> str:
    """This evaluation as a command line: what to run again once the judge endpoint works."""
    words = ["affiner", "evaluate", *args.runs, *(["--keep-overlap"] if args.keep_overlap else [])]
    if args.model:
        words += ["--model", args.model, *(w for a in args.adapter for w in ("--adapter", a)),
                  *(["--template", args.template] if args.template else [])]
    # Decoding flags too: the same answers find their verdicts in the judge's cache.
    defaults = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 0}
    if not args.base_cache:
        words.append("--no-base-cache")
    if args.general is not None:
        words.append("--general" if args.general else "--no-general")
    for name in ("output", "test", "key_before", "headline", "max_new_tokens", "max_questions", "batch_size",
                 "repetition_penalty", *defaults,
                 "judge_endpoint", "judge_model", "judge_api_key_env", "judge_mode", "benchmarks",
                 "benchmarks_include", "benchmarks_limit"):
        value = getattr(args, name)
        if value is not None and value != defaults.get(name):
            words += [f"--{name.replace('_', '-')}", str(value)]
    return shlex.join(words)
