"""What an evaluation compares: which models (the base first), on which questions, with which template.

Base and tuned models are loaded by the same loader with the same settings and differ only by the
adapter, so every comparison is fair by construction.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from affiner.core.card import KEPT_OVERLAP, RUN_SPLIT
from affiner.core.config import JudgeConfig, RunConfig
from affiner.core.errors import AffinerError, first_line
from affiner.core.models import (base_context_length, context_length, dtype_for, dtype_of, load_for, load_model,
                                 load_tokenizer, tokenizer_for)
from affiner.core.files import LOCK_FILE, LOCK_OWNER
from affiner.core.runfolder import SUMMARY_FILE, RunFolder, model_names, require_one_base
from affiner.core.templates import Example, Template, template_for_adapters
from affiner.data.formats import to_examples
from affiner.data.filters import EXACT_OVERLAP, drop_empty, training_overlap
from affiner.data.pipeline import dropped_rows, prompts_that_fit, source_examples, training_rows
from affiner.data.read import read_test_rows


@dataclass
class Plan:
    """What to evaluate: which models, on which questions, with which prompt template, written where."""

    output: Path
    template: Template
    tokenizer: object
    examples: list[Example]
    loaders: dict[str, Callable[[], object]]  # model name -> function loading it; "base" first
    max_new_tokens: int
    batch_size: int
    test: str
    judge: JudgeConfig | None
    general: bool = True  # also the no-harm check on affiner's general set
    dropped: dict | None = None  # held-out rows not evaluated, with why: {"count", "rows": [{question, reason}]}
    base_cache: bool = True  # the base's answers may come from an earlier evaluation (evaluation.base_cache)
    folders: dict[str, Path] | None = None  # model name -> its run folder (None: adapters trained elsewhere)
    key_before: str | None = None  # eval.key_before: the key part of a reference is the text before it
    overlap: str | None = None  # what was found of --test questions also in the training rows (None: not asked)
    repetition_penalty: float = 1.0  # eval.repetition_penalty of the (first) run
    headline: str = "auto"  # eval.headline of the (first) run


def held_out(run: RunFolder, test: str | None, config: RunConfig, template: Template, tokenizer,
             keep_overlap: bool = False) -> tuple[list[Example], dict | None, str | None]:
    """The questions to answer, those left out with why, and what was found of overlap with the training rows:
    --test FILE when given (whatever the length of its answers, as long as each prompt fits the model's context;
    questions the run trained on left out unless `keep_overlap`), else the run's own held-out split (whose
    overlap with the training rows was dropped when the run was trained)."""
    if test:
        raw_rows = read_test_rows(test)
        try:
            rows = source_examples(raw_rows, test, config.data)
        except AffinerError as error:  # data.columns is the run's, which evaluate takes no --set to change
            raise AffinerError(f"{error} affiner evaluate reads --test as the run read its data (data.format "
                               f"{config.data.format}, data.columns {dict(config.data.columns) or 'none'}), with no "
                               "setting of its own: rename the file's columns to those (question/answer, "
                               "instruction/input/output or messages, unless data.columns maps others).") from None
        examples, empty = drop_empty(rows, held_out=True)
        examples, overlapping, overlap = _overlap(run, config, examples, keep_overlap)
        kept, dropped = prompts_that_fit(examples, template, tokenizer, context_length(config))
        return kept, dropped_rows(empty + overlapping + dropped), overlap
    if not run.has_held_out:
        raise AffinerError(f"{run} has no held-out examples; pass --test FILE.")
    return run.held_out(), run.data_info().get("test", {}).get("dropped"), None


def _overlap(run: RunFolder, config: RunConfig, examples: list[Example],
             keep: bool) -> tuple[list[Example], list[tuple[Example, str]], str]:
    """Rows of a --test file the run trained on: a held-out figure on them measures memory, not learning.
    Returns the rows to answer, those left out with why, and the line the report's settings show."""
    try:
        found = training_overlap(examples, training_rows(config.data, run.held_out()))
    except (AffinerError, OSError) as error:  # moved, deleted, or a Hub dataset out of reach
        line = f"not checked: the training rows ({config.data.train}) could not be read again ({first_line(error)})"
        print(f"note: overlap of the test questions with the run's training rows {line}.", file=sys.stderr)
        return examples, [], line
    exact = sum(reason == EXACT_OVERLAP for _, reason in found)
    line = (f"{len(found)} of {len(examples)} test questions also in the training rows "
            f"({exact} word for word, {len(found) - exact} up to case, spacing and punctuation)")
    if not found:
        return examples, [], line
    if keep:
        return examples, [], f"{line}, {KEPT_OVERLAP}"
    overlapping = {id(e) for e, _ in found}
    print(f"note: {line}: left out of the scores and listed in the report (--keep-overlap keeps them).",
          file=sys.stderr)
    return [e for e in examples if id(e) not in overlapping], found, line + ", left out of the scores"


