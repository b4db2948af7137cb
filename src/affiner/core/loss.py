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
    head costs more than the whole transformer, and the prompt's logits are never used. Calling the
    body and head directly skips what the model's own forward does after its head: `output_scaling`.
    """
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(hf_model, hf_model.base_model_prefix, None)
    head = hf_model.get_output_embeddings()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    # No KV cache: a scored sequence is never continued, and building one costs memory in training.
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if body is None or head is None:
        logits = model(**inputs).logits[:, :-1][mask]
    else:
        hidden = body(**inputs).last_hidden_state
        logits = output_scaling(hf_model.config, head(hidden[:, :-1][mask]))
    losses = F.cross_entropy(logits.float(), labels[mask], reduction="none")
    return losses, mask.nonzero()[:, 0]


def supervised_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over supervised tokens, and how many there are."""
    losses, _ = token_losses(model, batch)
    return losses.sum(), losses.numel()


def supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


# Model types whose forward multiplies the logits by `logits_scaling` where Granite divides by it: HyperCLOVAX
# (µP; transformers 5 modeling_hyperclovax.py: `logits = self.lm_head(hidden_states) * self.config.logits_scaling`).
MULTIPLIES_LOGITS_SCALING = frozenset({"hyperclovax"})


def output_scaling(config, logits: torch.Tensor) -> torch.Tensor:
    """What the model's own `...ForCausalLM.forward` does to its head's output, as in transformers 5:

    - Granite (granite, granitemoe*, granite_swa): `logits = logits / self.config.logits_scaling`
      (modeling_granite.py, GraniteForCausalLM.forward); MiniCPM3 divides the hidden states by its
      `logits_scaling` before its bias-free head, which is the same.
    - Cohere, Cohere2 (and cohere2_moe): `logits = logits * self.logit_scale`, with
      `self.logit_scale = config.logit_scale` (modeling_cohere.py, CohereForCausalLM).
    - Gemma 2 and 3: soft-capping by `final_logit_softcapping` (modeling_gemma3.py).

    The text config holds these settings in multimodal models (Gemma 3, Granite vision).
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None:
        multiplies = getattr(config, "model_type", None) in MULTIPLIES_LOGITS_SCALING
        logits = logits * scaling if multiplies else logits / scaling
    scale = getattr(config, "logit_scale", None)
    if scale is not None:
        logits = logits * scale
    return _softcap(config, logits)


def _softcap(config, logits: torch.Tensor) -> torch.Tensor:
    cap = getattr(config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap
