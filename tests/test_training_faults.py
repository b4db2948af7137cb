"""Training that goes wrong stops cleanly: a non-finite loss or an out-of-memory error gives one paragraph,
keeps the last good step as a checkpoint, marks the run failed, and the run can be resumed."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli, write_config
from safetensors.torch import load_file

from affiner.core import loss
from affiner.core.config import load_config
from affiner.core.errors import AffinerError
from affiner.core.runfolder import RunFolder
from affiner.experiments.workflow import train
from affiner.training import loop


def fail_on_call(monkeypatch, number: int, failure):
    """Make the `number`-th optimizer step's gradient computation end with `failure` (a value or an exception)."""
    real, calls = loop.accumulate_gradients, []

    def accumulate(*args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            if isinstance(failure, Exception):
                raise failure
            real(*args, **kwargs)
            return failure
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "accumulate_gradients", accumulate)


def only_run(tmp_path) -> RunFolder:
    return RunFolder(next((tmp_path / "runs").iterdir()))


@pytest.mark.parametrize("failure, expected", [
    ((float("nan"), 12), "training stopped at step 3 .*the loss is nan.*train.learning_rate"),
    ((float("inf"), 12), "training stopped at step 3 .*the loss is inf"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
     "out of memory on cpu at step 3 .*train.batch_size.*data.max_length.*gradient_checkpointing.*qlora"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4294967296 bytes. Error code 12 "
                  "(Cannot allocate memory)"),  # how torch says it on a CPU
     "out of memory on cpu at step 3 .*train.batch_size"),
], ids=["nan", "inf", "gpu-out-of-memory", "cpu-out-of-memory"])
def test_a_failing_step_keeps_the_last_good_one(tmp_path, tiny_gpt2, qa_file, monkeypatch, failure, expected):
    config = load_config(str(write_config(tmp_path, tiny_gpt2, qa_file, train={"max_steps": 5})))
    fail_on_call(monkeypatch, 3, failure)
    with pytest.raises(AffinerError, match=expected):
        train(config)
    run = only_run(tmp_path)
    info = run.info()
    assert info["status"] == "failed" and info["step"] == 2 and "step 3" in info["error"]
    assert [c.name for c in run.checkpoints()] == ["step-000002"]
    assert [r["step"] for r in run.log()] == [1, 2]
    assert not run.has_adapter  # no adapter is presented as the result of a failed run

    monkeypatch.undo()
    train(resume=run.path)  # the last good step resumes and finishes
    assert run.is_finished and run.has_adapter and [r["step"] for r in run.log()] == [1, 2, 3, 4, 5]


def test_an_unforeseen_error_propagates_and_the_heads_buffers_are_given_back(tmp_path, tiny_gpt2, qa_file,
                                                                            monkeypatch):
    """An error training does not handle propagates as it is, after the head's kept buffers (GBs with Gemma's
    vocabulary) were given back: a held-out loss computed next (a sweep's next point, the caller's evaluation)
    goes through the head as outside training, nothing of the failed run kept."""
    from types import SimpleNamespace

    config = load_config(str(write_config(tmp_path, tiny_gpt2, qa_file, train={"max_steps": 5})))
    fail_on_call(monkeypatch, 3, RuntimeError("a bug in a custom model's forward"))
    with pytest.raises(RuntimeError, match="a bug in a custom model's forward"):
        train(config)
    head, through_module = torch.nn.Linear(8, 50, bias=False).requires_grad_(False), []
    head.register_forward_hook(lambda *_: through_module.append(1))
    with torch.no_grad():
        loss.head_losses(SimpleNamespace(model_type="test"), head, torch.randn(4, 8), torch.randint(0, 50, (4,)))
    assert through_module == [1]


def test_the_command_line_gives_one_paragraph_and_exit_2(tmp_path, tiny_gpt2, qa_file, monkeypatch, capsys):
    config = write_config(tmp_path, tiny_gpt2, qa_file, train={"max_steps": 3})
    fail_on_call(monkeypatch, 1, (float("nan"), 12))
    assert run_cli("train", str(config)) == 2
    err = capsys.readouterr().err
    assert "affiner train: error: training stopped at step 1" in err and "nothing to resume" in err
    assert "Traceback" not in err and len([line for line in err.splitlines() if "error:" in line]) == 1
    assert only_run(tmp_path).status == "failed" and not only_run(tmp_path).checkpoints()


def test_non_finite_weights_are_not_kept_as_a_checkpoint(tmp_path, tiny_gpt2, qa_file, monkeypatch):
    """Weights already broken when the loss turns NaN are not saved over the last good checkpoint."""
    config = load_config(str(write_config(tmp_path, tiny_gpt2, qa_file, train={"max_steps": 4, "save_steps": 1})))
    real, calls = loop.accumulate_gradients, []

    def poison_then_fail(model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # after step 2 was checkpointed, a weight turns NaN and the loss shows it
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
            return float("nan"), 12
        return real(model, *args, **kwargs)

    monkeypatch.setattr(loop, "accumulate_gradients", poison_then_fail)
    with pytest.raises(AffinerError, match=r"training stopped at step 3 .*step-000002 are kept"):
        train(config)
    run = only_run(tmp_path)
    assert [c.name for c in run.checkpoints()] == ["step-000001", "step-000002"]
    weights = load_file(run.checkpoints()[-1] / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())  # step 2 as it was saved, not overwritten
    assert run.info()["step"] == 2 and run.status == "failed"


def test_a_full_disk_while_saving_a_checkpoint_stops_cleanly_and_resumes(tmp_path, tiny_gpt2, qa_file, monkeypatch,
                                                                         capsys):
    """torch.save says a full disk as a RuntimeError naming no file: training stops as for any failed write (one
    paragraph naming the checkpoint, exit 2, the last whole checkpoint kept), and resumes once there is space."""
    config = write_config(tmp_path, tiny_gpt2, qa_file, train={"max_steps": 4, "save_steps": 1})
    real, calls = torch.save, []

    def full_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # step 2's optimizer state (step 1 wrote its state and its random state)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1152 vs 1046")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    assert run_cli("train", str(config)) == 2
    err = capsys.readouterr().err
    assert "training stopped after step 2: " in err and "step-000002.partial" in err and "Traceback" not in err
    assert "affiner train --resume" in err
    run = only_run(tmp_path)
    assert [c.name for c in run.checkpoints()] == ["step-000001"] and run.status == "failed"
    monkeypatch.undo()
    assert run_cli("train", "--resume", str(run.path)) == 0
    assert run.is_finished and [r["step"] for r in run.log()] == [1, 2, 3, 4]


def fail_on_step_bookkeeping(monkeypatch, failing_step: int):
    """Make logging the record of `failing_step` (after its probe) run out of memory, once."""
    real, failed = loop.log_metrics, []

    def log_metrics(run, record, trackers):
        if record["step"] == failing_step and not failed:
            failed.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated, in the step's bookkeeping)")
        return real(run, record, trackers)

    monkeypatch.setattr(loop, "log_metrics", log_metrics)


@pytest.mark.parametrize("where", ["in the next step's forward", "in the step's probe and log"])
def test_a_run_resumed_after_running_out_of_memory_equals_the_uninterrupted_one(tmp_path, tiny_gpt2, qa_file,
                                                                                monkeypatch, where):
    """Dropout drawn from the random state, probes every 2 steps: the resumed run logs every step and every probe,
    with the losses of the run that never stopped (the checkpoint holds the random state after its own step)."""
    sections = dict(lora={"r": 4, "alpha": 8, "dropout": 0.3}, train={"max_steps": 6, "save_steps": 2},
                    eval={"every_steps": 2, "max_questions": 2})
    whole = train(load_config(str(write_config(tmp_path / "whole", tiny_gpt2, qa_file, **sections))))
    config = load_config(str(write_config(tmp_path / "stopped", tiny_gpt2, qa_file, **sections)))
    if where == "in the next step's forward":
        real, calls = loop.accumulate_gradients, []

        def forward_then_out_of_memory(*args, **kwargs):  # as a backward runs out: dropout masks drawn already
            calls.append(1)
            result = real(*args, **kwargs)
            if len(calls) == 5:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return result

        monkeypatch.setattr(loop, "accumulate_gradients", forward_then_out_of_memory)
        expected = "out of memory on cpu at step 5 "
    else:
        fail_on_step_bookkeeping(monkeypatch, 4)
        expected = "out of memory on cpu at step 4 "
    with pytest.raises(AffinerError, match=expected):
        train(config)
    monkeypatch.undo()
    run = only_run(tmp_path / "stopped")
    train(resume=run.path)
    log, whole_log = run.log(), RunFolder(whole).log()
    assert [r["step"] for r in log] == [r["step"] for r in whole_log] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "eval_loss"):
        assert [r.get(key) for r in log] == pytest.approx([r.get(key) for r in whole_log], abs=1e-6), key
