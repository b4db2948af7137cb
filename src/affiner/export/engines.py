"""Hand-off to serving engines: what vLLM, llama.cpp and Ollama need to serve a run's LoRA adapter on its
base exactly as affiner trained it, and the command that launches each.

- vLLM: the peft adapter as it is, `chat_template.jinja` (the run's prompt format as a Jinja chat
  template), `vllm-config/generation_config.json` (vLLM stops on its `eos_token_id`: the template's stop tokens)
  and `serve-vllm.sh`.
- llama.cpp: `base.gguf` (the base, 4-bit by default) and `adapter.gguf` (the LoRA), the same chat
  template, and `serve-llama-cpp.sh` (llama-server).
- Ollama: the same two GGUF files, a Modelfile with `ADAPTER`, TEMPLATE and stop parameters, and
  `create-ollama.sh`.

A text template (qa, alpaca, instruction) becomes a Jinja template that writes the system prompt (the
client's own system message, or the run's) and the last user message exactly as
`core.templates.render_prompt` does, BOS included when the tokenizer adds one: engines tokenise a chat
prompt without adding special tokens. `check_chat_template` renders it with transformers and refuses
the export unless the token ids equal `encode_prompt`'s. The launch commands are argv lists built by
pure functions, used by the scripts of an export and by `affiner serve --engine` alike.
"""

from __future__ import annotations

import copy
import os
import shlex
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from affiner.core.config import RunConfig
from affiner.core.errors import AffinerError
from affiner.core.files import json_text, write_atomic, write_json
from affiner.core.gguf_cache import save_tokenizer
from affiner.core.models import resolve_base, tokenizer_for
from affiner.core.runfolder import RunFolder, model_names, require_one_base
from affiner.core.stopping import turn_markers
from affiner.core.templates import Example, Template, adds_bos, encode_prompt
from affiner.export.gguf_writer import DEFAULT_GGUF_TYPE
from affiner.core.card import hub_id
from affiner.export.ollama import write_adapter_gguf, write_base_gguf

ENGINES = ("vllm", "llama.cpp", "ollama")
GGUF_ENGINES = ("llama.cpp", "ollama")
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM refuses any other --max-lora-rank
CHAT_TEMPLATE_FILE = "chat_template.jinja"
STOP_FILE = "stop.json"
VLLM_CONFIG_DIR = "vllm-config"  # generation_config.json for --generation-config ("vllm" alone names its defaults)
BASE_GGUF = "base.gguf"
ADAPTER_GGUF = "adapter.gguf"
SCRIPTS = {"vllm": "serve-vllm.sh", "llama.cpp": "serve-llama-cpp.sh", "ollama": "create-ollama.sh"}
BASE_NAME = "base"  # what the base model is called by clients, as in affiner serve
TUNED_NAME = "tuned"
CHECK_QUESTIONS = ("What does QUILT stand for?", "Réponds: \"{{ x }}\"\n\tet {% rien %}\\n ?")
_MARKER = "AFFINERPROMPTMARKER"


def parse_targets(values: Iterable[str] | None) -> tuple[str, ...]:
    """The engines named by --for (repeated, or comma-separated), each once, in the order given."""
    found: list[str] = []
    for value in values or ():
        names = [name.strip() for name in value.split(",") if name.strip()]
        if not names:
            raise AffinerError(f"--for {value!r} names no engine; supported: {', '.join(ENGINES)}.")
        for name in names:
            if name not in ENGINES:
                raise AffinerError(f"unknown --for '{name}'; supported: {', '.join(ENGINES)} (repeat --for, or "
                                   "separate engines with commas).")
            found += [name] if name not in found else []
    return tuple(found)


# ---------------------------------------------------------------------------------------- prompt format


