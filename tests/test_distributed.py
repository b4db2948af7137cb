"""Data-parallel training on 2 CPU processes (torchrun, gloo) gives what 1 process gives for the same global
batch: the same losses and adapter within 1e-5, one run folder written once, every process agreeing;
with gradient accumulation, with a short last batch, sharded (FSDP2), partitioned (DeepSpeed ZeRO 1/2),
and after a kill -9 then a resume."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_config
from safetensors.torch import load_file

DRIVER = str(Path(__file__).with_name("distributed_driver.py"))
ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "src" / "affiner" / "recipes" / "accelerate"
FSDP2 = str(ACCELERATE_CONFIGS / "fsdp2.yaml")
ZERO2 = str(ACCELERATE_CONFIGS / "deepspeed-zero2.yaml")
PARALLELISM = {None: "ddp", FSDP2: "fsdp2", ZERO2: "deepspeed-zero2"}  # as run.json records each config
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="pip install deepspeed")
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


def torchrun(*argv: str, processes: int = 2, unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k not in unset}, "HF_HUB_OFFLINE": "1"}
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


def assert_same_training(single: Path, double: Path, parallelism: str = "ddp") -> None:
    assert losses(double) == pytest.approx(losses(single), abs=1e-5)
    a, b = load_file(single / "adapter_model.safetensors"), load_file(double / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    info = json.loads((double / "run.json").read_text())
    assert info["status"] == "finished" and info["processes"] == 2 and info["parallelism"] == parallelism
    # shards are not copies to compare
    assert info.get("processes_agree") is (None if parallelism == "fsdp2" else True)


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
    pytest.param(1, {"accelerate_config": ZERO2, "gradient_accumulation": 2, "save_steps": 2}, PROBE,
                 marks=needs_deepspeed),  # ZeRO-2: gradients and optimizer state partitioned
    pytest.param(2, {"accelerate_config": "zero1-offload", "save_steps": 2}, {}, marks=needs_deepspeed),
], ids=["batch", "accumulation", "accumulation-probed", "fsdp2", "fsdp2-probed", "zero2", "zero1-offload"])
def test_two_processes_train_as_one(tmp_path, tiny_llama, data, per_device, train, sections):
    if train.get("accelerate_config") == "zero1-offload":  # the optimizer state partitioned, in CPU memory
        train["accelerate_config"] = str(deepspeed_config(tmp_path, zero_stage=1, offload_optimizer_device="cpu"))
    single, double = train_both(tmp_path, tiny_llama, data, per_device, sections, **train)
    assert_same_training(single, double, PARALLELISM.get(train.get("accelerate_config"), "deepspeed-zero1"))
    if sections:  # the main process logged the held-out scores one process gets
        probed = [json.loads(line) for line in (double / "metrics.jsonl").read_text().splitlines()]
        expected = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
        scores = [r["eval_loss"] for r in probed if "eval_loss" in r]
        assert len(scores) == 2 and scores == pytest.approx([r["eval_loss"] for r in expected if "eval_loss" in r],
                                                            abs=1e-4)
    assert json.loads((double / "run.json").read_text())["global_batch"] == 4


def test_processes_on_cpus_all_compute_in_the_precision_the_main_one_measured(tmp_path, tiny_llama, data):
    """With `precision: auto` decided by measurement (no AFFINER_CPU_BF16), each process measuring on cores the
    other loads could pick another dtype: the main one's measurement is broadcast before anything loads, every
    process trains in its dtype (their weights agree) and run.json says whose measurement decided."""
    config = write_config(tmp_path, tiny_llama, data, train={"max_steps": 2, "batch_size": 1})
    result = torchrun(str(config), unset=("AFFINER_CPU_BF16",))
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((one_run(tmp_path) / "run.json").read_text())
    assert info["precision_reason"].endswith("(by the main process, for every process)")
    assert info["status"] == "finished" and info["processes_agree"] is True


def test_a_short_last_batch_leaves_a_process_without_rows(tmp_path, tiny_llama, data):
    """7 training rows in global batches of 6: the second batch has one row, the second process none."""
    single, double = train_both(tmp_path, tiny_llama, data, 3, {"data": {"test_size": 3}}, max_steps=2)
    assert json.loads((double / "data.json").read_text())["train"]["examples"] == 7
    assert_same_training(single, double)


def deepspeed_config(folder: Path, **deepspeed: object) -> Path:
    path = folder / "deepspeed.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"distributed_type": "DEEPSPEED", "deepspeed_config": deepspeed}))
    return path


@pytest.mark.parametrize("sharding", [{}, {"accelerate_config": FSDP2},
                                      pytest.param({"accelerate_config": ZERO2}, marks=needs_deepspeed)],
                         ids=["ddp", "fsdp2", "zero2"])
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
    assert_same_training(one_run(tmp_path / "one"), run, PARALLELISM[sharding.get("accelerate_config")])


@pytest.mark.slow  # three torchrun launches (~50 s): kept out of the default run's 15 minutes, run by CI
def test_ctrl_c_under_two_processes_resumes_as_if_never_stopped(tmp_path, tiny_llama, data):
    """Each process draws its own dropout masks: the checkpoint Ctrl-C leaves holds every process's random state."""
    sections = {"lora": {"r": 4, "alpha": 8, "dropout": 0.3},
                "train": {"max_steps": 6, "batch_size": 2, "save_steps": 100}}
    config = write_config(tmp_path / "stopped", tiny_llama, data, **sections)
    stopped = torchrun(str(config), "--ctrl-c-after-step", "3")
    assert stopped.returncode != 0 and "training interrupted after step 3" in stopped.stderr, stopped.stderr[-3000:]
    run = one_run(tmp_path / "stopped")
    assert sorted(p.name for p in (run / "checkpoints" / "step-000003").glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]
    assert "nothing to resume" not in stopped.stderr  # no process reads the checkpoints before they are saved
    assert torchrun("--resume", str(run)).returncode == 0
    straight = write_config(tmp_path / "straight", tiny_llama, data, **sections)
    assert torchrun(str(straight)).returncode == 0
    assert losses(run) == pytest.approx(losses(one_run(tmp_path / "straight")), abs=1e-6)


