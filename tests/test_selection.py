"""How long a run trains, which step's weights it keeps, when it stops early, and what it says about it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from affiner.core.config import load_config
from affiner.core.runfolder import RunFolder
from affiner.training import run as training
from affiner.training.batches import auto_epochs, passes_of, probe_interval, total_steps
from affiner.training.selection import Selection
from conftest import write_config


@pytest.mark.parametrize("rows, passes, steps", [
    (30, 23, 92),  # a small glossary: enough updates to learn it
    (240, 3, 90),  # the quickstart: its three passes, as tuned
    (2_000, 3, 750),
    (10_000, 2.4, 3000),  # large data: about 3000 steps
    (52_000, 1, 6500),  # Alpaca: one pass
])
def test_auto_epochs_give_small_data_enough_steps_and_large_data_one_pass(tmp_path, rows, passes, steps):
    config = load_config("quickstart", ["train.epochs=auto", "train.batch_size=8"])
    assert auto_epochs(-(-rows // 8)) == pytest.approx(passes, rel=1e-3)
    assert total_steps(config, rows) == steps
    assert total_steps(load_config("quickstart", ["train.epochs=2"]), rows) == 2 * -(-rows // 8)  # a number stays


def test_auto_epochs_with_accumulation_still_give_enough_steps_and_the_run_records_what_it_trained():
    """100 rows, 8 a micro-batch, 2 accumulated: 13 micro-batches, 6.5 steps per pass. `auto` gives at least 90
    steps (rounding the steps per pass up first gave 85), and the passes recorded are those the steps make."""
    config = load_config("quickstart", ["train.epochs=auto", "train.batch_size=8", "train.gradient_accumulation=2"])
    steps = total_steps(config, 100)
    assert steps >= 90 and passes_of(config, 100, steps) == pytest.approx(steps * 2 / 13)
    one_pass = load_config("quickstart", ["train.epochs=1", "train.batch_size=8", "train.gradient_accumulation=16"])
    assert total_steps(one_pass, 211) == 2 and passes_of(one_pass, 211, 2) == pytest.approx(32 / 27)  # not 1.0


def test_auto_probes_ten_times_per_run():
    config = load_config("quickstart")
    assert probe_interval(config, 90) == 9 and probe_interval(config, 5) == 1
    assert probe_interval(load_config("quickstart", ["eval.every_steps=4"]), 90) == 4


def test_selection_keeps_the_best_and_stops_after_patience():
    selection = Selection("loss", patience=2)
    assert [selection.record(step, {"eval_loss": loss}) for step, loss in
            [(1, 3.0), (2, 2.0), (3, 2.5)]] == [True, True, False]
    assert not selection.should_stop()
    selection.record(4, {"eval_loss": 2.2})
    assert selection.should_stop() and selection.summary() == {"by": "loss", "metric": "eval_loss", "step": 2,
                                                               "value": 2.0}
    higher = Selection("contains")
    assert higher.record(1, {"eval_contains": 0.5}) and not higher.record(2, {"eval_contains": 0.25})


def test_advice_says_when_the_run_stopped_too_early_or_went_on_too_long():
    rising = Selection("loss")
    for step, loss in [(10, 2.0), (20, 1.0), (30, 0.8)]:
        rising.record(step, {"eval_loss": loss})
    [advice] = rising.advice(30, stopped_early=False)
    assert "still improving" in advice and "1 at step 20 -> 0.8 at step 30" in advice and "train.epochs" in advice
    worse = Selection("loss")
    for step, loss in [(10, 2.0), (20, 1.0), (30, 1.2), (40, 1.5)]:
        worse.record(step, {"eval_loss": loss})
    [advice] = worse.advice(40, stopped_early=False)
    assert "worse than its best (1 at step 20) for the last 2 probes" in advice and "step 20's weights" in advice
    flat = Selection("loss")
    for step, loss in [(10, 2.0), (20, 1.0), (30, 0.999)]:
        flat.record(step, {"eval_loss": loss})
    assert flat.advice(30, stopped_early=False) == []  # converged: nothing to say


def test_a_resumed_selection_compares_with_the_best_before_the_interruption():
    selection = Selection("loss", patience=2)
    selection.restore({"by": "loss", "step": 4, "value": 1.5}, [(2, 2.0), (4, 1.5), (6, 1.7)], saved=True)
    assert not selection.record(8, {"eval_loss": 1.6}) and selection.should_stop()
    assert selection.keeps_best(8) and not selection.keeps_best(4)


def scripted_probe(losses: list[float]):
    """A probe factory whose held-out loss follows a script, one value per probe."""
    def factory(run, config, template, tokenizer):
        values = iter(losses)
        return lambda model: {"eval_loss": next(values)}
    return factory


def test_the_run_keeps_the_best_step_and_stops_early(tmp_path, tiny_gpt2, capsys):
    config = write_config(tmp_path, tiny_gpt2, "embedded:glossary-train.json",
                          train={"max_steps": 10, "patience": 2, "save_steps": 1, "save_total_limit": 20},
                          eval={"every_steps": 1, "max_new_tokens": 4})
    folder = training.train(load_config(str(config)), probe_factory=scripted_probe([3.0, 2.0, 2.5, 2.6, 9.0]))
    info = RunFolder(folder).info()
    assert info["status"] == "finished" and info["steps"] == 4 and info["planned_steps"] == 10
    assert info["best"] == {"by": "loss", "metric": "eval_loss", "step": 2, "value": 2.0, "kept": True}
    assert "train.patience" in info["stopped_early"]
    kept = load_file(folder / "adapter_model.safetensors")
    at_step_2 = load_file(folder / "checkpoints" / "step-000002" / "adapter_model.safetensors")
    at_step_3 = load_file(folder / "checkpoints" / "step-000003" / "adapter_model.safetensors")
    assert all(torch.equal(kept[k], at_step_2[k]) for k in kept)
    assert not all(torch.equal(kept[k], at_step_3[k]) for k in kept)  # the steps after it did change the weights
    assert not (folder / "checkpoints" / "best").exists()
    assert "worse than its best (2 at step 2) for the last 2 probes" in capsys.readouterr().err
    assert info["advice"] and "step 2's weights are the run's" in info["advice"][0]
    assert "| weights kept | step 2, best held-out loss (2) |" in (folder / "README.md").read_text()


def test_keep_best_false_keeps_the_last_step(tmp_path, tiny_gpt2):
    config = write_config(tmp_path, tiny_gpt2, "embedded:glossary-train.json",
                          train={"max_steps": 3, "keep_best": False, "save_steps": 1, "save_total_limit": 20},
                          eval={"every_steps": 1, "max_new_tokens": 4})
    folder = training.train(load_config(str(config)), probe_factory=scripted_probe([1.0, 2.0, 3.0]))
    info = RunFolder(folder).info()
    assert info["best"]["step"] == 1 and info["best"]["kept"] is False and info["steps"] == 3
    final = load_file(folder / "adapter_model.safetensors")
    at_step_1 = load_file(folder / "checkpoints" / "step-000001" / "adapter_model.safetensors")
    assert not all(torch.equal(final[k], at_step_1[k]) for k in final)
    log = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval_loss"] for r in log if "eval_loss" in r] == [1.0, 2.0, 3.0]