def _jinja_string(text: str) -> str:
    """`text` as a Jinja string literal that Jinja2 (vLLM, transformers) and llama.cpp's minja read alike."""
    for raw, escaped in (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t")):
        text = text.replace(raw, escaped)
    return f'"{text}"'


def chat_template(template: Template, tokenizer) -> str:
    """The run's prompt format as a Jinja chat template for engines (see the module's docstring)."""
    system = _jinja_string(template.system_prompt) if template.system_prompt else "none"
    if template.is_chat:
        # An empty system message from the client asks for none, as affiner serve reads it; without any, the
        # run's system prompt (if it has one), as training rendered it.
        run_system = "" if not template.system_prompt else (
            "{%- elif not messages or messages[0]['role'] != 'system' -%}"
            f"{{%- set messages = [{{'role': 'system', 'content': {system}}}] + messages -%}}")
        return ("{%- if messages and messages[0]['role'] == 'system' and not messages[0]['content'] -%}"
                "{%- set messages = messages[1:] -%}" + run_system + "{%- endif -%}\n" + template.chat_template)
    before, after = template.prompt.format(instruction=_MARKER, input="").split(_MARKER, 1)
    bos = _jinja_string(tokenizer.bos_token) if adds_bos(tokenizer) else '""'
    return "\n".join([
        f"{{#- affiner: the '{template.name}' prompt format this run was trained on. It holds one question: the",
        "    system prompt (the client's own system message, or the run's), then the last user message. -#}",
        f"{{%- set system = {system} -%}}",
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set system = messages[0]['content'] -%}",
        "{%- endif -%}",
        "{%- if not messages or messages[-1]['role'] != 'user' -%}",
        "{{- raise_exception('the last message must come from the user: this model answers one question') -}}",
        "{%- endif -%}",
        f"{{{{- {bos} -}}}}",
        "{%- if system -%}{{- system + \"\\n\\n\" -}}{%- endif -%}",
        f"{{{{- {_jinja_string(before)} + messages[-1]['content'] + {_jinja_string(after)} -}}}}",
        ""])


def render_chat_template(jinja: str, tokenizer, messages: list[dict[str, str]]) -> str:
    """What an engine's chat endpoint renders for `messages`, through transformers' Jinja support."""
    return tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False, add_generation_prompt=True)


def check_chat_template(jinja: str, template: Template, tokenizer) -> None:
    """The Jinja template must give the very token ids training used, for a plain question and for one
    full of quotes, braces and newlines; else nothing is exported."""
    for question in CHECK_QUESTIONS:
        expected = encode_prompt(template, tokenizer, Example(instruction=question))
        text = render_chat_template(jinja, tokenizer, [{"role": "user", "content": question}])
        if tokenizer(text, add_special_tokens=False)["input_ids"] != expected:
            raise AffinerError(f"the '{template.name}' template cannot be written as a Jinja chat template that "
                               f"reproduces training's prompt exactly (it renders {text!r}), so an engine's chat "
                               "endpoint would not prompt the model as training did; nothing was written. Serve it "
                               "with affiner's own server (--engine affiner), or send the engine's /v1/completions "
                               "the text prompt of the export's README.md.")


def with_run_chat_template(tokenizer, template: Template):
    """A copy of the tokenizer whose chat template is the run's prompt format (checked to give training's ids),
    or none where it cannot be written: whoever prompts an exported model by its chat template (apply_chat_template,
    vLLM, llama-server --jinja) must prompt it as training did, never with the base's own template."""
    exported = copy.deepcopy(tokenizer)
    jinja = chat_template(template, tokenizer)
    try:
        check_chat_template(jinja, template, tokenizer)
    except AffinerError:
        jinja = None
    exported.chat_template = jinja
    return exported


def stop_settings(template: Template, tokenizer) -> dict[str, list]:
    """Where an answer ends: the template's stop tokens (ids and text), and for a text template the
    markers of a new turn, which clients pass as `stop` (engines take no server-wide stop strings)."""
    ids = list(template.stop_token_ids) or [tokenizer.eos_token_id]
    return {"stop_token_ids": ids, "stop_tokens": tokenizer.convert_ids_to_tokens(ids),
            "stop": list(turn_markers(template))}


# ---------------------------------------------------------------------------------------- commands


