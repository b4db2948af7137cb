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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from affiner import data as data_mod
from affiner import metrics
from affiner.config import JudgeConfig, RunConfig
from affiner.engine import Settings
from affiner.errors import AffinerError
from affiner.models import device, load_model, load_tokenizer
from affiner.runs import RUN_FILE, SUMMARY_FILE, load_run_config, read_json, require_run, write_json
from affiner.templates import Example, Template, encode_prompt, load_template

REPORT_FILES = ("summary.json", "metrics.json", "answers.csv", "report.md", "report.html", "metrics.png", "lengths.png")
TEXT_METRICS = ("contains", "exact_match", "rouge_l", "bleu", "chrf", "embedding", "stopped", "tokens",
                "repetition", "empty", "echo")


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


# ---------------------------------------------------------------------------------------- generation


GREEDY = Settings(temperature=0.0)


@dataclass(frozen=True)
class Answer:
    text: str
    stopped: bool  # ended with a stop token before the limit
    tokens: int


@torch.no_grad()
def generate(model, tokenizer, template: Template, examples: list[Example], max_new_tokens: int,
             batch_size: int = 16, sampling: Settings = GREEDY, desc: str = "generating") -> list[Answer]:
    """Answers generated in left-padded batches of similar lengths, returned in the examples' order.

    Greedy batches give exactly the answers of one-by-one generation (tested): padding is masked
    and every stop token of the template ends a row.
    """
    prompts = [encode_prompt(template, tokenizer, e) for e in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    stop_ids = list(template.stop_token_ids) or [tokenizer.eos_token_id]
    if not sampling.greedy:
        torch.manual_seed(sampling.seed or 0)
    answers: dict[int, Answer] = {}
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        chunk = order[start:start + batch_size]
        input_ids, attention = left_pad([prompts[i] for i in chunk], tokenizer.pad_token_id)
        output = model.generate(input_ids=input_ids.to(device()), attention_mask=attention.to(device()),
                                max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                                pad_token_id=tokenizer.pad_token_id, **sampling.generate_kwargs())
        for row, index in enumerate(chunk):
            answers[index] = decode(output[row, input_ids.shape[1]:].tolist(), stop_ids, tokenizer)
    return [answers[i] for i in range(len(examples))]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row)
        attention[i, width - len(row):] = 1
    return input_ids, attention


def decode(new_ids: list[int], stop_ids: list[int], tokenizer) -> Answer:
    cut = next((i for i, token in enumerate(new_ids) if token in stop_ids), None)
    kept = new_ids if cut is None else new_ids[:cut]
    text = tokenizer.decode(kept, skip_special_tokens=True).strip()
    return Answer(text=text, stopped=cut is not None, tokens=len(kept))


# ---------------------------------------------------------------------------------------- held-out loss


@torch.no_grad()
def held_out_losses(model, tokenizer, template: Template, examples: list[Example],
                    batch_size: int = 16) -> tuple[list[float], list[int]]:
    """Summed loss and token count of each example's reference answer (with its EOS), teacher-forced."""
    from affiner.train import token_losses

    features = data_mod.tokenize(examples, template, tokenizer, max_length=10**9)
    if len(features) != len(examples):  # empty references cannot be scored
        return [], []
    sums, counts = [], []
    for start in range(0, len(features), batch_size):
        batch = {k: v.to(device()) for k, v in
                 data_mod.collate(features[start:start + batch_size], tokenizer.pad_token_id).items()}
        losses, rows = token_losses(model, batch)
        n_rows = batch["input_ids"].shape[0]
        sums += torch.zeros(n_rows, device=losses.device).index_add_(0, rows, losses).tolist()
        counts += torch.bincount(rows, minlength=n_rows).tolist()
    return sums, counts


# ---------------------------------------------------------------------------------------- scoring


def score_answers(examples: list[Example], answers: list[Answer]) -> list[dict[str, float]]:
    scores = [metrics.per_example_scores(e.instruction, e.expected, a.text) | {"stopped": float(a.stopped),
                                                                              "tokens": float(a.tokens)}
              for e, a in zip(examples, answers)]
    for row, similarity in zip(scores, metrics.embedding_similarity([a.text for a in answers],
                                                                    [e.expected for e in examples])):
        row["embedding"] = similarity
    return scores


