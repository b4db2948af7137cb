"""Talk to a tuned model in the terminal, through the run's own prompt template.

    affiner chat runs/quickstart-20261122-183000
    affiner chat runs/quickstart-20261122-183000 --prompt "What does QUILT stand for?"
    affiner chat runs/quickstart-20261122-183000 --base     # the same prompt, without the adapter
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from affiner.evaluate import tuned_model
from affiner.models import device, load_model, load_tokenizer
from affiner.runs import latest_run, load_run_config, require_run
from affiner.errors import AffinerError
from affiner.templates import Example, encode_prompt, load_template


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", nargs="?", help="run folder (default: the latest under runs/)")
    parser.add_argument("--prompt", help="answer this one prompt and exit")
    parser.add_argument("--base", action="store_true", help="use the base model, without the adapter")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")


def main(args: argparse.Namespace) -> None:
    folder = Path(args.run) if args.run else latest_run()
    if folder is None:
        raise AffinerError("no run folder given and none found under runs/; train one with: affiner run")
    folder = require_run(folder)
    config = load_run_config(folder)
    template = load_template(folder)
    tokenizer = load_tokenizer(str(folder))
    model = load_model(config.model.base, quantization=config.quantization) if args.base else tuned_model(folder, config)
    from transformers import TextStreamer

    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    def answer(text: str) -> None:
        ids = torch.tensor([encode_prompt(template, tokenizer, Example(instruction=text))], device=device())
        sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                       eos_token_id=list(template.stop_token_ids), pad_token_id=tokenizer.pad_token_id,
                       streamer=streamer, **sampling)

    if args.prompt is not None:
        answer(args.prompt)
        return
    print(f"Chatting with {'the base of ' if args.base else ''}{folder} ('exit' or 'quit' to leave).")
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            break
        if text in {"exit", "quit"}:
            break
        if text:
            try:
                answer(text)
            except KeyboardInterrupt:
                print()