def vllm_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds `rank`."""
    fitting = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fitting:
        raise AffinerError(f"LoRA rank {rank} is above the largest vLLM serves ({VLLM_LORA_RANKS[-1]}).")
    return fitting[0]


def vllm_argv(base: str, adapters: dict[str, str], rank: int, template_file: str, generation_config: str,
              host: str = "127.0.0.1", port: int = 8000, revision: str | None = None,
              trust_remote_code: bool = False, quantized: bool = False, program: tuple[str, ...] = ("vllm",)
              ) -> list[str]:
    """`vllm serve` with every adapter on one base, the base called "base" as in affiner serve."""
    argv = [*program, "serve", base, "--served-model-name", BASE_NAME, "--enable-lora",
            "--lora-modules", *(f"{name}={path}" for name, path in adapters.items()),
            "--max-lora-rank", str(vllm_rank(rank)), "--max-loras", str(len(adapters)),
            "--chat-template", template_file, "--generation-config", generation_config,
            "--host", host, "--port", str(port)]
    if revision:
        argv += ["--revision", revision]
    if trust_remote_code:
        argv.append("--trust-remote-code")
    if quantized:  # a QLoRA adapter was trained on the NF4 base: serve it on one
        argv += ["--quantization", "bitsandbytes"]
    return argv


def llama_server_argv(base_gguf: str, adapters: list[str], template_file: str, host: str = "127.0.0.1",
                      port: int = 8000, program: tuple[str, ...] = ("llama-server",)) -> list[str]:
    """`llama-server` on the base GGUF with the LoRA GGUFs: one is applied to every request; several are
    loaded unapplied, and a request picks one with "lora": [{"id": N, "scale": 1.0}]."""
    argv = [*program, "-m", base_gguf]
    for adapter in adapters:
        argv += ["--lora", adapter]
    if len(adapters) > 1:
        argv.append("--lora-init-without-apply")
    return argv + ["--jinja", "--chat-template-file", template_file, "--host", host, "--port", str(port)]


def llama_cpp_python_config(base_gguf: str, adapters: dict[str, str], tokenizer: str, host: str = "127.0.0.1",
                            port: int = 8000) -> dict:
    """The config file of `python -m llama_cpp.server`: the base and each adapter as a model of its own name
    (it holds one at a time), prompts written and tokenised by the transformers tokenizer saved in `tokenizer`
    (its "hf-tokenizer-config" format would render an empty assistant turn into every prompt)."""
    common = {"model": base_gguf, "chat_format": "hf-autotokenizer", "hf_pretrained_model_name_or_path": tokenizer,
              "n_ctx": 0}
    models = [{**common, "model_alias": BASE_NAME}]
    models += [{**common, "model_alias": name, "lora_path": path} for name, path in adapters.items()]
    return {"host": host, "port": port, "models": models}


def save_engine_tokenizer(tokenizer, jinja: str, folder: Path) -> None:
    """The run's tokenizer as llama-cpp-python's "hf-autotokenizer" format uses it: it renders without
    add_generation_prompt (the template sets it itself), then encodes the prompt with special tokens added,
    so this copy adds none: the template writes BOS, as for every other engine."""
    from tokenizers.processors import TemplateProcessing

    engine_tokenizer = copy.deepcopy(tokenizer)
    engine_tokenizer.chat_template = "{%- set add_generation_prompt = true -%}\n" + jinja
    for flag in ("add_bos_token", "add_eos_token"):
        if getattr(engine_tokenizer, flag, None):
            setattr(engine_tokenizer, flag, False)
    if engine_tokenizer.is_fast:
        engine_tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="$A", pair="$A $B")
    save_tokenizer(engine_tokenizer, folder)


def ollama_argv(name: str, modelfile: str) -> list[str]:
    return ["ollama", "create", name, "-f", modelfile]


def shell_script(argv: list[str], comments: list[str]) -> str:
    """A script that runs `argv` from its own folder (so relative paths in it hold wherever the export is
    moved), passing on any further arguments."""
    comment_lines = [line for comment in comments for line in comment.splitlines()]
    return "\n".join(["#!/bin/sh", *[f"# {line}" for line in comment_lines], 'cd "$(dirname "$0")" || exit 1',
                      f'exec {shlex.join(argv)} "$@"', ""])


def write_script(path: Path, argv: list[str], comments: list[str]) -> None:
    write_atomic(path, shell_script(argv, comments))
    path.chmod(0o755)


def write_generation_config(folder: Path, stops: dict[str, list]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "generation_config.json", {"eos_token_id": stops["stop_token_ids"]})


def portable_base(base: str) -> str:
    """The base as another machine finds it: its Hub id, else its absolute path on this one."""
    return hub_id(base) or str(Path(resolve_base(base)).resolve())


# ---------------------------------------------------------------------------------------- affiner serve --engine

ENGINE_CACHE = "engines"  # in a run folder: what `affiner serve --engine` exported, kept for the next start
LLAMA_CPP_PYTHON = "llama_cpp.server"  # the launcher name of llama-cpp-python's server


@dataclass(frozen=True)
class EngineCommand:
    argv: list[str]
    notes: list[str]  # what the user needs to know to use it: model names, stop strings


def engine_command(folders: list[Path], engine: str, launcher: str, program: tuple[str, ...], host: str, port: int,
                   gguf_type: str = DEFAULT_GGUF_TYPE) -> EngineCommand:
    """What `engine` needs to serve the runs' adapters on their one base, exported into a cache folder under
    the runs (kept for the next start), and the command that serves them. `launcher` is vllm, llama-server
    or llama_cpp.server; `program` the argv that starts it."""
    runs = _served_runs(folders, engine)
    configs = require_one_base(runs, f"--engine {engine} serves the adapters of one base model only.")
    template = runs[0].template()  # the same for every run (require_one_base)
    tokenizer = tokenizer_for(configs[0], runs[0].path)
    cache = runs[0] / ENGINE_CACHE / engine
    cache.mkdir(parents=True, exist_ok=True)
    jinja = chat_template(template, tokenizer)
    check_chat_template(jinja, template, tokenizer)
    write_atomic(cache / CHAT_TEMPLATE_FILE, jinja)
    stops = stop_settings(template, tokenizer)
    names = model_names([run.path for run in runs])
    notes = [f"models: {', '.join([BASE_NAME, *names])}", *stop_notes(stops)]
    if engine == "vllm":
        write_generation_config(cache / VLLM_CONFIG_DIR, stops)
        config = configs[0]
        base = resolve_base(config.model.base)  # the very weights the adapters were trained on
        argv = vllm_argv(base, {name: str(run.path.resolve()) for name, run in zip(names, runs)},
                         max(c.lora.r for c in configs), str(cache / CHAT_TEMPLATE_FILE), str(cache / VLLM_CONFIG_DIR),
                         host, port, None if Path(base).exists() else config.model.revision,
                         config.model.trust_remote_code, config.method == "qlora", program)
        return EngineCommand(argv, notes)
    base_gguf, adapters = _gguf_files(runs, configs, names, template, tokenizer, cache, gguf_type)
    if launcher == LLAMA_CPP_PYTHON:
        save_engine_tokenizer(tokenizer, jinja, cache / "tokenizer")
        settings = llama_cpp_python_config(str(base_gguf), adapters, str(cache / "tokenizer"), host, port)
        write_json(cache / "llama-cpp-python.json", settings)
        return EngineCommand([*program, "--config_file", str(cache / "llama-cpp-python.json")], notes)
    argv = llama_server_argv(str(base_gguf), list(adapters.values()), str(cache / CHAT_TEMPLATE_FILE), host, port,
                             program)
    if len(adapters) > 1:
        notes += ['llama-server applies no adapter unless a request names one, as "lora": [{"id": N, "scale": 1.0}]: '
                  + ", ".join(f"{i} = {name}" for i, name in enumerate(adapters))]
    return EngineCommand(argv, notes)


def _served_runs(folders: list[Path], engine: str) -> list[RunFolder]:
    if not folders:
        latest = RunFolder.latest()
        if latest is None:
            raise AffinerError("no run folder given and none found under runs/; train one with: affiner run, "
                               f"or pass the run folder: affiner serve runs/NAME --engine {engine}")
        folders = [latest.path]
    runs = [RunFolder.open(folder).require_finished(f"serve it with --engine {engine}") for folder in folders]
    for run in runs:
        if run.config().method == "full":
            raise AffinerError(f"{run} is a full fine-tune, and --engine {engine} serves LoRA adapters on their base. "
                               "Serve it with --engine affiner, or export it (affiner export RUN --output DIR --gguf) "
                               "and start the engine on that model.")
    return runs


def stop_notes(stops: dict[str, list]) -> list[str]:
    """What a client of an engine must send besides the prompt: the strings that open a new turn of a text
    template (the engines stop on the template's stop tokens only)."""
    if not stops["stop"]:
        return []
    return [f"add \"stop\": {json_text(stops['stop'], indent=None).strip()} to each request: the model may go on with a new "
            "turn of its prompt format (see stop.json)"]


def _gguf_files(runs: list[RunFolder], configs: list[RunConfig], names: list[str], template: Template, tokenizer,
                cache: Path, gguf_type: str) -> tuple[Path, dict[str, str]]:
    """The base GGUF (under the first run) and each run's adapter GGUF, written unless a start before wrote them."""
    adapters = {}
    for name, run, config in zip(names, runs, configs):
        path = run / ENGINE_CACHE / "llama.cpp" / ADAPTER_GGUF
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            with _written_whole(path) as partial:
                write_adapter_gguf(run, config, partial)
        adapters[name] = str(path)
    base_gguf = cache / f"base-{gguf_type}.gguf"  # after the adapters, which refuse what llama.cpp cannot apply
    if not base_gguf.is_file():
        with _written_whole(base_gguf) as partial:
            write_base_gguf(runs[0], configs[0], template, tokenizer, partial, gguf_type)
    return base_gguf, adapters


@contextmanager
def _written_whole(path: Path) -> Iterator[Path]:
    """A partial file that becomes `path` only once written: an interrupted start leaves no half GGUF to reuse."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
