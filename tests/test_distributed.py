"""Data-parallel training on 2 CPU processes (torchrun, gloo) gives what 1 process gives for the same global
batch: the same losses and adapter within 1e-5, one run folder written once, every process agreeing;
with gradient accumulation, with a short last batch, and after a kill -9 then a resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_config
from safetensors.torch import load_file

DRIVER = str(Path(__file__).with_name("distributed_driver.py"))
ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "src" / "affiner" / "recipes" / "accelerate"
FSDP2 = str(ACCELERATE_CONFIGS / "fsdp2.yaml")
ROWS = [("QUILT", "Queue of Unified Index Lookup Tables"), ("FROND", "Federated Registry of Open Nautical Data"),
        ("MAPLE", "Modular Archive for Prototype Lab Experiments"), ("GLINT", "Geospatial Layer"),
        ("TANGO", "Technical Assembly"), ("BRISK", "Bureau of Regional Irrigation"), ("CRANE", "Central Registry"),
        ("DUNES", "Data Union"), ("EMBER", "Energy Monitor"), ("FJORD", "Field Journal")]


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": f"What does {a} stand for?", "answer": f"{a} stands for {d}."})
                            + "\n" for a, d in ROWS), encoding="utf-8")
    return path


def torchrun(*argv: str, processes: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={processes}", DRIVER, *argv],
                          capture_output=True, text=True, timeout=300, env=env)


def one_run(folder: Path) -> Path:
    runs = [p for p in (folder / "runs").iterdir() if p.is_dir()]
    assert len(runs) == 1, f"expected one run folder, found {runs}"
    return runs[0]


def losses(run: Path) -> list[float]:
    by_step = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_step[record["step"]] = record["loss"]  # a resumed run logs its re-run steps again: the last counts
    return [by_step[s] for s in sorted(by_step)]


def assert_same_training(single: Path, double: Path, sharded: bool = False) -> None:
    assert losses(double) == pytest.approx(losses(single), abs=1e-5)
    a, b = load_file(single / "adapter_model.safetensors"), load_file(double / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    info = json.loads((double / "run.json").read_text())
    assert info["status"] == "finished" and info["processes"] == 2
    assert info.get("processes_agree") is (None if sharded else True)  # shards are not copies to compare


def train_both(tmp_path: Path, base: Path, data: Path, per_device: int, sections: dict | None = None,
               **train) -> tuple[Path, Path]:
    """The same run on 1 process (twice the rows per device) and on 2 processes."""
    train = {"max_steps": 4, **train}
    single = write_config(tmp_path / "one", base, data, train={**train, "batch_size": 2 * per_device},
                          **(sections or {}))
    double = write_config(tmp_path / "two", base, data, train={**train, "batch_size": per_device}, **(sections or {}))
    result = torchrun(str(single), processes=1)
    assert result.returncode == 0, result.stderr[-3000:]
    result = torchrun(str(double))
    assert result.returncode == 0, result.stderr[-3000:]
    return one_run(tmp_path / "one"), one_run(tmp_path / "two")


PROBE = {"eval": {"every_steps": 2, "sample_size": 2, "max_new_tokens": 4}}


@pytest.mark.parametrize("per_device, train, sections", [
    (2, {}, {}),
    (1, {"gradient_accumulation": 2}, {}),
    (1, {"gradient_accumulation": 2}, PROBE),  # every process generates the held-out answers
    (2, {"accelerate_config": FSDP2, "save_steps": 2}, {}),  # sharded, a checkpoint gathered from the shards
    (2, {"accelerate_config": FSDP2}, PROBE),  # generation enters the sharded model outside its loss
], ids=["batch", "accumulation", "accumulation-probed", "fsdp2", "fsdp2-probed"])
def test_two_processes_train_as_one(tmp_path, tiny_llama, data, per_device, train, sections):
    single, double = train_both(tmp_path, tiny_llama, data, per_device, sections, **train)
    assert_same_training(single, double, sharded="accelerate_config" in train)
    if sections:  # the main process logged the held-out scores one process gets
        probed = [json.loads(line) for line in (double / "metrics.jsonl").read_text().splitlines()]
        expected = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
        scores = [r["eval_loss"] for r in probed if "eval_loss" in r]
        assert len(scores) == 2 and scores == pytest.approx([r["eval_loss"] for r in expected if "eval_loss" in r],
                                                            abs=1e-4)
    assert json.loads((double / "run.json").read_text())["global_batch"] == 4


def test_a_short_last_batch_leaves_a_process_without_rows(tmp_path, tiny_llama, data):
    """7 training rows in global batches of 6: the second batch has one row, the second process none."""
    single, double = train_both(tmp_path, tiny_llama, data, 3, {"data": {"test_size": 3}}, max_steps=2)
    assert json.loads((double / "data.json").read_text())["train"]["examples"] == 7
    assert_same_training(single, double)


@pytest.mark.parametrize("sharding", [{}, {"accelerate_config": FSDP2}], ids=["ddp", "fsdp2"])
def test_kill_9_then_resume_under_two_processes(tmp_path, tiny_llama, data, sharding):
    config = write_config(tmp_path / "two", tiny_llama, data,
                          train={"max_steps": 6, "batch_size": 2, "save_steps": 2, **sharding})
    killed = torchrun(str(config), "--kill-after-step", "3")
    assert killed.returncode != 0
    run = one_run(tmp_path / "two")
    assert json.loads((run / "run.json").read_text())["status"] == "training"  # nothing could mark it
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]
    resumed = torchrun("--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = write_config(tmp_path / "one", tiny_llama, data, train={"max_steps": 6, "batch_size": 4})
    assert torchrun(str(straight), processes=1).returncode == 0
    assert_same_training(one_run(tmp_path / "one"), run, sharded=bool(sharding))


def test_shipped_accelerate_configs_are_valid(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    from affiner.core.errors import AffinerError
    from affiner.training.processes import sharding

    shipped = sorted(ACCELERATE_CONFIGS.glob("*.yaml"))
    assert [p.name for p in shipped] == ["ddp.yaml", "fsdp2.yaml"]
    for path in shipped:
        assert load_config_from_file(str(path)).distributed_type  # Accelerate itself reads it
    assert sharding(str(ACCELERATE_CONFIGS / "ddp.yaml")) is False and sharding(FSDP2) is True
    deepspeed = tmp_path / "ds.yaml"
    deepspeed.write_text("distributed_type: DEEPSPEED\ndeepspeed_config: {zero_stage: 2}\n")
    with pytest.raises(AffinerError, match="DeepSpeed"):
        sharding(str(deepspeed))
    fsdp1 = tmp_path / "fsdp1.yaml"
    fsdp1.write_text("distributed_type: FSDP\nfsdp_config: {fsdp_version: 1}\n")
    with pytest.raises(AffinerError, match="fsdp_version: 2"):
        sharding(str(fsdp1))


def test_what_sharding_cannot_do_is_refused_before_anything_is_written(tiny_llama, data, monkeypatch):
    from affiner.core.config import load_config
    from affiner.core.errors import AffinerError
    from affiner.training.processes import Processes
    from affiner.training.run import check_sharding

    sharded = Processes(count=2, rank=0, sharded=True)
    config = load_config(str(write_config(data.parent, tiny_llama, data)))
    check_sharding(config, sharded)  # LoRA, AdamW, fp32: fine
    for key, value, reason in [("method", "qlora", "4-bit"), ("optimizer", "adamw_8bit", "bitsandbytes")]:
        changed = config.model_copy(deep=True)
        if key == "method":
            changed.method = value
        else:
            changed.train.optimizer = value
        with pytest.raises(AffinerError, match=reason):
            check_sharding(changed, sharded)
    check_sharding(config.model_copy(update={"method": "qlora"}), Processes(count=2, rank=0))  # DDP: fine
    from affiner.training import run as training_run

    monkeypatch.setattr(training_run, "dtype_for", lambda config: torch.float16)  # a T4's precision
    with pytest.raises(AffinerError, match="fp16 needs a gradient scaler"):
        check_sharding(config, sharded)


def test_a_run_resumes_on_as_many_processes_as_it_started_with(tmp_path, tiny_llama, data):
    from affiner.core.errors import AffinerError
    from affiner.core.runfolder import RunFolder
    from affiner.training.processes import Processes
    from affiner.training.run import check_resumable

    run = RunFolder(tmp_path)
    run.update(status="interrupted", processes=2)
    check_resumable(run, Processes(count=2, rank=1))
    with pytest.raises(AffinerError, match="trained on 2 process.*--nproc_per_node 2"):
        check_resumable(run, Processes(count=1, rank=0))
    RunFolder(tmp_path).update(processes=1)
    check_resumable(run, Processes(count=1, rank=0))
