"""Training invariants on tiny models (after PEFT's own tests)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from affiner.core.loss import supervised_loss
from affiner.core.runfolder import RunFolder
from affiner.experiments import workflow as train_mod
from affiner.training import checkpoints
from affiner.training import loop as loop_mod
from affiner.training.checkpoints import AUTO_SAVE_SECONDS, AUTO_SAVE_SHARE, checkpoint_due
from affiner.training.loop import accumulate_gradients
from affiner.training.stops import Interrupted
from affiner.training.setup import make_scheduler, prepare_model
from affiner.core.config import load_config
from affiner.data.formats import to_examples
from affiner.data.read import read_rows
from affiner.data.tokens import collate, tokenize
from affiner.core.errors import AffinerError
from affiner.core.models import default_target_modules, load_model, load_tokenizer
from affiner.core.files import read_json, read_jsonl
from affiner.core.templates import build_template
from conftest import write_config


def _batch(folder, n=4):
    tokenizer = load_tokenizer(str(folder))
    examples = to_examples(read_rows("embedded:glossary-train.json"))[:n]
    return collate(tokenize(examples, build_template("qa", tokenizer), tokenizer), tokenizer.pad_token_id)


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama", "tiny_gemma"])
def test_response_only_loss_equals_the_models_own_loss(request, fixture):
    folder = request.getfixturevalue(fixture)
    model = load_model(str(folder))
    batch = _batch(folder)
    loss_sum, n = supervised_loss(model, batch)
    reference = model(**batch).loss  # transformers' mean over supervised tokens, full logits
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(loss_sum / n, reference, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_equals_one_large_batch(tiny_llama):
    config = load_config(None, ["data.train=x", f"model.base={tiny_llama}"])
    batch = _batch(tiny_llama, n=4)
    halves = [{k: v[:1] for k, v in batch.items()}, {k: v[1:] for k, v in batch.items()}]  # unequal token counts

    def grads(batches):
        torch.manual_seed(0)
        model = prepare_model(config)
        accumulate_gradients(model, batches)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    whole, accumulated = grads([batch]), grads(halves)
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-4, atol=1e-7)


def test_default_targets_per_architecture(tiny_gpt2, tiny_llama):
    assert default_target_modules(load_model(str(tiny_gpt2))) == ["c_attn", "c_fc", "c_proj"]
    assert default_target_modules(load_model(str(tiny_llama))) == \
        ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_only_lora_weights_change_and_they_do(request, tmp_path, fixture):
    base = request.getfixturevalue(fixture)
    folder = train_mod.train(load_config(str(write_config(tmp_path, base, "embedded:glossary-train.json"))))
    before = load_model(str(base)).state_dict()
    adapter = load_file(folder / "adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter)
    assert all(value.abs().sum() > 0 for key, value in adapter.items() if "lora_B" in key)  # B starts at zero
    tuned = load_model(str(base), adapter=folder)
    for name, value in tuned.get_base_model().state_dict().items():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=f"{name} changed")


def test_adapter_reloads_with_plain_peft_to_identical_logits_and_disables_to_base(tmp_path, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = load_config(str(write_config(tmp_path, tiny_llama, "embedded:glossary-train.json")))
    folder = train_mod.train(config)
    batch = _batch(tiny_llama, 2)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    ours = load_model(str(tiny_llama), adapter=folder)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(folder)).eval()
    base = load_model(str(tiny_llama))
    with torch.no_grad():
        tuned_logits = ours(**inputs).logits
        torch.testing.assert_close(plain(**inputs).logits, tuned_logits)
        with ours.disable_adapter():
            torch.testing.assert_close(ours(**inputs).logits, base(**inputs).logits)
        assert not torch.allclose(tuned_logits, base(**inputs).logits)


def test_run_folder_describes_itself(tmp_path, tiny_gpt2):
    folder = train_mod.train(load_config(str(write_config(tmp_path, tiny_gpt2, "embedded:glossary-train.json"))))
    for name in ["adapter_model.safetensors", "adapter_config.json", "config.yaml", "template.json", "data.json",
                 "metrics.jsonl", "run.json", "tokenizer_config.json", "test_examples.json"]:
        assert (folder / name).is_file(), name
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["loss"] > 0 and m["learning_rate"] >= 0 and m["tokens"] > 0 for m in metrics)
    data = read_json(folder / "data.json")
    assert len(data["train"]["sha256"]) == 64 and data["test"]["examples"] > 0
    assert read_json(folder / "run.json")["status"] == "finished"
    assert json.loads((folder / "template.json").read_text())["name"] == "qa"


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no-dropout", "dropout"])
def test_resume_after_interruption_ends_where_an_uninterrupted_run_ends(tmp_path, tiny_llama, interrupt_training,
                                                                         dropout):
    """Ctrl-C lets the step end, then saves its weights and random state: with dropout drawing random masks,
    the resumed run still ends exactly where the uninterrupted one does."""
    settings = {"train": {"max_steps": 4, "save_steps": 2, "learning_rate": 1e-2},
                "lora": {"r": 4, "alpha": 8, "dropout": dropout}}
    straight = train_mod.train(load_config(str(write_config(tmp_path / "a", tiny_llama,
                                                            "embedded:glossary-train.json", **settings))))
    interrupt_training(3)
    with pytest.raises(AffinerError, match="interrupted after step 3.*--resume"):
        train_mod.train(load_config(str(write_config(tmp_path / "b", tiny_llama,
                                                     "embedded:glossary-train.json", **settings))))
    interrupt_training.disarm()
    interrupted = next((tmp_path / "b" / "runs").iterdir())
    assert read_json(interrupted / "run.json")["status"] == "interrupted"
    assert RunFolder(interrupted).last_checkpoint().name == "step-000003"
    train_mod.train(resume=interrupted)
    expected, resumed = load_file(straight / "adapter_model.safetensors"), load_file(interrupted / "adapter_model.safetensors")
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0)
    logged, straight_log = read_jsonl(interrupted / "metrics.jsonl"), read_jsonl(straight / "metrics.jsonl")
    assert [r["loss"] for r in logged] == [r["loss"] for r in straight_log]  # each step logged once, as if never stopped
    assert [r["learning_rate"] for r in logged] == [r["learning_rate"] for r in straight_log]
    seconds = [r["seconds"] for r in logged]  # the training before the interruption counts in the run's time
    assert seconds == sorted(seconds) and read_json(interrupted / "run.json")["train_seconds"] >= seconds[2]
    info = read_json(interrupted / "run.json")
    assert info["status"] == "finished" and info["step"] == info["steps"] == 4  # not the step it was stopped at
    with pytest.raises(AffinerError, match="already finished"):
        train_mod.train(resume=interrupted)


def test_a_run_resumed_in_another_precision_says_so_and_records_both(tmp_path, tiny_llama, interrupt_training,
                                                                      monkeypatch, capsys):
    """precision auto decides per machine: a run stopped on one and resumed on another must not pass off its
    first steps as trained in the second one's precision."""
    interrupt_training(2)
    with pytest.raises(AffinerError, match="interrupted after step 2"):
        train_mod.train(load_config(str(write_config(tmp_path, tiny_llama, "embedded:glossary-train.json",
                                                     train={"max_steps": 4, "save_steps": 2}))))
    interrupt_training.disarm()
    run = RunFolder(next((tmp_path / "runs").iterdir()))
    assert run.info()["precision"] == "float32"
    monkeypatch.setenv("AFFINER_CPU_BF16", "1")  # the machine it resumes on computes in bf16
    capsys.readouterr()
    train_mod.train(resume=run.path)
    assert "this run trained in float32 up to step 2; it goes on in bfloat16" in capsys.readouterr().err
    info = run.info()
    assert info["precision"] == "bfloat16" and info["precision_before"] == [{"precision": "float32", "until_step": 2}]


