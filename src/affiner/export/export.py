"""Export a finished run: check everything that can fail, write the export in a staging folder beside
the output, and move it into place only once it is complete.

What goes in the folder is written by the modules beside this one: `merge` (the tuned model),
`ollama` (GGUF files and the Modelfile), `engines` (what vLLM, llama.cpp and Ollama need to serve the
adapter: `--for`), `card` (README.md) and `hub` (licence, the push).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from collections.abc import Iterable
from pathlib import Path

import torch

from affiner.core.card import hub_id, shown
from affiner.core.config import RunConfig
from affiner.core.errors import AffinerError, damaged
from affiner.core.files import (check_replaceable, folder_written_whole, read_json, write_atomic,
                                write_json)
from affiner.core.gguf_cache import save_tokenizer
from affiner.core.models import model_type_of, tokenizer_for
from affiner.core.runfolder import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RunFolder
from affiner.core.templates import Template, save_template
from affiner.export.card import CARD_FILE, Launch, model_card
from affiner.export.engines import (ADAPTER_GGUF, BASE_GGUF, CHAT_TEMPLATE_FILE, GGUF_ENGINES, SCRIPTS, STOP_FILE,
                                    TUNED_NAME, VLLM_CONFIG_DIR, chat_template, check_chat_template, llama_server_argv,
                                    ollama_argv, parse_targets, portable_base, stop_notes, stop_settings, vllm_argv,
                                    with_run_chat_template, write_generation_config, write_script)
from affiner.export.gguf_writer import DEFAULT_GGUF_TYPE, GGUF_TYPES
from affiner.export.hub import check_push, push_folder
from affiner.export.merge import (check_finite_adapter, example_of, resolve_merge_device, save_model,
                                  saved_dtype, tuned_model)
from affiner.export.ollama import (GGUF_FILE, MODELFILE, check_gguf_architecture, modelfile, slug, write_adapter_gguf,
                                   write_base_gguf, write_gguf_files)

EXPORT_FILE = "export.json"  # what was exported from which run; marks a folder --overwrite may replace
SERVED_AT = "the OpenAI API on http://127.0.0.1:8000/v1"  # where every --for script's server listens by default
SERVED_MODELS = f"the base as model `base` and the adapter as model `{TUNED_NAME}`, {SERVED_AT}"


@dataclass(frozen=True)
class ModelOptions:
    """How the tuned model is built and saved: where it is merged, and the dtype of merged/ or model/."""
    merge_device: str = "cpu"
    dtype: torch.dtype = torch.float32


def export(run: Path, output: Path, merged: bool = False, gguf: bool = False, gguf_type: str | None = None,
           push: str | None = None, public: bool = False, overwrite: bool = False, merge_device: str = "cpu",
           dtype: str | None = None, targets: Iterable[str] = ()) -> Path:
    """Write the export folder and optionally upload it; returns the folder. Everything that can fail on
    bad input is checked before anything is written. `merge_device` is cpu or auto (the GPU when there
    is one); `dtype` (base, fp32, bf16 or fp16; base when None) is the one merged/ or model/ is saved in;
    `targets` are the engines of --for (vllm, llama.cpp, ollama, or comma lists of them)."""
    folder = RunFolder.open(run).require_finished("export it")
    config = folder.config()
    template = folder.template()
    output = Path(output)
    targets = parse_targets(targets)
    gguf_type = _check_options(gguf, gguf_type, targets, push, public)
    _check_targets(targets, config, gguf)
    if dtype is not None and not (merged or config.method == "full"):
        raise AffinerError("--dtype only applies with --merged (or to a full fine-tune's model/).")
    resolve_merge_device(merge_device)  # refuses an unknown choice before anything is loaded
    options = ModelOptions(merge_device, saved_dtype(dtype or "base", config) if merged or config.method == "full"
                           else torch.float32)
    check_output(output, folder.path, overwrite)
    if gguf:
        check_gguf_architecture(folder, config)
    _check_gguf_targets(folder, config, targets)
    if push:
        check_push(push)
    with folder_written_whole(output) as staging:
        written = _write_export(staging, output, folder, config, template, merged, gguf, gguf_type, push, options,
                                targets)
    print(f"Export: {output} ({', '.join(written)})")
    if push:
        url = push_folder(output, push, private=not public, message=f"affiner export of {folder}",
                          ignore=[EXPORT_FILE])
        print(f"Pushed to {url} ({'public' if public else 'private'})")
    return output


def _check_options(gguf: bool, gguf_type: str | None, targets: tuple[str, ...], push: str | None,
                   public: bool) -> str:
    """The GGUF type to write (DEFAULT_GGUF_TYPE unless asked), after refusing options that make no sense
    together."""
    if gguf_type is not None and not (gguf or any(t in GGUF_ENGINES for t in targets)):
        raise AffinerError("--gguf-type only applies with --gguf or --for llama.cpp/ollama.")
    gguf_type = gguf_type or DEFAULT_GGUF_TYPE
    if gguf_type not in GGUF_TYPES:
        raise AffinerError(f"unknown --gguf-type '{gguf_type}'; supported: {', '.join(GGUF_TYPES)}.")
    if public and not push:
        raise AffinerError("--public only applies with --push ORG/NAME.")
    return gguf_type


def check_output(output: Path, run: Path, overwrite: bool) -> None:
    """The output may be new, or an earlier export with --overwrite; never the run folder or inside it."""
    target, source = output.resolve(), run.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise AffinerError(f"--output {output} overlaps the run folder {run}; choose a folder outside it.")
    check_replaceable(output, overwrite, EXPORT_FILE, "export")


def _write_export(target: Path, output: Path, run: RunFolder, config: RunConfig, template: Template, merged: bool,
                  gguf: bool, gguf_type: str, push: str | None, options: ModelOptions,
                  targets: tuple[str, ...] = ()) -> list[str]:
    """Every file of the export in `target`; returns what was written, for the card and the summary line."""
    full = config.method == "full"
    if full and merged:
        print("note: a full fine-tune has no adapter to merge; model/ is the whole tuned model.")
    tokenizer = with_run_chat_template(tokenizer_for(config, run.path), template)
    written, record, launches = [], {}, {}
    if not full:
        _write_adapter(run, config, template, tokenizer, target / "adapter")
        written.append("adapter/")
    if targets:
        written += _write_for_engines(target, run, config, template, tokenizer, targets, gguf_type, launches)
    model = tuned_model(run.path, config, tokenizer, template, options.merge_device) if full or merged or gguf \
        else None
    if model is not None:
        record["merge_device"] = model.device.type
    gguf_report = None
    if gguf:  # from the fp32 weights, before save_model casts them to the dtype asked for
        gguf_report = write_gguf_files(model, tokenizer, template, config, run, target, gguf_type)
        written += [GGUF_FILE, MODELFILE]
    if full or merged:
        sub = "model" if full else "merged"
        save_model(model, tokenizer, template, target / sub, options.dtype)
        written.append(f"{sub}/")
        record["dtype"] = str(options.dtype).removeprefix("torch.")
        print(f"note: {sub}/ was {'merged' if merged and not full else 'checked'} in float32 on "
              f"{record['merge_device']} and saved in {record['dtype']}.")
    del model  # the card needs no model; free its memory before the last files
    write_atomic(target / CARD_FILE, model_card(run, config, template, tokenizer, written, push, gguf_report, launches))
    written.append(CARD_FILE)
    files = {str(p.relative_to(target)): p.stat().st_size for p in sorted(target.rglob("*")) if p.is_file()}
    write_json(target / EXPORT_FILE, {"run": str(run), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                                      "base": config.model.base, "method": config.method, **record, "files": files})
    return written


def _write_adapter(run: RunFolder, config: RunConfig, template: Template, tokenizer, target: Path) -> None:
    """The run's adapter as a plain peft folder, with the base model named so others can find it."""
    check_finite_adapter(run.path)
    target.mkdir(parents=True)
    # A copy into the staging folder, which replace_folder swaps in whole: no file is ever seen half written.
    shutil.copyfile(run / ADAPTER_WEIGHTS, target / ADAPTER_WEIGHTS)
    try:
        adapter_config = read_json(run / ADAPTER_CONFIG)
    except (ValueError, UnicodeDecodeError) as exc:
        raise damaged("LoRA adapter", run.path, exc) from None
    if not isinstance(adapter_config, dict):
        raise damaged("LoRA adapter", run.path, ValueError(f"{ADAPTER_CONFIG} holds no JSON object"))
    # A path of this machine would be pushed with the export: named by its last part, as the card names it.
    adapter_config["base_model_name_or_path"] = hub_id(config.model.base) or shown(config.model.base)
    adapter_config["revision"] = config.model.revision
    write_json(target / ADAPTER_CONFIG, adapter_config)
    save_tokenizer(tokenizer, target)
    save_template(template, target)


