"""The output head in chunks of supervised positions: the same losses and gradients as the whole head, so a
large vocabulary (Gemma's 262,144 tokens) no longer needs every answer token's logits at once."""

from __future__ import annotations

import contextlib

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
        # fp32 rounding: chunks of other shapes multiply and sum in another order (1.5e-6 seen on one element once)
        torch.testing.assert_close(grads[name], whole_grads[name], rtol=1e-4, atol=1e-5)


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


HEAD_SETTINGS = [({}, "plain"), ({"logits_scaling": 4.0}, "granite"), ({"final_logit_softcapping": 3.0}, "softcap"),
                 ({"logit_scale": 2.0, "final_logit_softcapping": 5.0}, "scale-and-softcap")]


def _written_and_plain(settings: dict, monkeypatch, bias: bool = False) -> tuple:
    """A frozen head's losses, and the gradient of their weighted sum, by `head_losses` (in chunks of 7) and by
    autograd through the head and `output_scaling`, whole; and how many chunks went through the head module."""
    from types import SimpleNamespace

    config = SimpleNamespace(model_type="test", **settings)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=bias).requires_grad_(False)
    hidden, targets, weights = torch.randn(23, 16) * 3, torch.randint(0, 300, (23,)), torch.linspace(0.5, 1.5, 23)
    monkeypatch.setattr(loss, "HEAD_CHUNK", 7)

    def losses_and_gradient(compute) -> tuple[torch.Tensor, torch.Tensor]:
        rows = hidden.clone().requires_grad_(True)
        losses = compute(rows)
        (losses * weights).sum().backward()
        return losses.detach(), rows.grad

    calls = []
    handle = head.register_forward_hook(lambda *_: calls.append(1))
    written = losses_and_gradient(lambda rows: loss.head_losses(config, head, rows, targets))
    handle.remove()
    plain = losses_and_gradient(lambda rows: torch.nn.functional.cross_entropy(
        loss.output_scaling(config, head(rows)), targets, reduction="none"))
    return written, plain, len(calls)


@pytest.mark.parametrize("settings", [s for s, _ in HEAD_SETTINGS], ids=[name for _, name in HEAD_SETTINGS])
def test_a_frozen_heads_written_out_gradient_is_autograds(settings, monkeypatch):
    """Training through a frozen linear head: losses and gradient computed by hand (softmax - one-hot, through the
    model's scaling and soft cap), never through the module, equal to autograd's."""
    (losses, gradient), (plain_losses, plain_gradient), through_module = _written_and_plain(settings, monkeypatch)
    assert through_module == 0
    torch.testing.assert_close(losses, plain_losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gradient, plain_gradient, rtol=1e-4, atol=1e-6)


def test_a_head_that_is_not_a_plain_linear_layer_goes_through_autograd(monkeypatch):
    (losses, gradient), (plain_losses, plain_gradient), through_module = _written_and_plain({}, monkeypatch, bias=True)
    assert through_module == 4  # 23 rows in chunks of 7
    torch.testing.assert_close(losses, plain_losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gradient, plain_gradient, rtol=1e-4, atol=1e-6)


def test_a_batch_without_answer_tokens_still_has_a_gradient_graph():
    """A process whose share of the last batch is empty still runs its backward (the others wait for it)."""
    from types import SimpleNamespace

    head = torch.nn.Linear(16, 300, bias=False).requires_grad_(False)
    rows = torch.zeros(0, 16, requires_grad=True)
    losses = loss.head_losses(SimpleNamespace(model_type="test"), head, rows, torch.zeros(0, dtype=torch.long))
    losses.sum().backward()
    assert losses.shape == (0,) and rows.grad is not None and rows.grad.shape == (0, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_written_out_heads_kept_buffers_never_leak_from_one_batch_into_the_next(dtype, monkeypatch):
    """Batches of 23, then 5 (views of the kept buffers), then 40 rows (they grow), then 23 again, then 23 after the
    buffers were given back: each batch's losses and gradient are autograd's through the head, whatever came before."""
    from types import SimpleNamespace

    config = SimpleNamespace(model_type="test", final_logit_softcapping=5.0)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False).to(dtype).requires_grad_(False)
    monkeypatch.setattr(loss, "HEAD_CHUNK", 64)
    with contextlib.ExitStack() as training:
        training.enter_context(loss.kept_head_buffers())
        for rows in (23, 5, 40, 23, 0, 23):
            if not rows:  # a training ends (its buffers given back) and another begins
                training.close()
                training.enter_context(loss.kept_head_buffers())
                continue
            hidden, targets = (torch.randn(rows, 16) * 3).to(dtype), torch.randint(0, 300, (rows,))
            results = []
            for compute in (lambda h: loss.head_losses(config, head, h, targets),
                            lambda h: torch.nn.functional.cross_entropy(
                                loss.output_scaling(config, head(h)).float(), targets, reduction="none")):
                h = hidden.clone().requires_grad_(True)
                losses = compute(h)
                (losses * torch.linspace(0.5, 1.5, rows)).sum().backward()
                results.append((losses.detach(), h.grad.float()))
            (written, written_gradient), (expected, expected_gradient) = results
            tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
            torch.testing.assert_close(written, expected, **tolerance)
            torch.testing.assert_close(written_gradient, expected_gradient, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_probe_during_training_scores_in_the_kept_buffers_and_an_evaluation_through_the_head(dtype, monkeypatch):
    """Held-out losses without gradient: while training keeps the head's buffers (a probe between steps) they are
    made in those buffers, never through the head module, including a chunk larger than any trained one; once
    training gave them back (an evaluation) they go through the head. Either way they are cross-entropy's."""
    from types import SimpleNamespace

    config = SimpleNamespace(model_type="test", final_logit_softcapping=5.0)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False).to(dtype).requires_grad_(False)
    monkeypatch.setattr(loss, "HEAD_CHUNK", 32)
    through_module = []
    head.register_forward_hook(lambda *_: through_module.append(1))
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}

    def held_out(rows: int) -> None:
        hidden, targets = (torch.randn(rows, 16) * 3).to(dtype), torch.randint(0, 300, (rows,))
        through_module.clear()
        with torch.no_grad():
            losses = loss.head_losses(config, head, hidden, targets)
        expected = torch.nn.functional.cross_entropy(loss.output_scaling(config, head(hidden)).float(), targets,
                                                     reduction="none")
        torch.testing.assert_close(losses, expected, **tolerance)

    with loss.kept_head_buffers():
        trained = (torch.randn(10, 16) * 3).to(dtype).requires_grad_(True)
        loss.head_losses(config, head, trained, torch.randint(0, 300, (10,))).sum().backward()  # a training step
        for rows in (7, 45):
            held_out(rows)
            assert through_module == [1]  # only the expected losses' call: the probe's went around the module
    held_out(45)
    assert through_module == [1, 1, 1]  # after training: 45 rows through the module in chunks of 32, then the expected
