"""The supervised loss: cross-entropy on answer tokens only, shared by training and the held-out loss.

Labels are -100 (IGNORE_INDEX) on prompt and padding positions, so only the answer (and its stop
token) is learnt and scored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
        losses = head_losses(hf_model.config, head, hidden, labels[mask])
    return losses, mask.nonzero()[:, 0]


# Supervised positions whose logits exist at once: with Gemma's 262,144-token vocabulary, 1024 positions are
# 1 GiB of fp32 logits, whatever the batch's number of answer tokens.
HEAD_CHUNK = 1024


def head_losses(config, head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The cross-entropy of each row of `hidden` through the output `head` (with the model's own `output_scaling`),
    computed HEAD_CHUNK rows at a time so that the logits of a whole batch never exist together.

    Training through a frozen plain linear head (LoRA, QLoRA) takes the written-out path below. A head trained by this
    pass (full fine-tuning) takes the plain path: its weight's gradient needs every chunk's logits in the backward.
    Without gradients (a held-out loss) a head whose weights merely could train (a model as `from_pretrained`
    returns it) is chunked too: the plain path there held the fp32 logits of every answer token of the batch at
    once (a peak of 11.7 GB for 32 instruct answers; 3.9 GB chunked); within `kept_head_buffers` on a CPU it is
    written out too, without the gradient. A process with no answer token in its share of a batch takes the plain
    path, whose empty graph still joins the other processes' gradient exchange."""
    def plain(rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output_scaling(config, head(rows)).float(), labels, reduction="none")

    head_trains = any(p.requires_grad for p in head.parameters()) and torch.is_grad_enabled()
    needs_gradient = torch.is_grad_enabled() and hidden.requires_grad
    weight = _plain_weight(head) if WRITTEN_OUT_HEAD and not head_trains and len(hidden) else None
    if weight is not None and needs_gradient:
        return _ChunkedHead.apply(hidden, targets, _written_out(weight, *logit_transform(config), hidden.device.type))
    if weight is not None and _workspace is not None and hidden.device.type == "cpu":
        # Held-out losses in kept buffers (a probe borrows the training's): cross-entropy's fresh GBs per chunk were
        # faulted in page by page. 6 instruct steps with 3 probes, alternating: 117.8, 107.5 s -> 94.3, 89.8 s,
        # minor faults 9.8 M -> 1.8 M, peak RSS 7.74 -> 5.63-5.71 GB (bench/train_against.py --probe-every 2);
        # the instruct run's held-out losses, base and tuned (evaluate --max-new-tokens 1 --no-general): 134.4 ->
        # 108.0 s, faults 20.0 M -> 3.6 M, the same losses (2.490, 2.274).
        written = _written_out(weight, *logit_transform(config), hidden.device.type, with_gradient=False)
        return _by_chunks(lambda rows, labels: written(rows, labels)[0], hidden, targets)
    if head_trains or hidden.shape[0] <= HEAD_CHUNK:
        return plain(hidden, targets)
    if not needs_gradient:
        return _by_chunks(plain, hidden, targets)
    return _ChunkedHead.apply(hidden, targets, _by_autograd(plain))


def _by_chunks(losses_of, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`losses_of` (no gradient) over HEAD_CHUNK rows at a time, concatenated."""
    return torch.cat([losses_of(hidden[i:i + HEAD_CHUNK], targets[i:i + HEAD_CHUNK])
                      for i in range(0, hidden.shape[0], HEAD_CHUNK)])


class _ChunkedHead(torch.autograd.Function):
    """The head's losses with their gradient taken chunk by chunk in the forward (as Liger's fused linear
    cross-entropy does): the backward only scales the stored gradients, so no logits are recomputed and the
    arithmetic is that of the plain path. Valid because the head itself is frozen: only `hidden` gets a gradient."""

    @staticmethod
    def forward(ctx, hidden, labels, losses_and_gradient):
        losses, gradients = [], []
        for start in range(0, hidden.shape[0], HEAD_CHUNK):
            chunk, gradient = losses_and_gradient(hidden[start:start + HEAD_CHUNK].detach(),
                                                  labels[start:start + HEAD_CHUNK])
            losses.append(chunk)
            gradients.append(gradient)
        ctx.save_for_backward(torch.cat(gradients))
        return torch.cat(losses)

    @staticmethod
    def backward(ctx, grad_losses):
        (gradients,) = ctx.saved_tensors
        return gradients * grad_losses.unsqueeze(1).to(gradients.dtype), None, None


def _by_autograd(losses_of):
    """`losses_of`'s per-chunk losses and their gradient by autograd: one backward per chunk, for the sum (each row's
    gradient is its own token's, so scaling it by that token's incoming gradient in the backward is exact)."""
    def losses_and_gradient(rows: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = rows.requires_grad_(True)
        with torch.enable_grad():
            losses = losses_of(rows, labels)
            (gradient,) = torch.autograd.grad(losses.sum(), rows)
        return losses.detach(), gradient
    return losses_and_gradient


# A frozen bias-free linear head (every causal LM's, unless LoRA targets it) has its training losses and gradient
# written out rather than taken by autograd: cross-entropy's gradient is softmax - one-hot, so a chunk's logits are
# made once and turned into the gradient in place. With a 262,144-token vocabulary the head's elementwise passes
# over [positions x vocabulary] fp32 tensors cost about as much as its two matrix products, and autograd's path
# makes more of them (cast, log-softmax, its backward's temporaries, the cast back). Measured on Gemma 3 270M, bf16,
# LoRA, 2 cores: the instruct recipe's first 6 batches (742-1002 answer tokens), alternating in one process
# (bench/head_speed.py), 37.6 s -> 32.2 s (1.17x); 12 steps of `affiner train instruct`, old and new in
# alternating processes, 78.9 + 73.0 s -> 59.8 + 63.9 s (1.23x); losses equal to 1e-5. Compiling the written-out
# function (torch.compile) measured no faster for ~7 s of compilation on a fresh machine, so it is not compiled.
# A held-out loss (no gradient) is made in place too within a span of kept buffers (a probe during training, an
# evaluation's held-out losses: see head_losses), else by the plain path's cross-entropy.
WRITTEN_OUT_HEAD = True  # False: autograd through the head, chunk by chunk (what bench/head_speed.py compares)


def _plain_weight(head: torch.nn.Module) -> torch.Tensor | None:
    """The head's weight when the head is a plain bias-free linear layer (not a LoRA wrapper, not quantised)."""
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    return head.weight.detach() if type(head.weight) in (torch.Tensor, torch.nn.Parameter) else None


