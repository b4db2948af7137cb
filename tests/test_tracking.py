"""Tracking: metrics.csv mirrors metrics.jsonl, curves are drawn at the end of every run, and the MLflow
local store holds the run's parameters, per-step metrics and artifacts, read back with MLflow's own client."""

from __future__ import annotations

import csv
import json
import struct
import time
import sys

import pytest
from conftest import write_config

from affiner import cli
from affiner.core.files import read_json

PNG = b"\x89PNG\r\n\x1a\n"


def records(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def run_folder(tmp_path):
    return next(p for p in (tmp_path / "runs").iterdir() if (p / "run.json").is_file())


def train_run(tmp_path, base, qa_file, *extra: str, **train):
    config = write_config(tmp_path, base, qa_file, train={"max_steps": 4, "logging_steps": 1, **train},
                          eval={"every_steps": 2, "sample_size": 2, "max_new_tokens": 4, "batch_size": 2})
    cli.main(["train", str(config), *extra])
    return run_folder(tmp_path)


def test_csv_mirrors_the_jsonl_log_and_curves_are_drawn(tmp_path, tiny_gpt2, qa_file):
    folder = train_run(tmp_path, tiny_gpt2, qa_file, tracking=["csv"])
    logged = records(folder)
    with open(folder / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [r["step"] for r in logged] == [1, 2, 3, 4]
    assert [float(r["loss"]) for r in rows] == [r["loss"] for r in logged]
    assert rows[0]["eval_loss"] == "" and float(rows[1]["eval_loss"]) == logged[1]["eval_loss"]  # probe every 2 steps
    for name in ("loss.png", "learning_rate.png"):
        assert (folder / name).read_bytes()[:8] == PNG


def test_interrupted_run_still_gets_its_curves(tmp_path, tiny_gpt2, qa_file, interrupt_training):
    interrupt_training(2)
    config = write_config(tmp_path, tiny_gpt2, qa_file, train={"max_steps": 4, "logging_steps": 1})
    with pytest.raises(SystemExit):
        cli.main(["train", str(config)])
    folder = run_folder(tmp_path)
    assert read_json(folder / "run.json")["status"] == "interrupted"
    assert (folder / "loss.png").read_bytes()[:8] == PNG


def test_mlflow_local_store_holds_params_metrics_and_artifacts(tmp_path, tiny_gpt2, qa_file):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    folder = train_run(tmp_path, tiny_gpt2, qa_file, tracking=["mlflow", "csv"])
    cli.main(["evaluate", str(folder), "--max-new-tokens", "4"])
    recorded = read_json(folder / "run.json")["mlflow"]
    assert recorded["uri"] == f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"  # local, in the project
    client = MlflowClient(tracking_uri=recorded["uri"])
    run = client.get_run(recorded["run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "test"
    assert run.data.params["lora.r"] == "4" and run.data.params["model.base"] == str(tiny_gpt2)
    assert run.data.params["train.learning_rate"] == "0.01"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, round(m.value, 5)) for m in history] == [(r["step"], r["loss"]) for r in records(folder)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")] == [2, 4]
    evaluation = json.loads((folder / "metrics.json").read_text())["metrics"]
    for model in ("base", "tuned"):
        for metric in ("contains", "rouge_l", "loss"):
            assert run.data.metrics[f"{model}_{metric}"] == pytest.approx(evaluation[metric][model]["mean"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter_model.safetensors", "adapter_config.json", "config.yaml", "loss.png", "learning_rate.png",
            "report.html", "metrics.csv"} <= artifacts


def test_mlflow_experiment_is_the_one_named_in_the_environment(tmp_path, tiny_gpt2, qa_file, monkeypatch):
    """MLflow's own variable names the experiment (a sweep sets it, so that its points are logged together)."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from affiner.core.config import load_config
    from affiner.core.tracking import MlflowTracker

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "my-sweep")
    config = load_config(str(write_config(tmp_path, tiny_gpt2, qa_file, train={"tracking": ["mlflow"]})))
    (tmp_path / "runs" / "one").mkdir(parents=True)
    tracker = MlflowTracker(config, tmp_path / "runs" / "one")
    client = MlflowClient(tracking_uri=tracker.uri)
    assert client.get_experiment(client.get_run(tracker.run_id).info.experiment_id).name == "my-sweep"


def stopped_then_resumed(tmp_path, base, qa_file, interrupt_training, stop_after: int, presses: int, **train):
    """A run tracked in MLflow, stopped by Ctrl-C (`presses` times) after step `stop_after`, then resumed: its
    folder, MLflow run id (as first recorded) and client."""
    from mlflow.tracking import MlflowClient

    interrupt_training(stop_after, times=presses)
    config = write_config(tmp_path, base, qa_file, train={"logging_steps": 1, "tracking": ["mlflow"], **train})
    with pytest.raises(SystemExit):
        cli.main(["train", str(config)])
    interrupt_training.disarm()
    folder = run_folder(tmp_path)
    run_id = read_json(folder / "run.json")["mlflow"]["run_id"]
    cli.main(["train", "--resume", str(folder)])
    return folder, run_id, MlflowClient(tracking_uri=read_json(folder / "run.json")["mlflow"]["uri"])


def test_a_resumed_run_continues_its_mlflow_run(tmp_path, tiny_gpt2, qa_file, interrupt_training):
    pytest.importorskip("mlflow")
    folder, run_id, client = stopped_then_resumed(tmp_path, tiny_gpt2, qa_file, interrupt_training, 2, 1,
                                                  max_steps=4, save_steps=1)
    assert read_json(folder / "run.json")["mlflow"]["run_id"] == run_id
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1


def test_steps_trained_again_after_a_hard_stop_show_once_in_mlflow(tmp_path, tiny_gpt2, qa_file, interrupt_training):
    """Stopped at once after step 3 (no checkpoint since step 2), the resumed run trains step 3 again: MLflow, which
    cannot delete a point, keeps the first one rather than showing the step twice."""
    pytest.importorskip("mlflow")
    folder, run_id, client = stopped_then_resumed(tmp_path, tiny_gpt2, qa_file, interrupt_training, 3, 2,
                                                  max_steps=5, save_steps=2)
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in records(folder)] == [1, 2, 3, 4, 5]


def test_unknown_tracker_is_a_config_error(tmp_path, tiny_gpt2, qa_file, capsys):
    config = write_config(tmp_path, tiny_gpt2, qa_file, train={"tracking": ["comet"]})
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", str(config)])
    assert exit_info.value.code == 2
    assert "train.tracking.0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- Weights & Biases


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B as on a machine without its server: runs kept on disk under tmp_path, read back from there."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_PROJECT", "affiner-tests")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path / "wandb-dir"


def wandb_records(run_dir) -> list:
    """The records of an offline W&B run, read from its transaction log (run-ID.wandb) and parsed with W&B's own
    protobuf messages. The log is LevelDB's log format: 32 KiB blocks of (checksum, length, type) chunks."""
    from wandb.proto import wandb_internal_pb2

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert struct.unpack("<4sHB", data[:7])[:2] == (b":W&B", 0xBEE1), "not a W&B transaction log"
    records, position, pending = [], 7, b""
    while position + 7 <= len(data):
        left_in_block = 32768 - position % 32768
        if left_in_block < 7:  # too little room for a chunk header: the block is padded
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def of_kind(records: list, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def items(updates) -> dict:
    return {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in updates}


def config_of(records: list) -> dict:
    return items(of_kind(records, "run")[0].config.update)


def history_of(records: list) -> list[dict]:
    return [items(row.item) for row in of_kind(records, "history")]


def summary_of(records: list) -> dict:
    summary = {}
    for update in of_kind(records, "summary"):
        summary |= items(update.update)
    return summary


def wandb_runs(wandb_dir, run_id: str) -> list[list]:
    """The records of every offline W&B run written under this id, in the order they started (a resumed
    training and each evaluation open the same run again)."""
    deadline = time.monotonic() + 30  # W&B's own service process writes the log: on a busy machine, a moment late
    while True:
        runs = [wandb_records(d) for d in (wandb_dir / "wandb").glob("offline-run-*")]
        if all(of_kind(r, "run") for r in runs) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    runs = [r for r in runs if of_kind(r, "run") and of_kind(r, "run")[0].run_id == run_id]
    return sorted(runs, key=lambda r: of_kind(r, "run")[0].start_time.ToNanoseconds())


def test_wandb_offline_run_holds_config_metrics_and_evaluation(tmp_path, tiny_gpt2, qa_file, wandb_offline):
    folder = train_run(tmp_path, tiny_gpt2, qa_file, tracking=["wandb", "csv"])
    cli.main(["evaluate", str(folder), "--max-new-tokens", "4"])
    recorded = read_json(folder / "run.json")["wandb"]
    assert recorded["project"] == "affiner-tests"
    trained, evaluated = wandb_runs(wandb_offline, recorded["run_id"])
    assert of_kind(trained, "run")[0].project == "affiner-tests" and of_kind(trained, "run")[0].display_name == folder.name
    assert config_of(trained)["lora"]["r"] == 4 and config_of(trained)["train"]["learning_rate"] == 0.01
    history = history_of(trained)
    assert [(h["_step"], round(h["loss"], 5)) for h in history] == [(r["step"], r["loss"]) for r in records(folder)]
    assert [h["_step"] for h in history if "eval_loss" in h] == [2, 4]
    summary = summary_of(evaluated)
    evaluation = json.loads((folder / "metrics.json").read_text())["metrics"]
    for model in ("base", "tuned"):
        for metric in ("contains", "rouge_l", "loss"):
            assert summary[f"{model}_{metric}"] == pytest.approx(evaluation[metric][model]["mean"])


def test_a_resumed_run_continues_its_wandb_run(tmp_path, tiny_gpt2, qa_file, interrupt_training, wandb_offline):
    interrupt_training(2)
    config = write_config(tmp_path, tiny_gpt2, qa_file, train={"max_steps": 4, "logging_steps": 1, "save_steps": 1,
                                                               "tracking": ["wandb"]})
    with pytest.raises(SystemExit):
        cli.main(["train", str(config)])
    interrupt_training.disarm()
    folder = run_folder(tmp_path)
    run_id = read_json(folder / "run.json")["wandb"]["run_id"]
    cli.main(["train", "--resume", str(folder)])
    assert read_json(folder / "run.json")["wandb"]["run_id"] == run_id
    first, resumed = wandb_runs(wandb_offline, run_id)
    assert [h["_step"] for h in history_of(first)] == [1, 2]
    assert [h["_step"] for h in history_of(resumed)] == [3, 4]
    assert len(list((wandb_offline / "wandb").glob("offline-run-*"))) == 2  # no other W&B run was started


def test_wandb_not_installed_is_refused_before_anything_is_written(tmp_path, tiny_gpt2, qa_file, monkeypatch, capsys):
    from affiner.core.config import load_config
    from affiner.core.errors import AffinerError
    from affiner.core.tracking import require_trackers_installed

    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets where it is not installed
    config = write_config(tmp_path, tiny_gpt2, qa_file, train={"tracking": ["csv", "wandb"]})
    with pytest.raises(AffinerError, match=r"pip install 'affiner\[wandb\]'"):
        require_trackers_installed(load_config(str(config)))
    require_trackers_installed(load_config(str(config), ["train.tracking=[csv]"]))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", str(config)])
    assert exit_info.value.code == 2
    assert "pip install 'affiner[wandb]'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
