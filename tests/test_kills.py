"""kill -9 in the middle of every command that writes (training, a checkpoint being saved, export,
prepare, synth, evaluate): what was there before is intact or is resumed exactly, and the next command
cleans up what the killed one left. One writer per run folder, the lock freed by the kernel when its
holder dies. (Ctrl-C during training: test_training.py; under several processes: test_distributed.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli, write_config
from safetensors.torch import load_file

DRIVER = str(Path(__file__).with_name("kill_driver.py"))
ROWS = [{"question": f"What does W{i} stand for?", "answer": f"W{i} stands for word number {i}."} for i in range(14)]


def killed(kill_on: str, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """`affiner ARGV`, SIGKILLed on the call named by `kill_on` (see kill_driver.py)."""
    result = subprocess.run([sys.executable, DRIVER, kill_on, *argv], cwd=cwd, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    return result


def hold(run: Path, command: str) -> subprocess.Popen:
    """Another process writing `run` (as `affiner COMMAND` would), holding its lock until killed."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; from "
                               "affiner.core.runfolder import RunFolder\nwith RunFolder(Path(sys.argv[1])).writing("
                               f"{command!r}):\n  print('held', flush=True); time.sleep(300)", str(run)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


def config(folder: Path, model: Path, data: Path, **train) -> Path:
    return write_config(folder, model, data, train={"max_steps": 6, "batch_size": 2, "save_steps": 2, **train},
                        lora={"r": 4, "alpha": 8, "dropout": 0.1})  # dropout: random masks must resume too


def only_run(folder: Path) -> Path:
    (run,) = [p for p in (folder / "runs").iterdir() if p.is_dir()]
    return run