def headline(scores: list[dict[str, float]]) -> dict:
    """The two figures of the quickstart, as counts and rates."""
    n = len(scores)
    correct = int(sum(s["contains"] for s in scores))
    stopped = int(sum(s["stopped"] for s in scores))
    return {"questions": n, "correct": correct, "accuracy": correct / n if n else 0.0, "stopped": stopped,
            "stop_rate": stopped / n if n else 0.0,
            "mean_answer_tokens": sum(s["tokens"] for s in scores) / n if n else 0.0}


def training_probe(template: Template, tokenizer, examples: list[Example], max_new_tokens: int, batch_size: int):
    """Score a fixed held-out sample during training, so the log shows when the model learned."""

    def probe(model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        answers = generate(model, tokenizer, template, examples, max_new_tokens, batch_size, desc="held-out sample")
        sums, counts = held_out_losses(model, tokenizer, template, examples, batch_size)
        model.train(was_training)
        n = len(examples)
        result = {"eval_contains": sum(metrics.contains_reference(a.text, e.expected) for a, e in zip(answers, examples)) / n,
                  "eval_stop_rate": sum(a.stopped for a in answers) / n,
                  "eval_rouge_l": sum(metrics.rouge_l(a.text, e.expected) for a, e in zip(answers, examples)) / n}
        if counts:
            result["eval_loss"] = sum(sums) / max(sum(counts), 1)
        return {k: round(v, 5) for k, v in result.items()}

    return probe


# ---------------------------------------------------------------------------------------- the command


def held_out(folder: Path, test: str | None, config: RunConfig) -> list[Example]:
    if test:
        return data_mod.to_examples(data_mod.read_test_rows(test), config.data.format, config.data.columns)
    path = folder / "test_examples.json"
    if not path.is_file():
        raise AffinerError(f"{folder} has no held-out examples; pass --test FILE.")
    return [Example(**{**row, "history": tuple(tuple(t) for t in row["history"])}) for row in read_json(path)]


def tuned_model(folder: Path, config: RunConfig):
    """The run's model for generation; LoRA weights merged into the base (faster) unless it is 4-bit."""
    if config.method == "full":
        return load_model(str(folder))
    model = load_model(config.model.base, adapter=folder, quantization=config.quantization,
                       precision=config.model.precision, double_quant=config.model.double_quant)
    return _merged(model, config.quantization)


def base_model(config: RunConfig):
    return load_model(config.model.base, quantization=config.quantization, precision=config.model.precision,
                      double_quant=config.model.double_quant)


def _check_runs(folders: list[Path]) -> list[tuple[Path, RunConfig]]:
    runs = []
    for folder in folders:
        folder = require_run(folder)
        status = read_json(folder / "run.json").get("status")
        if status != "finished":
            raise AffinerError(f"{folder} has not finished training (status: {status}); "
                               f"resume it with: affiner train --resume {folder}")
        runs.append((folder, load_run_config(folder)))
    first = runs[0][1]
    for folder, config in runs[1:]:
        if (config.model.base, config.method == "qlora", config.data.template) != \
                (first.model.base, first.method == "qlora", first.data.template):
            raise AffinerError(f"{folder} does not share the base model, quantisation and template of {runs[0][0]}; "
                               "only runs of one base can be compared on the same prompts.")
    return runs


@dataclass
class Plan:
    """What to evaluate: which models, on which questions, with which prompt template, written where."""

    output: Path
    template: Template
    tokenizer: object
    examples: list[Example]
    loaders: dict  # model name -> function loading it; "base" first
    max_new_tokens: int
    batch_size: int
    test: str
    judge: JudgeConfig | None


def plan_runs(folders: list[Path], test: str | None, max_questions: int | None) -> Plan:
    runs = _check_runs(folders)
    folder, config = runs[0]
    loaders = {"base": lambda: base_model(config)}
    for run_folder, run_config in runs:
        name = "tuned" if len(runs) == 1 else run_folder.name
        loaders[name] = lambda f=run_folder, c=run_config: tuned_model(f, c)
    return Plan(output=folder, template=load_template(folder), tokenizer=load_tokenizer(str(folder)),
                examples=held_out(folder, test, config)[: max_questions or config.eval.max_questions],
                loaders=loaders, max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size,
                test=test or (config.data.test or "held-out split of the run"),
                judge=config.eval.judge if config.eval.judge.url else None)


def plan_adapters(base: str, adapters: list[Path], test: str | None, template_name: str, output: Path | None,
                  max_questions: int | None, quantization: str | None = None) -> Plan:
    """A base model and LoRA adapters trained anywhere (plain peft folders), on a test file."""
    from affiner.templates import build_template

    if not test or output is None:
        raise AffinerError("evaluating --adapter folders needs --test FILE (the held-out questions) and "
                           "--output DIR (where the report goes).")
    if output.exists() and any(output.iterdir()) and not (output / SUMMARY_FILE).exists():
        raise AffinerError(f"--output {output} is a folder with other files in it; choose a new or empty folder.")
    tokenizer = load_tokenizer(base)
    names = [a.name for a in adapters]
    if len(set(names)) != len(names) or "base" in names:
        raise AffinerError("adapter folders must have distinct names, none called 'base': they name the columns.")
    loaders = {"base": lambda: load_model(base, quantization=quantization)}
    for adapter in adapters:
        loaders[adapter.name] = lambda a=adapter: _merged(load_model(base, adapter=a, quantization=quantization),
                                                         quantization)
    examples = data_mod.to_examples(data_mod.read_test_rows(test))[:max_questions]
    output.mkdir(parents=True, exist_ok=True)
    return Plan(output=output, template=build_template(template_name, tokenizer), tokenizer=tokenizer,
                examples=examples, loaders=loaders, max_new_tokens=64, batch_size=16, test=test, judge=None)


def _merged(model, quantization: str | None):
    return model if quantization else model.merge_and_unload()


def evaluate(folders: Path | list[Path] | None = None, test: str | None = None, max_new_tokens: int | None = None,
             max_questions: int | None = None, batch_size: int | None = None, sampling: Settings = GREEDY,
             judge: JudgeConfig | None = None, plan: Plan | None = None) -> dict:
    """Evaluate the runs in `folders` (or a prepared `plan`) and write the report next to the first run."""
    if plan is None:
        plan = plan_runs(folders if isinstance(folders, list) else [folders], test, max_questions)
    judge = judge or plan.judge
    judge_client = _judge_client(judge) if judge else None  # fail on a bad judge setting before hours of generation
    if not plan.examples:
        raise AffinerError(f"no held-out question to answer ({plan.test}).")
    limit = max_new_tokens or plan.max_new_tokens
    size = batch_size or plan.batch_size
    examples, tokenizer, template = plan.examples, plan.tokenizer, plan.template
    answers, losses, seconds = {}, {}, {}
    for name, load in plan.loaders.items():
        model = load()
        started = time.time()
        answers[name] = generate(model, tokenizer, template, examples, limit, size, sampling, desc=f"{name} answers")
        seconds[name] = round(time.time() - started, 1)
        losses[name] = held_out_losses(model, tokenizer, template, examples, size)
        del model
    scores = {name: score_answers(examples, answers[name]) for name in answers}
    verdicts = _judge(judge_client, judge, examples, answers, scores) if judge_client else None
    evaluation = build_evaluation(plan.output.name, examples, answers, scores, losses, verdicts, {
        "decoding": sampling.describe(), "max_new_tokens": limit, "template": template.name, "test": plan.test,
        "questions": len(examples),
        "generation time": ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())})
    _archive_previous(plan.output)
    summary = {"run": str(plan.output), **evaluation["settings"], "generation_seconds": seconds,
               **{name: headline(scores[name]) for name in answers},
               "answers": [{"question": e.instruction, "input": e.input, "reference": e.expected,
                            **{name: answers[name][i].__dict__ | {"correct": bool(scores[name][i]["contains"])}
                               for name in answers}} for i, e in enumerate(examples)]}
    write_json(plan.output / SUMMARY_FILE, summary)
    from affiner.report import write_report

    write_report(plan.output, evaluation)
    _track(plan.output, evaluation)
    return evaluation