# ---------------------------------------------------------------------------------------- --for


def _check_targets(targets: tuple[str, ...], config: RunConfig, gguf: bool) -> None:
    """Refuse what --for cannot do for this run, before anything is written."""
    if not targets:
        return
    if config.method == "full":
        raise AffinerError(f"--for {','.join(targets)} serves a LoRA adapter on its base, and this run is a full "
                           "fine-tune, which has none. Export it with --gguf for llama.cpp and Ollama (model.gguf "
                           "and its Modelfile), and serve model/ with vLLM as any model: vllm serve EXPORT/model.")
    if gguf and "ollama" in targets:
        raise AffinerError("--gguf and --for ollama both write a Modelfile (--gguf for the merged model.gguf, "
                           "--for ollama for base.gguf with adapter.gguf); choose one.")


# Architectures Ollama runs only on its own engine (fs/ggml OllamaEngineRequired), whose runner refuses adapters
# (runner/ollamarunner: "loras are not yet implemented"), as of Ollama 0.22.
OLLAMA_WITHOUT_ADAPTERS = ("gemma3",)


def _check_gguf_targets(run: RunFolder, config: RunConfig, targets: tuple[str, ...]) -> None:
    """llama.cpp and Ollama need the base as GGUF: refuse an architecture the writer cannot write, naming --for."""
    gguf_targets = [t for t in targets if t in GGUF_ENGINES]
    if gguf_targets:
        try:
            check_gguf_architecture(run, config)
        except AffinerError as exc:
            raise AffinerError(f"--for {','.join(gguf_targets)} needs the base model as GGUF: {exc}") from None
    if "ollama" not in targets:  # the base's config is read only for Ollama: an adapter export needs no base
        return
    kind = model_type_of(config.model.base, config.model.revision, config.model.trust_remote_code) or ""
    if kind.startswith(OLLAMA_WITHOUT_ADAPTERS):
        raise AffinerError(f"--for ollama: Ollama runs {kind} models on its own engine, which does not apply LoRA "
                           "adapters (`ollama create` succeeds, the first answer fails: \"loras are not yet "
                           "implemented\"). Export --gguf instead: the merged model.gguf with its Modelfile, which "
                           "Ollama runs as it is (or --for llama.cpp, which applies the adapter).")