def assert_same_adapter_and_log(expected: Path, resumed: Path) -> None:
    a, b = load_file(expected / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert all(bool((a[k] == b[k]).all()) for k in a)
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # each step logged once, although some were trained twice
    losses = [json.loads(line)["loss"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert losses == [json.loads(line)["loss"] for line in (expected / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def straight(tmp_path, tiny_llama, data) -> Path:
    assert run_cli("train", str(config(tmp_path / "straight", tiny_llama, data))) == 0
    return only_run(tmp_path / "straight")


@pytest.mark.parametrize("kill_on, kept", [
    ("affiner.core.runfolder.append_jsonl:3", "step-000002"),  # after step 3 is logged, its checkpoint at 2
    ("torch.save:4", "step-000002"),  # inside the checkpoint of step 4: its rng file never written
], ids=["training", "checkpoint-save"])
def test_kill_9_then_resume_ends_where_an_uninterrupted_run_ends(tmp_path, tiny_llama, data, straight, capsys,
                                                                  kill_on, kept):
    killed(kill_on, "train", str(config(tmp_path / "k", tiny_llama, data)), cwd=tmp_path)
    run = only_run(tmp_path / "k")
    assert json.loads((run / "run.json").read_text())["status"] == "training"
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.endswith(".partial"))[-1] == kept
    assert run_cli("train", "--resume", str(run)) == 0
    if kill_on.startswith("torch.save"):  # the half-saved checkpoint was never trusted, and is gone
        assert "removed what an interrupted save left" in capsys.readouterr().out
    assert not list((run / "checkpoints").glob("*.partial"))
    assert_same_adapter_and_log(straight, run)


def test_killed_once_the_best_step_is_adopted_the_resumed_run_keeps_the_best_step(tmp_path, tiny_llama, data):
    """train.keep_best: the best probed step's weights replace the last step's, then the run is recorded finished.
    Killed in between, the resumed run must still end with the best step's weights, as an uninterrupted one."""
    diverging = {"learning_rate": 10, "scheduler": "constant", "warmup_ratio": 0, "max_grad_norm": None,
                 "logging_steps": 1}  # the held-out loss is best before the last step
    probes = {"every_steps": 1, "general": False}

    def setup(folder: Path) -> Path:
        return write_config(folder, tiny_llama, data, train={"max_steps": 6, "batch_size": 2, "save_steps": 2,
                                                             **diverging}, eval=probes,
                            lora={"r": 4, "alpha": 8, "dropout": 0.1})

    assert run_cli("train", str(setup(tmp_path / "straight"))) == 0
    straight = only_run(tmp_path / "straight")
    best = json.loads((straight / "run.json").read_text())["best"]
    assert best["kept"] and best["step"] != 6  # what this test is about
    killed("affiner.training.loop.adopt_best:1+", "train", str(setup(tmp_path / "k")), cwd=tmp_path)
    run = only_run(tmp_path / "k")
    assert json.loads((run / "run.json").read_text())["status"] == "training"
    assert run_cli("train", "--resume", str(run)) == 0
    assert json.loads((run / "run.json").read_text())["best"] == best
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(run / "adapter_model.safetensors")
    assert all(bool((a[k] == b[k]).all()) for k in a)
    assert not (run / "checkpoints" / "best").exists()


def test_a_run_killed_before_its_first_checkpoint_is_told_to_train_again_not_to_resume(tmp_path, tiny_llama, data,
                                                                                       capsys):
    """--resume needs a checkpoint: every message about a run killed before its first one gives the command that
    works, the run's own config trained again (a new run)."""
    killed("affiner.core.runfolder.append_jsonl:1", "train", str(config(tmp_path, tiny_llama, data)), cwd=tmp_path)
    run = only_run(tmp_path)
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    again = f"affiner train {run / 'config.yaml'}"
    capsys.readouterr()
    assert run_cli("runs", "--dir", str(tmp_path / "runs")) == 0
    assert again in capsys.readouterr().out
    for argv in (["train", "--resume", str(run)], ["export", str(run), "--output", str(tmp_path / "out")]):
        assert run_cli(*argv) == 2
        err = capsys.readouterr().err
        assert again in err and "train --resume" not in err
    assert run_cli("train", str(run / "config.yaml")) == 0  # the advice works


def test_one_writer_per_run_folder_and_a_dead_writer_frees_it(tmp_path, tiny_llama, data, capsys):
    from affiner.core.runfolder import RunFolder

    killed("affiner.core.runfolder.append_jsonl:3", "train", str(config(tmp_path, tiny_llama, data)), cwd=tmp_path)
    run = only_run(tmp_path)
    capsys.readouterr()
    assert run_cli("runs", "--dir", str(tmp_path / "runs")) == 0  # recorded as training, but nobody writes it
    listing = capsys.readouterr().out
    assert f"{run.name}  stopped" in listing and f"affiner train --resume {run}" in listing
    holder = hold(run, "evaluate")
    try:
        assert run_cli("train", "--resume", str(run)) == 2
        assert f"being written by another affiner (affiner evaluate, PID {holder.pid}" in capsys.readouterr().err
        assert json.loads((run / "run.json").read_text())["status"] == "training"  # untouched by the refusal
        assert run_cli("runs", "--dir", str(tmp_path / "runs")) == 0
        assert f"{run.name}  training" in capsys.readouterr().out  # someone holds it: as recorded
    finally:
        holder.kill()  # kill -9: no clean-up, the lock file stays; the kernel drops the lock itself
        holder.wait()
    with RunFolder(run).writing("train"):
        pass


@pytest.fixture
def finished_run(tmp_path, tiny_llama, data) -> Path:
    assert run_cli("train", str(config(tmp_path / "f", tiny_llama, data, max_steps=2))) == 0
    return only_run(tmp_path / "f")


def test_an_evaluation_of_a_run_being_written_is_refused_before_answering(finished_run, capsys, monkeypatch):
    """Another writer holds the run: said at once, not after minutes of answers that could not be written."""
    from affiner.evaluation import evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "generate", lambda *a, **k: pytest.fail("answered before refusing"))
    holder = hold(finished_run, "train")
    try:
        assert run_cli("evaluate", str(finished_run)) == 2
        assert f"being written by another affiner (affiner train, PID {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("kill_on", ["os.replace:2", "os.rename:1", "os.rename:2"],
                         ids=["writing-staging", "retiring-old", "between-renames"])
def test_export_killed_never_leaves_half_an_export(tmp_path, finished_run, capsys, kill_on):
    out = tmp_path / "export"
    assert run_cli("export", str(finished_run), "--output", str(out)) == 0
    before = snapshot(out)
    killed(kill_on, "export", str(finished_run), "--output", str(out), "--overwrite", cwd=tmp_path)
    if kill_on != "os.rename:2":
        assert snapshot(out) == before  # the earlier export, byte for byte
    # The next export cleans up (an earlier export caught between its two renames is put back first).
    assert run_cli("export", str(finished_run), "--output", str(out), "--overwrite") == 0
    assert "cleaned what an interrupted affiner left" in capsys.readouterr().err
    assert snapshot(out).keys() == before.keys()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".export")] == []


def test_prepare_killed_keeps_the_earlier_prepared_folder(tmp_path, tiny_llama, data):
    cfg = write_config(tmp_path, tiny_llama, data)
    out = tmp_path / "prepared"
    assert run_cli("prepare", str(cfg), "--output", str(out)) == 0
    before = snapshot(out)
    killed("os.replace:2", "prepare", str(cfg), "--output", str(out), "--overwrite", cwd=tmp_path)
    assert snapshot(out) == before


def test_synth_killed_keeps_the_earlier_file(tmp_path):
    glossary = tmp_path / "g.csv"
    glossary.write_text("acronym,definition\nWHO,World Health Organization\nNASA,National Aeronautics and Space "
                        "Administration\n", encoding="utf-8")
    out = tmp_path / "qa.jsonl"
    assert run_cli("synth", str(glossary), "--output", str(out), "--per-entry", "2") == 0
    before = out.read_bytes()
    killed("os.replace:1", "synth", str(glossary), "--output", str(out), "--per-entry", "3", "--overwrite",
           cwd=tmp_path)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.glob(".qa.jsonl.*.partial")]  # the killed run's whole temporary copy
    assert run_cli("synth", str(glossary), "--output", str(out), "--per-entry", "3", "--overwrite") == 0
    assert not list(tmp_path.glob(".qa.jsonl.*.partial"))  # cleaned by the next run


@pytest.mark.parametrize("kill_on", ["os.replace:1", "os.fsync:3"], ids=["taking-the-lock", "writing-the-files"])
def test_evaluate_killed_keeps_the_earlier_evaluation(tmp_path, finished_run, kill_on, capsys):
    """Killed while it takes the run's lock, or once the earlier evaluation is copied aside and the new files are
    being written: the earlier evaluation is still the run's, whole, and `runs` lists the run as evaluated."""
    assert run_cli("evaluate", str(finished_run), "--max-new-tokens", "4") == 0
    names = ("metrics.json", "summary.json", "report.html", "report.md", "answers.csv")
    before = {name: (finished_run / name).read_bytes() for name in names}
    killed(kill_on, "evaluate", str(finished_run), "--max-new-tokens", "6", cwd=tmp_path)
    assert {name: (finished_run / name).read_bytes() for name in names} == before
    capsys.readouterr()
    assert run_cli("runs", "--dir", str(finished_run.parent)) == 0
    assert "not evaluated" not in capsys.readouterr().out
    assert run_cli("evaluate", str(finished_run), "--max-new-tokens", "6") == 0
    archived = sorted((finished_run / "evaluations").iterdir())
    assert (archived[-1] / "metrics.json").read_bytes() == before["metrics.json"]


def test_an_evaluation_killed_before_its_first_file_leaves_its_output_folder_usable(tmp_path, tiny_llama, data,
                                                                                  finished_run):
    out = tmp_path / "report"
    argv = ["evaluate", "--base", str(tiny_llama), "--adapter", str(finished_run), "--test", str(data),
            "--template", "qa", "--output", str(out), "--max-new-tokens", "4"]
    for kill_on in ("os.replace:1", "os.replace:2"):  # writing who holds the lock; then summary.json
        killed(kill_on, *argv, cwd=tmp_path)
        assert not (out / "summary.json").exists()
    assert run_cli(*argv) == 0 and (out / "summary.json").is_file()
