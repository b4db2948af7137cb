"""What llama.cpp and Ollama need: a GGUF model and a `Modelfile` whose Go template writes the prompt
exactly as the run's template rendered it in training, and stops on the template's stop tokens.

Two forms: `model.gguf`, the merged (or fully fine-tuned) model (`--gguf`), or `base.gguf` with the LoRA
adapter as `adapter.gguf` beside it, which the Modelfile names with `ADAPTER` (`--for ollama`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import replace
from pathlib import Path

from affiner.core.config import RunConfig
from affiner.core.errors import AffinerError
from affiner.core.files import write_atomic
from affiner.core.hub import hub_error, hub_kwargs, hub_options
from affiner.core.gguf_cache import EMBEDDED_MODELS, embedded_gguf
from affiner.core.models import resolve_base
from affiner.core.runfolder import RunFolder
from affiner.core.stopping import turn_markers
from affiner.core.templates import Example, Template, adds_bos, chat_text, render_prompt, starts_with_bos
from affiner.export.gguf_writer import GgufReport, gguf_architecture, write_gguf
from affiner.export.hub import base_licence
from affiner.export.merge import example_of

GGUF_FILE = "model.gguf"
MODELFILE = "Modelfile"
_PROMPT_MARKER = "AFFINERPROMPTMARKER"
_RESPONSE_MARKER = "AFFINERRESPONSEMARKER"
_SYSTEM_MARKER = "AFFINERSYSTEMMARKER"


def check_gguf_architecture(run: RunFolder, config: RunConfig) -> None:
    """Refuse an architecture the GGUF writer cannot write from its config alone, before any model loads."""
    from transformers import AutoConfig

    full = config.method == "full"
    source = str(run.path) if full else resolve_base(config.model.base)
    options = hub_options(None if full else config.model.revision, config.model.trust_remote_code)
    try:
        model_config = AutoConfig.from_pretrained(source, **hub_kwargs(source), **options)
    except (OSError, ValueError) as exc:
        raise hub_error("model config", config.model.base, exc) from None
    gguf_architecture(model_config)


def source_gguf(base: str) -> Path | None:
    """The GGUF file a base model was converted from, whose tokenizer metadata can be reused as it is."""
    if base in EMBEDDED_MODELS:
        return embedded_gguf(base)
    path = Path(base).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def write_gguf_files(model, tokenizer, template: Template, config: RunConfig, run: RunFolder, target: Path,
                     gguf_type: str) -> GgufReport:
    """model.gguf and the Modelfile in `target`; the writer's notes on llama.cpp are printed and kept."""
    report = write_model_gguf(model, tokenizer, template, config, run, target / GGUF_FILE, gguf_type)
    write_atomic(target / MODELFILE, modelfile(template, tokenizer, run.name, report,
                                               question=example_of(run, template, tokenizer).instruction))
    return report


def write_model_gguf(model, tokenizer, template: Template, config: RunConfig, run: RunFolder, path: Path,
                     gguf_type: str, name: str | None = None) -> GgufReport:
    """`model` as one GGUF file at `path`; the writer's notes on llama.cpp are printed and kept."""
    report = write_gguf(model, tokenizer, path, gguf_type, name=name or run.name,
                        license_id=base_licence(config.model.base, config.model.revision)[0],
                        source_gguf=source_gguf(config.model.base),  # the run's tokenizer was built from it
                        sample_texts=_sample_texts(run, template, tokenizer))
    for note in report.notes:
        print(f"note: {note}.")
    return report


def write_base_gguf(run: RunFolder, config: RunConfig, template: Template, tokenizer, path: Path,
                    gguf_type: str) -> GgufReport:
    """The run's base as one GGUF file, unmerged: the model llama.cpp's --lora and Ollama's ADAPTER add to."""
    import torch

    from affiner.core.gguf_cache import drop_gguf_quantizer
    from affiner.core.models import load_for

    # fp32 on the CPU, unquantised even for QLoRA: the GGUF type alone decides how the file rounds weights.
    model = load_for(config, full_precision=True, quantized=False, on=torch.device("cpu"))
    drop_gguf_quantizer(model)
    return write_model_gguf(model, tokenizer, template, config, run, path, gguf_type,
                            name=f"{Path(config.model.base).name} (base of {run.name})")


def write_adapter_gguf(run: RunFolder, config: RunConfig, path: Path) -> None:
    """The run's LoRA adapter as a llama.cpp LoRA GGUF, laid out for its base's architecture."""
    from affiner.core.models import model_config_of
    from affiner.export.gguf_lora import write_lora_gguf

    base_config = model_config_of(config.model.base, config.model.revision, config.model.trust_remote_code)
    if base_config is None:
        raise AffinerError(f"the config of the base model {config.model.base} cannot be read, so the adapter of "
                           f"{run} cannot be laid out for llama.cpp.")
    write_lora_gguf(run.path, base_config, path, name=run.name)


def _sample_texts(run: RunFolder, template: Template, tokenizer, n: int = 8) -> list[str]:
    """Held-out prompts with their answers, as the model saw them: what the GGUF tokenizer must split alike."""
    texts = []
    for example in run.held_out()[:n]:
        try:
            texts.append(render_prompt(template, example, tokenizer) + template.response_prefix + example.response)
        except AffinerError:
            continue
    return texts