def _track(folder: Path, evaluation: dict) -> None:
    """A run tracked in MLflow gets its evaluation there too: headline numbers and the report."""
    if not (folder / RUN_FILE).is_file():
        return
    from affiner.tracking import log_evaluation

    scores = {f"{model}_{metric}": value["mean"] for metric, by_model in evaluation["metrics"].items()
              for model, value in by_model.items() if value.get("mean") is not None}
    log_evaluation(folder, load_run_config(folder), read_json(folder / RUN_FILE), scores)


def build_evaluation(title: str, examples: list[Example], answers: dict, scores: dict, losses: dict,
                     verdicts: dict | None, settings: dict) -> dict:
    """The evaluation as the report reads it: aggregates with intervals, and every answer with its scores."""
    models = list(answers)
    info = {k: metrics.METRIC_INFO[k] for k in TEXT_METRICS}
    aggregates = {k: {m: metrics.aggregate([s[k] for s in scores[m]]) for m in models} for k in TEXT_METRICS}
    if all(losses[m][0] for m in models):
        per_model = {m: metrics.aggregate_loss(*losses[m]) for m in models}
        for key in ("loss", "perplexity"):
            info[key] = metrics.METRIC_INFO[key]
            aggregates[key] = {m: per_model[m][key] for m in models}
    if verdicts:
        info["judge"] = {"label": "LLM judge: correct", "higher_is_better": True, "kind": "rate"}
        aggregates["judge"] = {m: metrics.aggregate([s["judge"] for s in scores[m] if "judge" in s]) for m in models}
    return {
        "title": title, "models": models, "primary_metric": "contains", "settings": settings,
        "metric_info": info, "metrics": aggregates, "judge": verdicts,
        "examples": [{"question": e.instruction, "input": e.input, "reference": e.expected,
                      "answers": {m: {**answers[m][i].__dict__, "scores": scores[m][i]} for m in models}}
                     for i, e in enumerate(examples)],
    }


