"""The supervised loss: cross-entropy on answer tokens only, shared by training and the held-out loss.

Labels are -100 (IGNORE_INDEX) on prompt and padding positions, so only the answer (and its stop
token) is learnt and scored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every supervised token, and the batch row each belongs to.

    Logits are computed only where a label exists: with a 262k-token vocabulary (Gemma) the output
    head costs more than the whole transformer, and the prompt's logits are never used.
    """
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(hf_model, hf_model.base_model_prefix, None)
    head = hf_model.get_output_embeddings()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    if body is None or head is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
    else:
        hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = _softcap(hf_model.config, head(hidden[:, :-1][mask]))
    losses = F.cross_entropy(logits.float(), labels[mask], reduction="none")
    return losses, mask.nonzero()[:, 0]


def supervised_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over supervised tokens, and how many there are."""
    losses, _ = token_losses(model, batch)
    return losses.sum(), losses.numel()


def supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _softcap(config, logits: torch.Tensor) -> torch.Tensor:
    cap = getattr(config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap
