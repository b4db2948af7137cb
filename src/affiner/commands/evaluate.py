"""Before/after evaluation: the base model and every tuned model answer the same held-out questions.

    affiner evaluate runs/quickstart-20261122-183000
    affiner evaluate runs/a runs/b                        # several adapters of one base, side by side
    affiner evaluate --base gpt2 --adapter my-lora --test questions.jsonl --template alpaca --output eval-1
    affiner evaluate runs/a --test questions.jsonl --max-new-tokens 48
    affiner evaluate runs/a --temperature 0.7 --top-p 0.95 --top-k 50 --seed 1
    affiner evaluate runs/a --judge-url http://127.0.0.1:11434/v1 --judge-model gemma3:27b

All models see prompts rendered by the run's saved template and decode with the same settings;
they differ only by the adapter. Every score is computed here, per question, and aggregated with a
bootstrap interval. The run folder gets `summary.json`, `metrics.json`, `answers.csv`, `report.md`,
a self-contained `report.html` and plots; an earlier evaluation is moved to `evaluations/N/`.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="*", metavar="RUN", help="run folder(s) of one base model")
    parser.add_argument("--base", help="instead of runs: a base model (Hub id, folder, .gguf, embedded:...)")
    parser.add_argument("--adapter", action="append", default=[], metavar="DIR",
                        help="with --base: a LoRA adapter folder (plain peft format); repeatable")
    parser.add_argument("--template", default="alpaca", choices=["alpaca", "instruction", "qa", "chat"],
                        help="with --base: the prompt template the adapters were trained with")
    parser.add_argument("--output", help="with --base: the folder that receives the report")
    parser.add_argument("--test", help="held-out file to answer instead of the run's own test split")
    parser.add_argument("--max-new-tokens", type=int, help="answer length limit (default: eval.max_new_tokens)")
    parser.add_argument("--max-questions", type=int, help="answer only the first N questions")
    parser.add_argument("--batch-size", type=int, help="questions generated together (default: eval.batch_size)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    parser.add_argument("--judge-url", help="OpenAI-compatible endpoint of an LLM judge, e.g. http://127.0.0.1:11434/v1")
    parser.add_argument("--judge-model", help="model name the judge endpoint serves")
    parser.add_argument("--judge-key-env", help="environment variable holding the judge's API key")
    parser.add_argument("--judge-mode", choices=["absolute", "pairwise", "both"])


def main(args: argparse.Namespace) -> None:
    from affiner.core.config import JudgeConfig
    from affiner.core.errors import AffinerError
    from affiner.core.settings import Settings
    from affiner.evaluation.evaluate import evaluate
    from affiner.evaluation.plan import plan_adapters
    from affiner.evaluation.table import format_table

    sampling = Settings(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    judge = JudgeConfig(url=args.judge_url, model=args.judge_model, api_key_env=args.judge_key_env,
                        **({"mode": args.judge_mode} if args.judge_mode else {}))
    if bool(args.runs) == bool(args.base):
        raise AffinerError("give either run folders (affiner evaluate RUN ...) or --base MODEL with --adapter DIR.")
    plan = None
    if args.base:
        if not args.adapter:
            raise AffinerError("--base needs at least one --adapter DIR to compare with.")
        plan = plan_adapters(args.base, [Path(a) for a in args.adapter], args.test, args.template,
                             Path(args.output) if args.output else None, args.max_questions)
    evaluation = evaluate([Path(r) for r in args.runs], test=args.test, max_new_tokens=args.max_new_tokens,
                          max_questions=args.max_questions, batch_size=args.batch_size, sampling=sampling,
                          judge=judge if judge.url else None, plan=plan)
    print(format_table(evaluation))
    print(f"Report: {(plan.output if plan else Path(args.runs[0])) / 'report.html'}")
