"""The output head in chunks of supervised positions: the same losses and gradients as the whole head, so a
large vocabulary (Gemma's 262,144 tokens) no longer needs every answer token's logits at once."""

from __future__ import annotations

import pytest
import torch

from affiner.core import loss
from affiner.core.config import load_config
from conftest import write_config


@pytest.mark.parametrize("chunk", [3, 7, 10 ** 6], ids=["chunks-of-3", "chunks-of-7", "whole"])
def test_chunked_head_gives_the_whole_heads_losses_and_gradients(tmp_path, tiny_gemma, monkeypatch, chunk):
    from affiner.data.tokens import collate
    from affiner.training.setup import prepare_model

    config = load_config(str(write_config(tmp_path, tiny_gemma, "embedded:glossary-train.json")))
    model = prepare_model(config)
    torch.manual_seed(0)
    ids = torch.randint(5, 200, (3, 12))
    labels = ids.clone()
    labels[:, :4] = loss.IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    def losses_and_gradients(head_chunk: int):
        monkeypatch.setattr(loss, "HEAD_CHUNK", head_chunk)
        model.zero_grad(set_to_none=True)
        losses, rows = loss.token_losses(model, batch)
        (losses * torch.linspace(0.5, 1.5, losses.numel())).sum().backward()  # uneven weights: exact per token
        return losses.detach(), rows, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole, rows, whole_grads = losses_and_gradients(10 ** 9)
    chunked, chunk_rows, grads = losses_and_gradients(chunk)
    assert torch.equal(rows, chunk_rows) and len(whole) == 3 * 8  # labels shift by one: 8 answer tokens a row
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    assert grads.keys() == whole_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], whole_grads[name], rtol=1e-4, atol=1e-6)  # fp32 summation order


def test_a_held_out_loss_is_chunked_even_when_the_head_could_train(tiny_gemma, monkeypatch):
    """A model as from_pretrained returns it has trainable weights; without gradients its head's logits must still
    be computed a chunk at a time (the whole batch's fp32 logits were 11.7 GB for 32 instruct answers)."""
    from affiner.core.models import load_model

    model = load_model(str(tiny_gemma))
    assert model.get_output_embeddings().weight.requires_grad
    ids = torch.randint(5, 200, (3, 12))
    labels = ids.clone()
    labels[:, :4] = loss.IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        whole, _ = loss.token_losses(model, batch)
    rows_at_once = []
    real_head = model.get_output_embeddings().forward
    monkeypatch.setattr(model.get_output_embeddings(), "forward", lambda x: rows_at_once.append(x.shape[0]) or real_head(x))
    monkeypatch.setattr(loss, "HEAD_CHUNK", 5)
    with torch.no_grad():
        chunked, _ = loss.token_losses(model, batch)
    assert rows_at_once == [5, 5, 5, 5, 4]  # 24 answer tokens, five at a time
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
