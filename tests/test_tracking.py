"""Tracking: metrics.csv mirrors metrics.jsonl, curves are drawn at the end of every run, and the MLflow
local store holds the run's parameters, per-step metrics and artifacts, read back with MLflow's own client."""

from __future__ import annotations

import csv
import json

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


def test_a_resumed_run_continues_its_mlflow_run(tmp_path, tiny_gpt2, qa_file, interrupt_training):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    interrupt_training(2)
    config = write_config(tmp_path, tiny_gpt2, qa_file, train={"max_steps": 4, "logging_steps": 1, "save_steps": 1,
                                                               "tracking": ["mlflow"]})
    with pytest.raises(SystemExit):
        cli.main(["train", str(config)])
    interrupt_training.disarm()
    folder = run_folder(tmp_path)
    run_id = read_json(folder / "run.json")["mlflow"]["run_id"]
    cli.main(["train", "--resume", str(folder)])
    assert read_json(folder / "run.json")["mlflow"]["run_id"] == run_id
    client = MlflowClient(tracking_uri=read_json(folder / "run.json")["mlflow"]["uri"])
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1


def test_unknown_tracker_is_a_config_error(tmp_path, tiny_gpt2, qa_file, capsys):
    config = write_config(tmp_path, tiny_gpt2, qa_file, train={"tracking": ["wandb"]})
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", str(config)])
    assert exit_info.value.code == 2
    assert "train.tracking.0" in capsys.readouterr().err