def test_out_of_memory_in_one_process_marks_the_run_failed(tmp_path, tiny_llama, data):
    """The process that ran out of memory records it; the main one, stuck waiting for it, cannot."""
    config = write_config(tmp_path / "two", tiny_llama, data,
                          train={"max_steps": 6, "batch_size": 2, "save_steps": 2})
    failed = torchrun(str(config), "--out-of-memory-at-step", "3")
    assert failed.returncode != 0 and "out of memory on cpu at step 3" in failed.stderr
    run = one_run(tmp_path / "two")
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and info["step"] == 2
    assert "Lower train.batch_size" in info["error"] and "step-000002" in info["error"]
    resumed = torchrun("--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


def test_a_refusal_under_two_processes_is_one_paragraph_without_an_internal_error(tmp_path, tiny_llama, data):
    """The main process refuses the input before training; the other, waiting for it, exits quietly with its code
    (it used to fail on the closed connection and call it a bug in affiner)."""
    def launched(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "affiner", *argv], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    config = write_config(tmp_path / "two", tiny_llama, data, data={"max_length": 100000})
    refused = launched("train", str(config))
    assert refused.returncode != 0
    assert refused.stderr.count("affiner train: error: data.max_length is 100000") == 1, refused.stderr[-3000:]
    assert "internal error" not in refused.stderr and "exitcode  : 1" not in refused.stderr
    assert not (tmp_path / "two" / "runs").exists()
    # A config every process reads alike, and refuses alike: said once too.
    refused = launched("run", str(config), "--set", "train.lerning_rate=1e-3")
    assert refused.stderr.count("train.lerning_rate: unknown key") == 1, refused.stderr[-3000:]


def test_shipped_accelerate_configs_are_valid(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    from affiner.core.errors import AffinerError
    from affiner.training.processes import strategy

    shipped = sorted(ACCELERATE_CONFIGS.glob("*.yaml"))
    assert [p.name for p in shipped] == ["ddp.yaml", "deepspeed-zero2.yaml", "fsdp2.yaml"]
    for path in shipped:
        assert load_config_from_file(str(path)).distributed_type  # Accelerate itself reads it
    assert [strategy(str(path)).name for path in shipped] == ["ddp", "deepspeed", "fsdp2"]
    assert strategy(ZERO2).deepspeed["zero_stage"] == 2
    fsdp1 = tmp_path / "fsdp1.yaml"
    fsdp1.write_text("distributed_type: FSDP\nfsdp_config: {fsdp_version: 1}\n")
    with pytest.raises(AffinerError, match="fsdp_version: 2"):
        strategy(str(fsdp1))


@pytest.mark.parametrize("deepspeed, refused", [
    ({"zero_stage": 3}, "stage 3.*FSDP2"),
    ({"zero_stage": 2, "offload_param_device": "cpu"}, "offload_param_device needs ZeRO stage 3"),
    ({"zero_stage": 2, "offload_optimizer_device": "nvme"}, "offload_optimizer_device nvme"),
    ({"deepspeed_config_file": "missing.json"}, "missing.json, which cannot be read"),
    ({"deepspeed_config_file": "BROKEN"}, "line 2: not valid JSON"),
    ({"deepspeed_config_file": "OPTIMIZER"}, "sets optimizer, which affiner's config decides"),
], ids=["stage3", "param-offload", "nvme", "missing-file", "broken-file", "owned-section"])
def test_deepspeed_settings_affiner_cannot_honour_are_refused_by_name(tmp_path, monkeypatch, deepspeed, refused):
    from affiner.core.errors import AffinerError
    from affiner.training.processes import strategy

    monkeypatch.chdir(tmp_path)
    Path("BROKEN").write_text('{"zero_optimization":\n  {"stage": 2,}}')
    Path("OPTIMIZER").write_text(json.dumps({"optimizer": {"type": "Adam"}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(AffinerError, match=refused):
        strategy(str(deepspeed_config(tmp_path, **deepspeed)))


def test_deepspeed_runs_on_affiners_batch_accumulation_and_clipping(tmp_path, monkeypatch):
    from affiner.core.config import TrainConfig
    from affiner.core.errors import AffinerError
    from affiner.training.processes import strategy
    from affiner.training.zero import engine_config

    train = TrainConfig(batch_size=3, gradient_accumulation=2, max_grad_norm=0.5)
    file = tmp_path / "ds.json"
    file.write_text(json.dumps({"train_batch_size": "auto", "gradient_clipping": "auto",
                                "zero_optimization": {"stage": 1, "overlap_comm": False}}))
    settings = strategy(str(deepspeed_config(tmp_path, deepspeed_config_file=str(file)))).deepspeed
    config = engine_config(settings, train, processes=4)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"], config["gradient_clipping"]) == (3, 2, 24, 0.5)
    assert config["zero_optimization"] == {"stage": 1, "overlap_comm": False}  # the file's tuning is kept
    assert config["managed_gradient_accumulation"] is False
    file.write_text(json.dumps({"gradient_accumulation_steps": 8}))
    settings = strategy(str(deepspeed_config(tmp_path, deepspeed_config_file=str(file)))).deepspeed
    with pytest.raises(AffinerError, match="gradient_accumulation_steps: 8.*gives 2 .train.gradient_accumulation"):
        engine_config(settings, train, processes=4)
    # accelerate launch --config_file passes the same settings through the environment
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    monkeypatch.setenv("ACCELERATE_GRADIENT_CLIPPING", "1.0")
    launched = strategy(None)
    assert launched.name == "deepspeed" and launched.deepspeed["zero_stage"] == 1
    with pytest.raises(AffinerError, match="Accelerate config sets gradient_clipping: 1.0.*train.max_grad_norm"):
        engine_config(launched.deepspeed, train, processes=4)


def test_what_sharding_cannot_do_is_refused_before_anything_is_written(tiny_llama, data, monkeypatch):
    from affiner.core.config import load_config
    from affiner.core.errors import AffinerError
    from affiner.training.processes import Processes, Strategy
    from affiner.training.run import check_strategy

    config = load_config(str(write_config(data.parent, tiny_llama, data)))
    for name, shown in [("fsdp2", "FSDP2"), ("deepspeed", "DeepSpeed ZeRO")]:
        partitioned = Processes(count=2, rank=0, strategy=Strategy(name))
        check_strategy(config, partitioned)  # LoRA, AdamW, fp32: fine
        for key, value, reason in [("method", "qlora", "4-bit"), ("optimizer", "adamw_8bit", "bitsandbytes")]:
            changed = config.model_copy(deep=True)
            if key == "method":
                changed.method = value
            else:
                changed.train.optimizer = value
            with pytest.raises(AffinerError, match=f"{reason}.*{shown}|{shown}.*{reason}"):
                check_strategy(changed, partitioned)
    check_strategy(config.model_copy(update={"method": "qlora"}), Processes(count=2, rank=0))  # DDP: fine
    from affiner.training import run as training_run

    monkeypatch.setattr(training_run, "dtype_for", lambda config: torch.float16)  # a T4
    with pytest.raises(AffinerError, match="fp16 needs a gradient scaler"):
        check_strategy(config, Processes(count=2, rank=0, strategy=Strategy("fsdp2")))


def test_a_run_resumes_on_as_many_processes_as_it_started_with(tmp_path, tiny_llama, data):
    from affiner.core.errors import AffinerError
    from affiner.core.runfolder import RunFolder
    from affiner.training.processes import Processes, Strategy
    from affiner.training.run import check_resumable

    run = RunFolder(tmp_path)
    run.update(status="interrupted", processes=2)
    check_resumable(run, Processes(count=2, rank=1))
    with pytest.raises(AffinerError, match="trained on 2 process.*--nproc_per_node 2"):
        check_resumable(run, Processes(count=1, rank=0))
    RunFolder(tmp_path).update(processes=1)
    check_resumable(run, Processes(count=1, rank=0))
    # As many processes, but another way of sharing them: the optimizer state was saved in another layout.
    run.update(processes=2, parallelism="deepspeed-zero2")
    with pytest.raises(AffinerError, match="trained with deepspeed-zero2 and this launch is ddp.*accelerate launch "
                                           "--config_file .*--num_processes 2"):
        check_resumable(run, Processes(count=2, rank=0))
    run.update(parallelism="ddp")
    with pytest.raises(AffinerError, match="trained with ddp and this launch is fsdp2.*torchrun --nproc_per_node 2"):
        check_resumable(run, Processes(count=2, rank=0, strategy=Strategy("fsdp2")))
    check_resumable(run, Processes(count=2, rank=1))
