"""Export a finished run: adapter, merged model, GGUF, what vLLM/llama.cpp/Ollama need, a model card, the Hub.

    affiner export runs/quickstart-20261122-183000 --output exports/glossary
    affiner export runs/quickstart-20261122-183000 --output exports/glossary --merged --gguf
    affiner export runs/quickstart-20261122-183000 --output exports/glossary --merged --dtype bf16 --merge-device auto
    affiner export runs/quickstart-20261122-183000 --output exports/glossary --gguf --gguf-type q8_0 --overwrite
    affiner export runs/quickstart-20261122-183000 --output exports/glossary --for vllm,llama.cpp
    exports/glossary/serve-vllm.sh --port 8080           # or serve-llama-cpp.sh
    affiner export runs/llama-3.2-1b-glaive-qlora-20261122-183000 --output exports/glaive --for ollama
    exports/glaive/create-ollama.sh                      # Ollama applies adapters on llama and gpt2 bases, not Gemma 3
    HF_TOKEN=hf_... affiner export runs/quickstart-20261122-183000 --output exports/glossary --merged --push my-org/glossary-gemma
    ollama create glossary -f exports/glossary/Modelfile && ollama run glossary "What does QUILT stand for?"

The output folder always gets `adapter/` (a plain peft folder: adapter_model.safetensors,
adapter_config.json, the tokenizer and template.json; `model/` instead for a full fine-tune) and
`README.md`, a model card with Hub front matter: base model and licence, method and hyper-parameters,
data with its sha256 fingerprints, the prompt template, the evaluation against the base, and how to
load it. `--merged` adds `merged/`, base and adapter merged in fp32 (checked for NaN/inf and against
the unmerged model's logits) on the CPU, or on the GPU when there is one with `--merge-device auto`;
it is saved in the base model's own dtype as its config.json records it (fp32 when it records none),
or in the one `--dtype fp32|bf16|fp16` chooses: the same on every machine. `--gguf` adds `model.gguf`
and an Ollama `Modelfile` (architectures: llama, gemma3, gpt2), written from the fp32 weights in the
type `--gguf-type` names (default q4_0, 4-bit).
`--push ORG/NAME` uploads the folder to a private Hub repository (public with `--public`) with the
token of HF_TOKEN or `hf auth login`, which affiner never prints or saves.

`--for ENGINE` (repeatable, or a comma list) adds what a serving engine needs to serve the LoRA adapter
on its base with the prompt format it was trained with, and `stop.json` (the stop tokens, and for a text
template the strings that open a new turn, which clients should send as "stop"):

  vllm       chat_template.jinja (the run's prompt format, checked to give training's very token ids),
             vllm-config/generation_config.json (stops on the template's stop tokens), serve-vllm.sh:
             vllm serve BASE --enable-lora --lora-modules tuned=adapter --max-lora-rank R --chat-template ...
  llama.cpp  base.gguf (the base, unmerged) + adapter.gguf (the LoRA), chat_template.jinja, and
             serve-llama-cpp.sh: llama-server -m base.gguf --lora adapter.gguf --jinja --chat-template-file ...
  ollama     base.gguf + adapter.gguf, a Modelfile (FROM, ADAPTER, TEMPLATE, PARAMETER stop) and
             create-ollama.sh: ollama create NAME -f Modelfile (not with --gguf, which writes its own Modelfile)

The scripts run from their own folder (move the export anywhere) and pass their arguments on (--port
8080). llama.cpp and Ollama need a GGUF architecture (llama, gemma3, gpt2); a full fine-tune has no
adapter to hand over: use --gguf, or serve model/ as any model.

The export is written to a sibling folder and moved into place once complete: an existing output
folder is only replaced with --overwrite, and only when everything is written.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a finished run folder")
    parser.add_argument("--output", required=True, metavar="DIR", help="the export folder to create")
    parser.add_argument("--merged", action="store_true", help="also write merged/: base and adapter merged, safetensors")
    parser.add_argument("--merge-device", choices=["cpu", "auto"], default="cpu",
                        help="where the fp32 merge runs: cpu (default; an fp32 8B model needs 32 GB) or auto "
                             "(the GPU when there is one)")
    parser.add_argument("--dtype", choices=["base", "fp32", "bf16", "fp16"],
                        help="dtype of merged/ (or a full fine-tune's model/): base (default: the base model's "
                             "own, fp32 when its config records none), fp32, bf16 or fp16")
    parser.add_argument("--gguf", action="store_true", help="also write model.gguf and an Ollama Modelfile")
    parser.add_argument("--gguf-type", metavar="TYPE",
                        help="type of the GGUF weights (--gguf, --for llama.cpp/ollama): f32, f16, bf16, q8_0 or "
                             "q4_0 (default q4_0, 4-bit)")
    parser.add_argument("--for", dest="targets", action="append", metavar="ENGINE",
                        help="also write what this engine needs to serve the adapter: vllm, llama.cpp or ollama "
                             "(repeat it, or give a comma list)")
    parser.add_argument("--push", metavar="ORG/NAME", help="upload the export to this Hub repository (private)")
    parser.add_argument("--public", action="store_true", help="with --push: create the repository public")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export in DIR once the new one is complete")


def main(args: argparse.Namespace) -> None:
    from affiner.export.export import export

    export(Path(args.run), Path(args.output), merged=args.merged, gguf=args.gguf, gguf_type=args.gguf_type,
           push=args.push, public=args.public, overwrite=args.overwrite, merge_device=args.merge_device,
           dtype=args.dtype, targets=args.targets or ())