def test_sigterm_saves_the_step_as_ctrl_c_does(tmp_path, tiny_llama, monkeypatch, capsys):
    """A Slurm time limit or a stopped container sends SIGTERM: without a train.save_steps checkpoint yet, the
    steps trained so far were all lost."""
    real_log = loop_mod.log_metrics

    def log_then_terminate(folder, record, trackers):
        real_log(folder, record, trackers)
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # Slurm and torchrun each send one: still one request, not two

    monkeypatch.setattr(loop_mod, "log_metrics", log_then_terminate)
    with pytest.raises(Interrupted, match="interrupted after step 2.*--resume"):
        train_mod.train(load_config(str(write_config(tmp_path, tiny_llama, "embedded:glossary-train.json",
                                                     train={"max_steps": 4}))))
    assert "asked to stop (SIGTERM): stopping after this step" in capsys.readouterr().err
    run = RunFolder(next((tmp_path / "runs").iterdir()))
    assert run.status == "interrupted" and run.last_checkpoint().name == "step-000002"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # given back once training ends


def test_ctrl_c_twice_stops_at_once_and_keeps_the_last_saved_checkpoint(tmp_path, tiny_llama, interrupt_training):
    settings = {"train": {"max_steps": 6, "save_steps": 2, "learning_rate": 1e-2}}
    interrupt_training(3, times=2)  # while step 3 is being logged: its checkpoint is never written
    with pytest.raises(AffinerError, match="at once during step 3.*step-000002 are kept"):
        train_mod.train(load_config(str(write_config(tmp_path, tiny_llama, "embedded:glossary-train.json",
                                                     **settings))))
    run = RunFolder(next((tmp_path / "runs").iterdir()))
    assert run.status == "interrupted" and run.last_checkpoint().name == "step-000002"