def modelfile(template: Template, tokenizer, name: str, report: GgufReport | None = None,
              model_file: str = GGUF_FILE, adapter_file: str | None = None, question: str = "Hello!") -> str:
    """An Ollama Modelfile whose TEMPLATE writes exactly the prompt format the model was trained with:
    FROM `model_file`, with the LoRA `adapter_file` on it when given; `question` is its comment's example."""
    lines = [f"# Ollama Modelfile for {name}, exported by affiner.",
             f"#   ollama create {slug(name)} -f {MODELFILE}",
             f"#   ollama run {slug(name)} {shlex.quote(' '.join(question.split()))}",
             (f"# TEMPLATE reproduces the '{template.name}' prompt format used in training; the model stops on the "
             "stop tokens below.")]
    if report is not None and report.notes:
        lines += [f"# Warning: {note}." for note in report.notes]
    system = template.system_prompt
    if template.is_chat:
        go_template = _chat_go_template(template, tokenizer)
    else:
        go_template = _text_go_template(template)
        lines.append("# Questions with a separate input field were trained as "
                     f"{template.prompt_with_input!r}; here the input goes in the question.")
    lines += ["", f"FROM ./{model_file}"] + ([f"ADAPTER ./{adapter_file}"] if adapter_file else [])
    lines.append(f'TEMPLATE """{go_template}"""')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    stop_ids = list(template.stop_token_ids) or [tokenizer.eos_token_id]
    for token in dict.fromkeys(tokenizer.convert_ids_to_tokens(stop_ids)):
        lines.append(f"PARAMETER stop {json.dumps(token)}")
    for marker in turn_markers(template):  # a text template's next turn: where affiner cuts an answer too
        lines.append(f"PARAMETER stop {json.dumps(marker)}")
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def _text_go_template(template: Template) -> str:
    """A text template answers one question: the system prompt (the client's, or SYSTEM), then the last user
    message in the prompt format. Written over .Messages, since Ollama renders a .Prompt template once per turn
    and glues the turns together, which training never showed the model."""
    body = _go_literal(template.prompt.format(instruction=_PROMPT_MARKER, input=""))
    last_user = '{{- range $i, $_ := .Messages }}{{- if and (eq .Role "user") (eq (len (slice $.Messages $i)) 1) }}'
    return (last_user + "{{ if $.System }}{{ $.System }}\n\n{{ end }}" + body.replace(_PROMPT_MARKER, "{{ .Content }}")
            + "{{ end }}{{ end }}")


def _chat_go_template(template: Template, tokenizer) -> str:
    """One turn of the chat template with the user's text as {{ .Prompt }} and the answer as {{ .Response }},
    which Ollama renders once per turn; the system prompt (SYSTEM, or the client's) is written where the chat
    template writes it, in the first turn only, as Ollama passes .System to the first turn alone."""
    without = _one_turn(replace(template, system_prompt=None), tokenizer)
    try:
        with_system = _one_turn(replace(template, system_prompt=_SYSTEM_MARKER), tokenizer)
    except Exception:  # a chat template that takes no system message (it raises): turns without one
        return _go_prompt(without)
    start = len(os.path.commonprefix([without, with_system]))
    end = len(os.path.commonprefix([without[start:][::-1], with_system[start:][::-1]]))
    inserted = with_system[start:len(with_system) - end]
    if without[start:len(without) - end] or _SYSTEM_MARKER not in inserted:
        return _go_prompt(without)  # the system prompt changes more than one place: left to the client
    # The same text shifted back to where its turn begins ("<start_of_turn>system..." rather than "system...").
    shift = max((k for k in range(start + 1) if inserted.endswith(without[start - k:start])), default=0)
    start, inserted = start - shift, with_system[start - shift:start - shift + len(inserted)]
    system_part = _go_literal(inserted).replace(_SYSTEM_MARKER, "{{ .System }}")
    return _go_prompt(without[:start]) + "{{ if .System }}" + system_part + "{{ end }}" + _go_prompt(without[start:])


def _one_turn(template: Template, tokenizer) -> str:
    """The chat template's text for one question and its answer, answer as {{ .Response }} (unescaped markers)."""
    prompt = render_prompt(template, Example(instruction=_PROMPT_MARKER), tokenizer)
    full = chat_text(template, tokenizer, Example(instruction=_PROMPT_MARKER, response=_RESPONSE_MARKER),
                     with_response=True)
    closing = full[len(prompt):].split(_RESPONSE_MARKER, 1)[-1] \
        if full.startswith(prompt) and _RESPONSE_MARKER in full else ""
    if starts_with_bos(tokenizer, prompt) and adds_bos(tokenizer):
        prompt = prompt[len(tokenizer.bos_token):]  # llama.cpp adds BOS itself, as tokenizer.ggml.add_bos_token says
    return prompt + _RESPONSE_MARKER + closing


def _go_prompt(text: str) -> str:
    """`text` as Go template source, with the prompt and response markers turned into {{ .Prompt }} and
    {{ .Response }}."""
    return _go_literal(text).replace(_PROMPT_MARKER, "{{ .Prompt }}").replace(_RESPONSE_MARKER, "{{ .Response }}")


def _go_literal(text: str) -> str:
    return text.replace("{{", "{{ \"{{\" }}").replace('"""', '\\"\\"\\"')


def slug(name: str) -> str:
    """An Ollama model name made from a run name."""
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-") or "affiner-model"
