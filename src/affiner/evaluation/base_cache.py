"""The base model's part of an evaluation, kept for the next one: its answers and held-out losses depend only
on its weights, the questions, the template and the decoding, never on the run evaluated. A sweep of eight runs
of one base, or a run evaluated again, answers with the base once (as lm-evaluation-harness caches a model's
responses). The key is computed from the loaded weights themselves (names, shapes, dtypes and bytes), so a
changed checkpoint, precision or quantisation never meets an older entry; it also holds the model's config
(a revision may change only its activation or positions), the token ids of every question and reference (a
tokenizer fix changes them), the torch and transformers versions and the device kind, whose kernels may round
differently, and the source of affiner's own code that answers and scores (a change of how answers are cut
must not meet answers cut the old way).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from affiner.core import decoding, loss, models, stopping, templates
from affiner.core.files import read_json, write_json
from affiner.core.files import cache_root
from affiner.core.settings import Settings
from affiner.core.templates import Example, Template
from affiner.data import tokens
from affiner.data.tokens import tokenize
from affiner.evaluation import general as general_set, generation, scoring
from affiner.evaluation.generation import Answer

FOLDER = "base-evaluations"


@torch.no_grad()
def weights_fingerprint(model) -> str:
    """What the model computes with: every tensor's name, shape, dtype and bytes, hashed (blake2b: about a second
    for a 270M model on a CPU, against minutes of answers saved)."""
    digest = hashlib.blake2b(digest_size=32)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().data)
    return digest.hexdigest()


def cache_key(model, tokenizer, template: Template, examples: list[Example], general: list[Example], limit: int,
              batch_size: int, sampling: Settings) -> str:
    import transformers

    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    parts = {"weights": weights_fingerprint(model), "config": config, "device": next(model.parameters()).device.type,
             "torch": torch.__version__, "transformers": transformers.__version__, "code": code_fingerprint(),
             "template": template.__dict__, "limit": limit, "batch_size": batch_size, "sampling": sampling.__dict__,
             "questions": [_fields(e) for e in examples], "general": [_fields(e) for e in general],
             "ids": [f["input_ids"] for f in tokenize(examples + general, template, tokenizer)],
             "special ids": [tokenizer.pad_token_id, *template.stop_token_ids, len(tokenizer)]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def code_fingerprint() -> str:
    """The source of the modules that make and score the base's answers, hashed: the general set's answer limit
    (general) and how a reference past the context is cut (models) among them."""
    digest = hashlib.blake2b(digest_size=16)
    for module in (decoding, stopping, templates, loss, generation, scoring, tokens, general_set, models):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def _fields(example: Example) -> list:
    return [example.instruction, example.input, list(example.history), example.response, example.expected]


def folder() -> Path:
    """$AFFINER_CACHE/base-evaluations: one JSON file per key, safe to delete."""
    return cache_root() / FOLDER


def _path(key: str) -> Path:
    return folder() / f"{key}.json"


def load(key: str, questions: int, general: int) -> dict[str, Any] | None:
    """{"answers", "losses", "seconds", "general"} as an earlier evaluation left them for `questions` task and
    `general` general-set questions, or None: absent, or damaged (cut short, edited), answered again and rewritten."""
    path = _path(key)
    try:
        saved = read_json(path)
        kept = {"answers": _answers(saved["answers"], questions), "losses": _losses(saved["losses"], questions),
                "seconds": float(saved["seconds"]),
                "general": (_answers(saved["general"][0], general), _losses(saved["general"][1], general))
                if general else None}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return kept


def _answers(saved: list, count: int) -> list[Answer]:
    answers = [Answer(**a) for a in saved]
    if len(answers) != count or not all(isinstance(a.text, str) and type(a.tokens) is int and a.tokens >= 0
                                        and isinstance(a.stopped, bool) and isinstance(a.new_turn, bool)
                                        for a in answers):
        raise ValueError("not the answers asked for")
    return answers


def _losses(saved: list, count: int) -> tuple[list, list]:
    """Each answer's summed loss and token count; ([], []) where no row had a reference to score."""
    sums, counts = saved
    if (len(sums), len(counts)) not in {(count, count), (0, 0)} or not all(
            (s is None or isinstance(s, (int, float))) and type(c) is int for s, c in zip(sums, counts)):  # NaN: null
        raise ValueError("not the losses asked for")
    return sums, counts


def save(key: str, answers: list[Answer], losses: tuple, seconds: float, general: tuple | None) -> None:
    try:
        folder().mkdir(parents=True, exist_ok=True)
        write_json(_path(key), {"answers": [a.__dict__ for a in answers], "losses": list(losses), "seconds": seconds,
                                "general": [[a.__dict__ for a in general[0]], list(general[1])] if general else None})
    except OSError:  # a read-only cache costs the next evaluation time, never this one
        pass