def _written_out(weight: torch.Tensor, scale: float, cap: float | None, device_type: str,
                 with_gradient: bool = True):
    """The per-chunk losses and gradient of a frozen linear head computed by hand, in the autocast dtype when
    autocast is on (as the model's own head would compute), in place in the buffers of `_head_workspace`;
    without `with_gradient`, the losses alone (and None)."""
    if torch.is_autocast_enabled(device_type):
        weight = weight.to(torch.get_autocast_dtype(device_type))

    def losses_and_gradient(rows: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type, enabled=False), torch.no_grad():
            low, logits = _head_workspace(rows.shape[0], weight)
            torch.matmul(rows.to(weight.dtype), weight.T, out=low)
            if low is not logits:
                logits.copy_(low)
            if scale != 1.0:
                logits.mul_(scale)
            squash = None
            if cap is not None:  # capped = cap * tanh(scaled / cap), whose derivative is 1 - tanh²
                logits.div_(cap).tanh_()
                squash = 1 - logits.square()
                logits.mul_(cap)
            # log-softmax and softmax in place: log(sum(exp(x - top))) + top is the log-sum-exp
            picked = logits.gather(1, targets[:, None]).squeeze(1)
            top = logits.amax(dim=-1, keepdim=True)
            gradient = logits.sub_(top).exp_()
            total = gradient.sum(dim=-1, keepdim=True)
            losses = total.squeeze(1).log() + top.squeeze(1) - picked
            if not with_gradient:
                return losses, None
            gradient.div_(total)  # the softmax
            gradient[torch.arange(gradient.shape[0], device=gradient.device), targets] -= 1
            if squash is not None:
                gradient.mul_(squash)
            if scale != 1.0:
                gradient.mul_(scale)
            if low is not gradient:
                low.copy_(gradient)
            return losses, (low @ weight).to(rows.dtype)

    return losses_and_gradient


# The written-out head's [rows x vocabulary] buffers, kept from chunk to chunk and step to step on a CPU. Fresh, each
# chunk's GBs were mapped from the kernel and faulted in page by page (4 KiB at a time, zeroed), then given back.
# Measured by bench/train_against.py against the previous code (Gemma 3 270M, bf16, 2-core AMD EPYC, 8 steps of the
# instruct recipe, 2 rounds): training 165.3 s -> 111.0 s (1.49x), system time 40-44 s -> 12-13 s a process, minor
# page faults 6.0 M -> 1.8 M, peak RSS 6.05 -> 5.62 GB (/usr/bin/time); the quickstart's short answers: 1.04x.
# A GPU's caching allocator already reuses memory.
_workspace: dict[torch.dtype, torch.Tensor] | None = None  # within a kept_head_buffers span, else None


@contextlib.contextmanager
def kept_head_buffers() -> Iterator[None]:
    """The span of a training loop, or of a set of held-out losses: on a CPU the head's buffers are kept from chunk
    to chunk and step to step (a probe's losses borrow the training's); when the outermost span ends, however it
    ends, they are given back (GBs that a checkpoint, or what follows, has better use for). Outside any span a
    chunk's tensors are made for it."""
    global _workspace
    if _workspace is not None:  # within a training's span: its buffers serve
        yield
        return
    _workspace = {}
    try:
        yield
    finally:
        _workspace = None


def _head_workspace(rows: int, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows x vocabulary] tensors in the weight's dtype and in fp32 (one tensor for an fp32 weight): within a
    kept_head_buffers span on a CPU views of the kept buffers, grown by a chunk with more rows than any before;
    otherwise new ones."""
    keep = _workspace is not None and weight.device.type == "cpu"
    kept = _workspace.get(weight.dtype) if keep else None
    if kept is None or kept.shape[0] < rows or kept.shape[1] != weight.shape[0]:
        if keep:
            _workspace.clear()  # one model trains at a time: another's buffers are dropped first
        logits = torch.empty(rows, weight.shape[0], device=weight.device)
        low = logits if weight.dtype == torch.float32 else torch.empty_like(logits, dtype=weight.dtype)
        if not keep:
            return low, logits
        _workspace.update({torch.float32: logits, weight.dtype: low})
    return _workspace[weight.dtype][:rows], _workspace[torch.float32][:rows]


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
    scale, cap = logit_transform(config)
    if scale != 1.0:
        logits = logits * scale
    return logits if cap is None else torch.tanh(logits / cap) * cap


def logit_transform(config) -> tuple[float, float | None]:
    """`output_scaling` as numbers: the factor the head's output is multiplied by, and the soft cap (None: none)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    factor = 1.0
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None:
        multiplies = getattr(config, "model_type", None) in MULTIPLIES_LOGITS_SCALING
        factor = factor * scaling if multiplies else factor / scaling
    scale = getattr(config, "logit_scale", None)
    if scale is not None:
        factor *= scale
    cap = getattr(config, "final_logit_softcapping", None)
    return float(factor), None if cap is None else float(cap)