def tuned_model(run: RunFolder, config: RunConfig):
    """The run's model for generation; LoRA weights merged into the base (faster) unless it is 4-bit."""
    if config.method == "full":
        return load_model(str(run.path), trust_remote_code=config.model.trust_remote_code)
    if config.quantization:
        return load_for(config, adapter=run.path)
    return _merged(load_for(config, adapter=run.path, full_precision=True), dtype_for(config))


def plan_runs(folders: list[Path], test: str | None, max_questions: int | None, keep_overlap: bool = False,
              key_before: str | None = None) -> Plan:
    runs = [RunFolder.open(folder).require_finished("evaluate it").require_writable("its evaluation")
            for folder in folders]
    configs = require_one_base(runs, "only runs of one base can be compared on the same prompts.")
    run, config = runs[0], configs[0]
    loaders: dict[str, Callable[[], object]] = {"base": lambda: load_for(config)}
    names = model_names([r.path for r in runs])
    for name, other, other_config in zip(names, runs, configs):
        loaders[name] = lambda r=other, c=other_config: tuned_model(r, c)
    template, tokenizer = run.template(), tokenizer_for(config, run.path)
    examples, dropped, overlap = held_out(run, test, config, template, tokenizer, keep_overlap)
    return Plan(output=run.path, template=template, tokenizer=tokenizer,
                examples=examples[: max_questions or config.eval.max_questions],
                loaders=loaders, max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size,
                test=test or (config.data.test or RUN_SPLIT),
                judge=config.eval.judge if config.eval.judge.url else None, general=config.eval.general,
                dropped=dropped, overlap=overlap, folders={n: r.path for n, r in zip(names, runs)}, key_before=key_before or config.eval.key_before,
                repetition_penalty=config.eval.repetition_penalty, headline=config.eval.headline)


def plan_adapters(base: str, adapters: list[Path], test: str | None, template_name: str | None, output: Path | None,
                  max_questions: int | None, quantization: str | None = None, key_before: str | None = None) -> Plan:
    """A base model and LoRA adapters trained anywhere (plain peft folders), on a test file."""
    if not test or output is None:
        raise AffinerError("evaluating --adapter folders needs --test FILE (the held-out questions) and "
                           "--output DIR (where the report goes).")
    # An evaluation killed before its first file leaves only its lock (and a temporary file) behind: the folder
    # is still new.
    others = [p for p in output.iterdir() if p.name not in (LOCK_FILE, LOCK_OWNER) and
              not (p.name.startswith(".") and p.name.endswith(".partial"))] if output.exists() else []
    if others and not (output / SUMMARY_FILE).exists():
        raise AffinerError(f"--output {output} is a folder with other files in it; choose a new or empty folder.")
    tokenizer = load_tokenizer(base)
    names = [a.name for a in adapters]
    if len(set(names)) != len(names) or "base" in names:
        raise AffinerError("adapter folders must have distinct names, none called 'base': they name the columns.")
    loaders: dict[str, Callable[[], object]] = {"base": lambda: load_model(base, quantization=quantization)}
    for adapter in adapters:
        loaders[adapter.name] = lambda a=adapter: (
            load_model(base, adapter=a, quantization=quantization) if quantization else
            _merged(load_model(base, adapter=a, full_precision=True), dtype_of(base)))
    examples, empty = drop_empty(to_examples(read_test_rows(test)), held_out=True)
    template = template_for_adapters(adapters, template_name, "alpaca", tokenizer)
    examples, too_long = prompts_that_fit(examples, template, tokenizer, base_context_length(base))  # as for runs
    output.mkdir(parents=True, exist_ok=True)
    return Plan(output=output, template=template, tokenizer=tokenizer,
                examples=examples[:max_questions], loaders=loaders, max_new_tokens=64, batch_size=16, test=test,
                judge=None, key_before=key_before, dropped=dropped_rows(empty + too_long),
                overlap="not checked: affiner does not know the training rows of adapters trained elsewhere")


def _merged(model, dtype: torch.dtype):
    """The adapter merged into fp32 weights, then the weights cast to `dtype` once: added to bf16 weights, the update
    would lose every change smaller than 1/256 of a weight. A 4-bit base is never merged (it stays unmerged).
    The buffers keep the dtypes the base's loader gives them (rotary frequencies stay fp32): cast with the weights,
    they made the tuned model differ from its base even where the adapter changed nothing."""
    merged = model.merge_and_unload()
    loaded_as = buffer_dtypes(merged, dtype)
    for parameter in merged.parameters():
        parameter.data = parameter.data.to(dtype)
    for name, buffer in list(merged.named_buffers()):
        if name in loaded_as and buffer.dtype != loaded_as[name]:
            owner, _, attribute = name.rpartition(".")
            setattr(merged.get_submodule(owner), attribute, buffer.to(loaded_as[name]))
    return merged


def buffer_dtypes(model, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Each buffer's dtype in `model`'s architecture built as `from_pretrained(dtype=...)` builds it (under that
    default dtype, on the meta device: no memory)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            reference = type(model)(model.config)
    finally:
        torch.set_default_dtype(previous)
    return {name: buffer.dtype for name, buffer in reference.named_buffers()}
