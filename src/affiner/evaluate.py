"""Before/after evaluation: the base model and the tuned model answer the same held-out questions.

    affiner evaluate runs/quickstart-20261122-183000
    affiner evaluate runs/quickstart-20261122-183000 --test my_questions.jsonl --max-new-tokens 48

Both models see prompts rendered by the run's saved template and decode greedily with the same
settings; they differ only by the adapter. Scores are computed here, per question, and written
with every answer to `summary.json` in the run folder.
"""

from __future__ import annotations

import argparse
import re
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from affiner import data as data_mod
from affiner.errors import AffinerError
from affiner.models import device, load_model, load_tokenizer
from affiner.runs import SUMMARY_FILE, keep_previous, load_run_config, read_json, require_run, write_json
from affiner.templates import Example, Template, encode_prompt, load_template


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder made by affiner train or affiner run")
    parser.add_argument("--test", help="held-out file to answer instead of the run's own test split")
    parser.add_argument("--max-new-tokens", type=int, help="answer length limit (default: eval.max_new_tokens)")
    parser.add_argument("--max-questions", type=int, help="answer only the first N questions")
    parser.add_argument("--batch-size", type=int, help="questions generated together (default: eval.batch_size)")


def main(args: argparse.Namespace) -> None:
    summary = evaluate(Path(args.run), test=args.test, max_new_tokens=args.max_new_tokens,
                       max_questions=args.max_questions, batch_size=args.batch_size)
    print(format_table(summary))
    print(f"Answers and scores: {Path(args.run) / SUMMARY_FILE}")


# ---------------------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class Answer:
    text: str
    stopped: bool  # ended with a stop token before the limit
    tokens: int


@torch.no_grad()
def generate(model, tokenizer, template: Template, examples: list[Example], max_new_tokens: int,
             batch_size: int = 16, desc: str = "generating") -> list[Answer]:
    """Greedy answers, generated in left-padded batches of similar lengths, in the examples' order."""
    prompts = [encode_prompt(template, tokenizer, e) for e in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    stop_ids = list(template.stop_token_ids) or [tokenizer.eos_token_id]
    answers: dict[int, Answer] = {}
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        chunk = order[start:start + batch_size]
        input_ids, attention = left_pad([prompts[i] for i in chunk], tokenizer.pad_token_id)
        output = model.generate(input_ids=input_ids.to(device()), attention_mask=attention.to(device()),
                                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                                pad_token_id=tokenizer.pad_token_id)
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


# ---------------------------------------------------------------------------------------- scores


def normalise(text: str) -> str:
    """Case, accents and punctuation do not make a definition wrong."""
    text = unicodedata.normalize("NFKD", text.casefold())
    text = "".join(c for c in text if not unicodedata.combining(c))
    return " ".join(re.findall(r"\w+", text))


def contains_reference(answer: str, reference: str) -> bool:
    expected = normalise(reference)
    return bool(expected) and f" {expected} " in f" {normalise(answer)} "


def score(answers: list[Answer], examples: list[Example]) -> dict:
    n = len(answers)
    correct = sum(contains_reference(a.text, e.expected) for a, e in zip(answers, examples))
    stopped = sum(a.stopped for a in answers)
    return {"questions": n, "correct": correct, "accuracy": correct / n if n else 0.0,
            "stopped": stopped, "stop_rate": stopped / n if n else 0.0,
            "mean_answer_tokens": sum(a.tokens for a in answers) / n if n else 0.0}


# ---------------------------------------------------------------------------------------- the command


def held_out(folder: Path, test: str | None) -> list[Example]:
    if test:
        config = load_run_config(folder)
        return data_mod.to_examples(data_mod.read_rows(test), config.data.format, config.data.columns)
    path = folder / "test_examples.json"
    if not path.is_file():
        raise AffinerError(f"{folder} has no held-out examples; pass --test FILE.")
    return [Example(**{**row, "history": tuple(tuple(t) for t in row["history"])}) for row in read_json(path)]


def tuned_model(folder: Path, config):
    """The run's model for generation; LoRA weights merged into the base (faster) unless it is 4-bit."""
    if config.method == "full":
        return load_model(str(folder))
    model = load_model(config.model.base, adapter=folder, quantization=config.quantization,
                       precision=config.model.precision, double_quant=config.model.double_quant)
    return model if config.quantization else model.merge_and_unload()


def evaluate(folder: Path, test: str | None = None, max_new_tokens: int | None = None,
             max_questions: int | None = None, batch_size: int | None = None) -> dict:
    folder = require_run(folder)
    run = read_json(folder / "run.json")
    if run.get("status") != "finished":
        raise AffinerError(f"{folder} has not finished training (status: {run.get('status')}); "
                           f"resume it with: affiner train --resume {folder}")
    config = load_run_config(folder)
    template = load_template(folder)
    tokenizer = load_tokenizer(str(folder))
    examples = held_out(folder, test)[: max_questions or config.eval.max_questions]
    if not examples:
        raise AffinerError(f"no held-out question to answer for {folder}.")
    limit = max_new_tokens or config.eval.max_new_tokens
    size = batch_size or config.eval.batch_size
    results, answers = {}, {}
    for name in ("base", "tuned"):
        started = time.time()
        if name == "base":
            model = load_model(config.model.base, quantization=config.quantization, precision=config.model.precision,
                               double_quant=config.model.double_quant)
        else:
            model = tuned_model(folder, config)
        answers[name] = generate(model, tokenizer, template, examples, limit, size, desc=f"{name} answers")
        results[name] = score(answers[name], examples) | {"seconds": round(time.time() - started, 1)}
        del model
    summary = {
        "run": str(folder), "decoding": "greedy", "max_new_tokens": limit, "template": template.name,
        "test": test or "held-out split of the run", "base": results["base"], "tuned": results["tuned"],
        "answers": [{"question": e.instruction, "input": e.input, "reference": e.expected,
                     "base": answers["base"][i].__dict__ | {"correct": contains_reference(answers["base"][i].text, e.expected)},
                     "tuned": answers["tuned"][i].__dict__ | {"correct": contains_reference(answers["tuned"][i].text, e.expected)}}
                    for i, e in enumerate(examples)],
    }
    keep_previous(folder / SUMMARY_FILE)
    write_json(folder / SUMMARY_FILE, summary)
    return summary


def format_table(summary: dict) -> str:
    def cell(result: dict, key: str, count: str) -> str:
        return f"{result[count]}/{result['questions']} ({100 * result[key]:.0f} %)"

    base, tuned = summary["base"], summary["tuned"]
    rows = [("", "base", "tuned"),
            ("correct answer", cell(base, "accuracy", "correct"), cell(tuned, "accuracy", "correct")),
            (f"stops before {summary['max_new_tokens']} tokens", cell(base, "stop_rate", "stopped"),
             cell(tuned, "stop_rate", "stopped")),
            ("mean answer length (tokens)", f"{base['mean_answer_tokens']:.1f}", f"{tuned['mean_answer_tokens']:.1f}")]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    example = next((a for a in summary["answers"] if a["tuned"]["correct"] and not a["base"]["correct"]),
                   summary["answers"][0])
    lines += ["", f"Q: {example['question']}", f"  base : {_short(example['base']['text'])}",
              f"  tuned: {_short(example['tuned']['text'])}"]
    return "\n".join(lines)


def _short(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."