def _write_for_engines(target: Path, run: RunFolder, config: RunConfig, template: Template, tokenizer,
                      targets: tuple[str, ...], gguf_type: str, launches: dict[str, Launch]) -> list[str]:
    """Each engine's files in `target` (the export's staging folder, whose adapter/ vLLM loads); returns
    what was written, and puts each launch script's command in `launches` for the card."""
    stops = stop_settings(template, tokenizer)
    write_json(target / STOP_FILE, stops)
    written = [STOP_FILE]
    if "vllm" in targets or "llama.cpp" in targets:
        jinja = chat_template(template, tokenizer)
        check_chat_template(jinja, template, tokenizer)
        write_atomic(target / CHAT_TEMPLATE_FILE, jinja)
        written.append(CHAT_TEMPLATE_FILE)
    if "vllm" in targets:
        write_generation_config(target / VLLM_CONFIG_DIR, stops)
        argv = vllm_argv(portable_base(config.model.base), {TUNED_NAME: "adapter"}, config.lora.r,
                         CHAT_TEMPLATE_FILE, VLLM_CONFIG_DIR, revision=config.model.revision,
                         trust_remote_code=config.model.trust_remote_code, quantized=config.method == "qlora")
        write_script(target / SCRIPTS["vllm"], argv, vllm_script_comments(stops, config.model.base))
        # The card names the base as the config does (a GGUF file, not this machine's conversion of it), and says
        # when the weights vLLM loads are not the very ones trained.
        shown_argv = [config.model.base if arg == argv[2] and not hub_id(arg) else arg for arg in argv]
        caveat = [f"the base is {argv[2]}, the original of the 4-bit weights trained on: answers can differ a "
                  "little"] if config.model.base.startswith("embedded:") else []
        launches[SCRIPTS["vllm"]] = Launch("vLLM (a CUDA GPU, pip install vllm)", shown_argv,
                                           "; ".join([SERVED_MODELS, *caveat, *stop_notes(stops)]))
        written += [f"{VLLM_CONFIG_DIR}/", SCRIPTS["vllm"]]
    if any(t in GGUF_ENGINES for t in targets):
        write_adapter_gguf(run, config, target / ADAPTER_GGUF)  # first: it refuses what llama.cpp cannot apply
        write_base_gguf(run, config, template, tokenizer, target / BASE_GGUF, gguf_type)
        written += [BASE_GGUF, ADAPTER_GGUF]
    if "llama.cpp" in targets:
        argv = llama_server_argv(BASE_GGUF, [ADAPTER_GGUF], CHAT_TEMPLATE_FILE)
        write_script(target / SCRIPTS["llama.cpp"], argv, _llama_cpp_comments(stops))
        launches[SCRIPTS["llama.cpp"]] = Launch("llama.cpp's llama-server", argv, "; ".join(
            [f"the adapter applied to {BASE_GGUF}, {SERVED_AT}", *stop_notes(stops)]))
        written.append(SCRIPTS["llama.cpp"])
    if "ollama" in targets:
        written += _write_ollama(target, run, template, tokenizer, launches)
    return written