def _archive_previous(folder: Path) -> None:
    """Move an earlier evaluation to evaluations/N/ so that a new one never overwrites it."""
    existing = [folder / name for name in REPORT_FILES if (folder / name).exists()]
    if not existing:
        return
    n = 1
    while (folder / "evaluations" / str(n)).exists():
        n += 1
    target = folder / "evaluations" / str(n)
    target.mkdir(parents=True)
    for path in existing:
        shutil.move(str(path), target / path.name)


# ---------------------------------------------------------------------------------------- the judge


def _judge_client(judge: JudgeConfig):
    from affiner.judge import Judge, JudgeSettings

    if not judge.model:
        raise AffinerError("the judge needs a model name: --judge-model NAME (or eval.judge.model).")
    return Judge(JudgeSettings(url=judge.url, model=judge.model, api_key_env=judge.api_key_env,
                               concurrency=judge.concurrency))


def _judge(client, judge: JudgeConfig, examples: list[Example], answers: dict, scores: dict) -> dict:
    from affiner.judge import summarise_absolute, summarise_pairwise

    result: dict = {"model": judge.model, "absolute": {}, "pairwise": {}}
    models = list(answers)
    if judge.mode in {"absolute", "both"}:
        for m in models:
            verdicts = client.absolute([(e.instruction, e.expected, a.text) for e, a in zip(examples, answers[m])])
            for row, verdict in zip(scores[m], verdicts):
                if verdict.score is not None:
                    row["judge"] = float(verdict.score)
            result["absolute"][m] = summarise_absolute(verdicts)
    if judge.mode in {"pairwise", "both"}:
        for m in models[1:]:
            verdicts = client.pairwise([(e.instruction, e.expected, b.text, t.text)
                                        for e, b, t in zip(examples, answers["base"], answers[m])])
            result["pairwise"][m] = summarise_pairwise(verdicts)
    return result


# ---------------------------------------------------------------------------------------- the table


def format_table(evaluation: dict) -> str:
    """A short before/after table for the terminal; the report has everything."""
    models = evaluation["models"]
    rows = [["", *models]]
    for key, info in evaluation["metric_info"].items():
        rows.append([info["label"], *(_cell(evaluation["metrics"][key][m]["mean"], info["kind"]) for m in models)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    tuned = models[1]
    example = next((x for x in evaluation["examples"] if x["answers"][tuned]["scores"]["contains"]
                    and not x["answers"]["base"]["scores"]["contains"]), evaluation["examples"][0])
    lines += ["", f"Q: {example['question']}"] + \
        [f"  {m:5s}: {_short(example['answers'][m]['text'])}" for m in models]
    return "\n".join(lines)


def _cell(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.0f} %" if kind == "rate" else f"{value:.1f}" if kind == "count" else f"{value:.3f}"


def _short(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."
