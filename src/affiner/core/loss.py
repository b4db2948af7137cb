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
        losses = F.cross_entropy(logits.float(), labels[mask], reduction="none")
    else:
        hidden = body(**inputs).last_hidden_state[:, :-1][mask]

        def head_losses(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            logits = output_scaling(hf_model.config, head(rows))
            return F.cross_entropy(logits.float(), targets, reduction="none")

        losses = chunked_losses(head_losses, hidden, labels[mask], any(p.requires_grad for p in head.parameters()))
    return losses, mask.nonzero()[:, 0]


# Supervised positions whose logits exist at once: with Gemma's 262,144-token vocabulary, 1024 positions are
# 1 GiB of fp32 logits, whatever the batch's number of answer tokens.
HEAD_CHUNK = 1024


def chunked_losses(head_losses, hidden: torch.Tensor, labels: torch.Tensor, head_trains: bool) -> torch.Tensor:
    """`head_losses(hidden, labels)`, computed HEAD_CHUNK positions at a time so that the logits of a whole
    batch never exist together. A head trained by this pass (full fine-tuning) takes the plain path: its weight's
    gradient needs every chunk's logits in the backward. Without gradients (a held-out loss) a head whose weights
    merely could train (a model as `from_pretrained` returns it) is chunked too: the plain path there held the
    fp32 logits of every answer token of the batch at once (a peak of 11.7 GB for 32 instruct answers; 3.9 GB
    chunked)."""
    head_needs_every_logit = head_trains and torch.is_grad_enabled()
    if head_needs_every_logit or hidden.shape[0] <= HEAD_CHUNK:
        return head_losses(hidden, labels)
    if not (torch.is_grad_enabled() and hidden.requires_grad):
        return torch.cat([head_losses(hidden[i:i + HEAD_CHUNK], labels[i:i + HEAD_CHUNK])
                          for i in range(0, hidden.shape[0], HEAD_CHUNK)])
    return _ChunkedHead.apply(hidden, labels, head_losses)


class _ChunkedHead(torch.autograd.Function):
    """The head's losses with their gradient taken chunk by chunk in the forward (as Liger's fused linear
    cross-entropy does): the backward only scales the stored gradients, so no logits are recomputed and the
    arithmetic is that of the plain path. Valid because the head itself is frozen: only `hidden` gets a gradient."""

    @staticmethod
    def forward(ctx, hidden, labels, head_losses):
        losses, gradients = [], []
        for start in range(0, hidden.shape[0], HEAD_CHUNK):
            rows = hidden[start:start + HEAD_CHUNK].detach().requires_grad_(True)
            with torch.enable_grad():
                chunk = head_losses(rows, labels[start:start + HEAD_CHUNK])
                # One backward per chunk, for the sum: each row's gradient is its own token's, so scaling
                # it by that token's incoming gradient in `backward` is exact.
                (gradient,) = torch.autograd.grad(chunk.sum(), rows)
            losses.append(chunk.detach())
            gradients.append(gradient)
        ctx.save_for_backward(torch.cat(gradients))
        return torch.cat(losses)

    @staticmethod
    def backward(ctx, grad_losses):
        (gradients,) = ctx.saved_tensors
        return gradients * grad_losses.unsqueeze(1).to(gradients.dtype), None, None


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