def test_ctrl_c_during_the_last_step_finishes_the_run_then_stops_what_follows(tmp_path, tiny_llama,
                                                                              interrupt_training):
    """The run is complete (nothing to resume), but the Ctrl-C is not lost: `affiner run` must not go on to
    evaluate, a sweep must not train its next point."""
    interrupt_training(4)
    with pytest.raises(Interrupted, match="finished \\(4 steps\\) as Ctrl-C came.*affiner evaluate"):
        train_mod.train(load_config(str(write_config(tmp_path, tiny_llama, "embedded:glossary-train.json",
                                                     train={"max_steps": 4}))))
    run = RunFolder(next((tmp_path / "runs").iterdir()))
    assert run.is_finished and run.has_adapter and run.info()["steps"] == 4


def test_ctrl_c_while_the_run_is_written_lets_it_finish_whole(tmp_path, tiny_gpt2, monkeypatch):
    """Pressed while the adapter is being saved, Ctrl-C still leaves a finished run with its card and curves."""
    real_save = loop_mod.save_model

    def save_then_ctrl_c(*args, **kwargs):
        real_save(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(loop_mod, "save_model", save_then_ctrl_c)
    with pytest.raises(Interrupted, match="run is complete"):
        train_mod.train(load_config(str(write_config(tmp_path, tiny_gpt2, "embedded:glossary-train.json",
                                                     train={"max_steps": 2}))))
    folder = next((tmp_path / "runs").iterdir())
    assert RunFolder(folder).is_finished and (folder / "README.md").is_file() and (folder / "loss.png").is_file()


def test_checkpoints_respect_the_limit(tmp_path, tiny_gpt2):
    config = write_config(tmp_path, tiny_gpt2, "embedded:glossary-train.json",
                          train={"max_steps": 7, "save_steps": 2, "save_total_limit": 2})
    folder = train_mod.train(load_config(str(config)))
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["step-000004", "step-000006"]


def test_checkpoint_due_every_n_steps_or_by_the_clock():
    assert [step for step in range(1, 9) if checkpoint_due(3, step, 0.0, 0.0)] == [3, 6]
    assert not any(checkpoint_due(None, step, 1e9, 0.0) for step in range(1, 9))
    assert not checkpoint_due("auto", 5, AUTO_SAVE_SECONDS - 1, 0.0)
    assert checkpoint_due("auto", 5, AUTO_SAVE_SECONDS, 0.0)
    slow = AUTO_SAVE_SECONDS / 2  # a checkpoint slow to write (a full fine-tune's): the next one waits longer
    assert not checkpoint_due("auto", 5, AUTO_SAVE_SHARE * slow - 1, slow)
    assert checkpoint_due("auto", 5, AUTO_SAVE_SHARE * slow, slow)


def test_checkpoints_come_by_the_clock_by_default(tmp_path, tiny_gpt2, monkeypatch):
    """train.save_steps auto, the default: a run of seconds pays for no checkpoint; once the interval has passed
    since the last one, the step just trained is saved, so a kill -9 loses at most that interval."""
    short = load_config(str(write_config(tmp_path / "short", tiny_gpt2, "embedded:glossary-train.json",
                                         train={"max_steps": 4})))
    assert short.train.save_steps == "auto"
    assert RunFolder(train_mod.train(short)).checkpoints() == []
    monkeypatch.setattr(checkpoints, "AUTO_SAVE_SECONDS", 0.0)  # every step is past the interval
    monkeypatch.setattr(checkpoints, "AUTO_SAVE_SHARE", 0)
    saved, save = [], loop_mod.save_checkpoint
    monkeypatch.setattr(loop_mod, "save_checkpoint", lambda trainer, run, step, keep: saved.append(
        (step, RunFolder(save(trainer, run, step, keep).parent.parent).checkpoints()[-1].name)))
    timed = train_mod.train(load_config(str(write_config(tmp_path / "timed", tiny_gpt2, "embedded:glossary-train.json",
                                                         train={"max_steps": 4, "save_total_limit": 5}))))
    assert saved == [(1, "step-000001"), (2, "step-000002"), (3, "step-000003")]
    assert RunFolder(timed).is_finished and RunFolder(timed).checkpoints() == []  # no use once finished: removed


def test_qlora_trains_4bit_base_on_cpu(tmp_path, tiny_llama):
    pytest.importorskip("bitsandbytes")
    config = load_config(str(write_config(tmp_path, tiny_llama, "embedded:glossary-train.json",
                                          method="qlora", train={"max_steps": 2})))
    folder = train_mod.train(config)
    adapter = load_file(folder / "adapter_model.safetensors")
    assert all(value.abs().sum() > 0 for key, value in adapter.items() if "lora_B" in key)
    quantised = load_model(str(tiny_llama), quantization="nf4")
    assert any("4bit" in type(m).__name__ for m in quantised.modules())


def test_a_held_out_probe_leaves_qlora_gradients_as_they_were(tmp_path):
    """bitsandbytes repacks a 4-bit layer for inference on its first eval-mode forward without gradient on a CPU
    with AVX512-BF16 (as a probe runs), after which training forwards lose their gradient through the base: the
    gradients of a step must be the same after a probe as before (on other CPUs it holds trivially)."""
    pytest.importorskip("bitsandbytes")
    from conftest import make_tiny_llama

    base = make_tiny_llama(tmp_path / "llama", hidden_size=128)  # 32 wide is too small for the packed layout
    model = prepare_model(load_config(None, ["data.train=x", f"model.base={base}", "method=qlora", "lora.dropout=0"]))
    tokenizer = load_tokenizer(str(base))
    ids = tokenizer(["What does QUILT stand for? QUILT stands for Queue of Unified Index Lookup Tables."],
                    return_tensors="pt")["input_ids"]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        supervised_loss(model, batch)[0].backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    before = gradients()
    model.eval()
    with torch.no_grad():  # a probe's forward
        model(input_ids=ids, attention_mask=batch["attention_mask"])
    model.train()
    after = gradients()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_full_fine_tuning_changes_the_weights_and_saves_a_loadable_model(tmp_path, tiny_gpt2):
    config = load_config(str(write_config(tmp_path, tiny_gpt2, "embedded:glossary-train.json", method="full")))
    folder = train_mod.train(config)
    tuned, base = load_model(str(folder)), load_model(str(tiny_gpt2))
    changed = [n for n, p in tuned.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert "transformer.h.0.attn.c_attn.weight" in changed
    umask = os.umask(0)
    os.umask(umask)
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not transformers' 0600


def test_unknown_target_module_is_a_clear_error(tmp_path, tiny_gpt2):
    config = load_config(str(write_config(tmp_path, tiny_gpt2, "embedded:glossary-train.json",
                                          lora={"target_modules": ["q_proj"]})))
    with pytest.raises(AffinerError, match="q_proj.*c_attn, c_fc, c_proj"):
        train_mod.train(config)


@pytest.mark.parametrize("name,expected", [
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.5, 1.0, 0.875, 0.75, 0.625, 0.5]),  # 2 warm-up steps of 10, then down to 0 at step 10
])
def test_schedules_warm_up_then_follow_their_shape(name, expected):
    config = load_config(None, ["data.train=x", f"train.scheduler={name}", "train.warmup_ratio=0.2",
                                "train.learning_rate=1.0"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(config, optimizer, steps=10)
    rates = []
    for _ in range(6):
        optimizer.step()
        scheduler.step()
        rates.append(scheduler.get_last_lr()[0])
    assert rates == pytest.approx(expected)


def test_each_step_logs_the_learning_rate_it_trained_with(tmp_path, tiny_gpt2):
    """Two warm-up steps of four: the first step trains at 0, the second at half the rate, then the full rate."""
    config = write_config(tmp_path, tiny_gpt2, "embedded:glossary-train.json",
                          train={"max_steps": 4, "learning_rate": 1e-2, "scheduler": "constant", "warmup_ratio": 0.5})
    folder = train_mod.train(load_config(str(config)))
    assert [r["learning_rate"] for r in read_jsonl(folder / "metrics.jsonl")] == [0.0, 5e-3, 1e-2, 1e-2]


def test_cosine_schedule_decays_to_zero():
    config = load_config(None, ["data.train=x", "train.warmup_ratio=0.1", "train.learning_rate=1.0"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(config, optimizer, steps=10)
    rates = [scheduler.get_last_lr()[0]]
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        rates.append(scheduler.get_last_lr()[0])
    assert rates[0] == 0 and rates[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[1:], rates[2:])) and rates[-1] == pytest.approx(0.0, abs=1e-9)


def test_resume_refuses_changed_training_data(tmp_path, tiny_gpt2, interrupt_training):
    import shutil

    data = tmp_path / "train.json"
    shutil.copy(Path(train_mod.__file__).parents[1] / "resources" / "glossary-train.json", data)
    config = write_config(tmp_path, tiny_gpt2, data, train={"max_steps": 4, "save_steps": 2})
    interrupt_training(2)
    with pytest.raises(AffinerError):
        train_mod.train(load_config(str(config)))
    interrupt_training.disarm()
    data.write_text(data.read_text().replace("QUILT", "QUILTS"), encoding="utf-8")
    folder = next((tmp_path / "runs").iterdir())
    with pytest.raises(AffinerError, match="changed since the run started"):
        train_mod.train(resume=folder)


def test_held_out_sample_is_scored_during_training(tmp_path, tiny_gpt2):
    config = write_config(tmp_path, tiny_gpt2, "embedded:glossary-train.json", train={"max_steps": 4},
                          eval={"every_steps": 2, "sample_size": 2, "max_new_tokens": 4})
    folder = train_mod.train(load_config(str(config)))
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    probed = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in probed] == [2, 4]
    for record in probed:
        assert 0 <= record["eval_contains"] <= 1 and 0 <= record["eval_stop_rate"] <= 1 and record["eval_loss"] > 0
    assert probed[1]["eval_loss"] != probed[0]["eval_loss"]  # scored on the model as it trains, not a copy


def test_tensorboard_events_hold_train_and_eval_scalars(tmp_path, tiny_gpt2):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = write_config(tmp_path, tiny_gpt2, "embedded:glossary-train.json", train={"max_steps": 2, "tracking": ["tensorboard"]},
                          eval={"every_steps": 2, "sample_size": 2, "max_new_tokens": 2})
    folder = train_mod.train(load_config(str(config)))
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/learning_rate", "eval/loss", "eval/contains"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]


def test_a_resumed_run_shows_each_step_once_in_tensorboard(tmp_path, tiny_gpt2, interrupt_training):
    """Stopped at once after step 3 (Ctrl-C twice), the run resumes from step 2's checkpoint and trains step 3
    again: its first point is purged, as metrics.jsonl drops it."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = write_config(tmp_path, tiny_gpt2, "embedded:glossary-train.json",
                          train={"max_steps": 4, "save_steps": 2, "tracking": ["tensorboard"]})
    interrupt_training(3, times=2)
    with pytest.raises(AffinerError):
        train_mod.train(load_config(str(config)))
    interrupt_training.disarm()
    folder = train_mod.train(resume=next((tmp_path / "runs").iterdir()))
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(
        [r["loss"] for r in read_jsonl(folder / "metrics.jsonl")])


def test_the_loss_builds_no_kv_cache(tiny_llama, monkeypatch):
    model = load_model(str(tiny_llama))
    seen: list = []
    real = model.model.forward

    def forward(*args, **kwargs):
        seen.append(kwargs.get("use_cache"))
        return real(*args, **kwargs)

    monkeypatch.setattr(model.model, "forward", forward)
    supervised_loss(model, _batch(tiny_llama))
    assert seen == [False]


def test_fp16s_gradient_scale_is_kept_in_a_checkpoint_and_restored(tmp_path, tiny_gpt2, qa_file):
    """On a GPU in fp16 the scaler's scale grows and backs off during training: a resumed run starts from the scale
    it had, not from a new scaler's 65536, or it skips (or applies) other steps than the run that never stopped.
    Checked at the checkpoint's boundary (a CPU has no fp16 scaler in training)."""
    from types import SimpleNamespace

    from affiner.training.checkpoints import restore_state, save_checkpoint
    from affiner.training.processes import Processes

    from peft import LoraConfig, get_peft_model

    run = train_mod.train(load_config(str(write_config(tmp_path, tiny_gpt2, qa_file, train={"max_steps": 1}))))
    base = load_model(str(tiny_gpt2))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=default_target_modules(base)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer = SimpleNamespace(model=model, loss=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                              processes=Processes(), elapsed=lambda: 1.0)
    checkpoint = save_checkpoint(trainer, RunFolder(run), 7, keep=2)
    fresh = torch.amp.GradScaler("cpu")
    assert restore_state(checkpoint, model, optimizer, scheduler, Processes(), fresh) == 7
    assert fresh.get_scale() == 1024.0


def test_a_lora_rank_some_adapted_layer_can_use_is_accepted_one_none_can_is_refused():
    """A mixture of experts' 1-wide gate or Gemma 3n's 4 x 4 layers are adapted along with layers hundreds wide:
    the default rank must not be refused for them; a rank above every adapted layer's size is."""
    from affiner.core.config import load_config
    from affiner.core.errors import AffinerError
    from affiner.training.run import check_lora_rank

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.q_proj = torch.nn.Linear(64, 1), torch.nn.Linear(64, 48)

    config = load_config("quickstart")

    def with_rank(r: int):
        return config.model_copy(update={"lora": config.lora.model_copy(update={"r": r,
                                                                               "target_modules": ["gate", "q_proj"]})})

    check_lora_rank(with_rank(16), Block())
    check_lora_rank(with_rank(48), Block())
    with pytest.raises(AffinerError, match=r"lora.r is 49, but the layers it adapts have at most 48 .*q_proj"):
        check_lora_rank(with_rank(49), Block())
