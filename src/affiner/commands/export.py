"""Export a finished run: the adapter, the merged model, GGUF for llama.cpp/Ollama, a model card, the Hub.

    affiner export runs/quickstart-20261122-183000 --output exports/glossary
    affiner export runs/quickstart-20261122-183000 --output exports/glossary --merged --gguf
    affiner export runs/quickstart-20261122-183000 --output exports/glossary --merged --dtype bf16 --merge-device auto
    affiner export runs/quickstart-20261122-183000 --output exports/glossary --gguf --gguf-type q8_0 --overwrite
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
and an Ollama `Modelfile` (architectures: llama, gemma3, gpt2), written from the fp32 weights.
`--push ORG/NAME` uploads the folder to a private Hub repository (public with `--public`) with the
token of HF_TOKEN or `hf auth login`, which affiner never prints or saves.

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
    parser.add_argument("--gguf-type", metavar="TYPE", help="f32 (default), f16 or q8_0")
    parser.add_argument("--push", metavar="ORG/NAME", help="upload the export to this Hub repository (private)")
    parser.add_argument("--public", action="store_true", help="with --push: create the repository public")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export in DIR once the new one is complete")


def main(args: argparse.Namespace) -> None:
    from affiner.export.export import export

    export(Path(args.run), Path(args.output), merged=args.merged, gguf=args.gguf, gguf_type=args.gguf_type,
           push=args.push, public=args.public, overwrite=args.overwrite, merge_device=args.merge_device,
           dtype=args.dtype)