def vllm_script_comments(stops: dict[str, list], base: str) -> list[str]:
    substitute = [f"The adapter was trained on {base}, the 4-bit (Q4_K_M) weights affiner ships, dequantised;",
                  f"{portable_base(base)} holds the original weights, so answers can differ a little from the run's.",
                  "For the very weights trained, export --merged and serve that folder: vllm serve merged"] \
        if base.startswith("embedded:") else []
    return ["vLLM with the LoRA adapter of this export: the base is served as \"base\", the adapter as \"tuned\",",
            "on http://127.0.0.1:8000/v1; arguments given to this script are passed on (e.g. --port 8080).",
            "Needs a CUDA GPU and vLLM: pip install vllm.", *substitute, *stop_notes(stops)]


def _llama_cpp_comments(stops: dict[str, list]) -> list[str]:
    return ["llama.cpp's server with the LoRA adapter applied to base.gguf, on http://127.0.0.1:8000/v1;",
            "arguments given to this script are passed on (e.g. --port 8080, -ngl 99 for a GPU).",
            "llama-server comes with llama.cpp: https://github.com/ggml-org/llama.cpp", *stop_notes(stops)]


def _write_ollama(target: Path, run: RunFolder, template: Template, tokenizer, launches: dict[str, Launch]) -> list[str]:
    write_atomic(target / MODELFILE, modelfile(template, tokenizer, run.name, model_file=BASE_GGUF,
                                               adapter_file=ADAPTER_GGUF,
                                               question=example_of(run, template, tokenizer).instruction))
    name = slug(run.name)
    write_script(target / SCRIPTS["ollama"], ollama_argv(name, MODELFILE),
                 [f"Creates the Ollama model {name} from base.gguf and adapter.gguf; then: ollama run {name}"])
    launches[SCRIPTS["ollama"]] = Launch("Ollama", ollama_argv(name, MODELFILE),
                                         f"the model {name} (base.gguf with adapter.gguf); then: ollama run {name}")
    return [MODELFILE, SCRIPTS["ollama"]]
