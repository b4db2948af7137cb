"""`affiner sweep`: grid expansion and validation, a sweep of tiny runs, its table and plot, Ctrl-C and --resume,
failed points."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_config

from affiner.experiments import grid as sweep_grid
from affiner.experiments import sweep, sweep_table
from affiner.experiments import workflow as train_mod
from affiner.core.errors import AffinerError
from affiner.core.files import read_json

PNG = b"\x89PNG\r\n\x1a\n"


def affiner_sweep(*argv: str) -> int:
    return run_cli("sweep", *argv)


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def read_table(folder: Path) -> list[dict[str, str]]:
    with open(folder / "sweep.csv", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def check_row_against_run(row: dict[str, str], metric: str) -> None:
    """A table row carries the figures the run folder itself reports, not the sweep's own copy."""
    run = Path(row["run"])
    report = read_json(run / "metrics.json")
    assert report["models"] == ["base", "tuned"]
    for model in ("base", "tuned"):
        assert float(row[f"{metric}_{model}"]) == pytest.approx(report["metrics"][metric][model]["mean"])
    assert float(row[f"{metric}_delta"]) == pytest.approx(
        report["metrics"][metric]["tuned"]["mean"] - report["metrics"][metric]["base"]["mean"])
    assert float(row["loss_tuned"]) == pytest.approx(report["metrics"]["loss"]["tuned"]["mean"])
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert float(row["train_loss"]) == pytest.approx(log[-1]["loss"])
    assert int(row["steps"]) == read_json(run / "run.json")["steps"]
    summary = read_json(run / "summary.json")
    assert summary["tuned"]["questions"] == summary["base"]["questions"] == 2


# ---------------------------------------------------------------------------------------- the grid


def test_values_split_at_top_level_commas_and_parse_as_yaml():
    assert sweep_grid.split_values("1e-4,3e-4,1e-3") == ["1e-4", "3e-4", "1e-3"]
    assert sweep_grid.split_values("[q_proj,v_proj],[q_proj, k_proj,v_proj,o_proj]") == \
        ["[q_proj,v_proj]", "[q_proj, k_proj,v_proj,o_proj]"]
    assert sweep_grid.split_values("{a: 1, b: [2, 3]},'x,y',\"p,q\"") == ["{a: 1, b: [2, 3]}", "'x,y'", '"p,q"']
    assert [sweep_grid.parse_value(v) for v in ("1.0e-3", "2", "true", "[q_proj,v_proj]", "cosine", "'x,y'")] == \
        [1e-3, 2, True, ["q_proj", "v_proj"], "cosine", "x,y"]
    with pytest.raises(AffinerError, match="unclosed bracket"):
        sweep_grid.split_values("[q_proj,v_proj")


def test_grid_expands_to_every_combination_first_key_outermost():
    grid = sweep_grid.parse_grid(["train.learning_rate=1e-4,3e-4", "train.epochs=1,2",
                             "lora.target_modules=[q_proj,v_proj],[k_proj]"])
    assert grid == [("train.learning_rate", ["1e-4", "3e-4"]), ("train.epochs", ["1", "2"]),
                    ("lora.target_modules", ["[q_proj,v_proj]", "[k_proj]"])]
    points = sweep_grid.expand(grid)
    assert len(points) == 8
    assert [tuple(p.values()) for p in points[:3]] == [("1e-4", "1", "[q_proj,v_proj]"), ("1e-4", "1", "[k_proj]"),
                                                      ("1e-4", "2", "[q_proj,v_proj]")]
    assert points[-1] == {"train.learning_rate": "3e-4", "train.epochs": "2", "lora.target_modules": "[k_proj]"}
    assert sweep_grid.point_name("quickstart", {"train.learning_rate": "1e-4", "train.epochs": "2"}) == \
        "quickstart-lr1e-4-ep2"
    assert sweep_grid.point_name("q", {"lora.target_modules": "[q_proj, v_proj]", "model.base": "/m/tiny-gpt2"}) == \
        "q-tmq_proj.v_proj-tiny-gpt2"


def test_every_point_is_validated_with_typed_values_and_recorded(tmp_path, tiny_gpt2):
    config = write_config(tmp_path, tiny_gpt2, "data.jsonl", train={"max_steps": None})
    folder, state = sweep.plan_sweep(str(config), ["train.learning_rate=1e-4,1e-3",
                                                   "lora.target_modules=[c_attn],[c_attn,c_proj]",
                                                   "train.epochs=1,2.5"],
                                     ["lora.r=2"], "rouge_l", tmp_path / "sw")
    assert read_json(folder / "sweep.json") == state
    points = state["points"]
    assert [p["index"] for p in points] == list(range(1, 9))
    assert {p["status"] for p in points} == {"pending"}
    assert points[0]["name"] == "test-lr1e-4-tmc_attn-ep1"
    assert points[0]["values"] == {"train.learning_rate": 1e-4, "lora.target_modules": ["c_attn"], "train.epochs": 1.0}
    assert points[7]["values"]["lora.target_modules"] == ["c_attn", "c_proj"]
    assert all(p["config"]["lora"]["r"] == 2 and p["config"]["output_dir"] == str(folder / "runs") for p in points)
    assert len({p["name"] for p in points}) == 8
    assert state["metric"] == "rouge_l" and state["overrides"] == ["lora.r=2"]
    assert state["grid"][1] == {"key": "lora.target_modules", "values": ["[c_attn]", "[c_attn,c_proj]"]}


@pytest.mark.parametrize("argv,message", [
    (["--grid", "train.lerning_rate=1e-4,1e-3"],
     r"grid point 1 of 2 \(train\.lerning_rate=1e-4\).*train\.lerning_rate: unknown key, did you mean 'learning_rate'"),
    (["--grid", "train.learning_rate=1e-4,-1"],
     r"grid point 2 of 2 \(train\.learning_rate=-1\).*train\.learning_rate: input should be greater than 0"),
    (["--grid", "train.scheduler=cosine,cosinus", "--grid", "lora.r=4,8"],
     r"grid point 3 of 4 \(train\.scheduler=cosinus, lora\.r=4\).*train\.scheduler"),
    (["--grid", "lora.r=4,8", "--grid", "lora.r=16"], r"--grid lora\.r is given twice"),
    (["--grid", "lora=[]", "--grid", "lora.r=4,8"], r"overlap"),
    (["--set", "lora.r=4", "--grid", "lora.r=8,16"], r"lora\.r is both set \(--set lora\.r=4\) and swept"),
    (["--grid", "lora.r=4,8,4"], r"--grid lora\.r lists 4 more than once"),
    (["--grid", "train.learning_rate=1e-3,0.001"], r"1e-3 and 0\.001 are the same value"),
    (["--grid", "lora.r=4,,8"], r"empty value"),
    (["--grid", "lora.target_modules=[c_attn,c_proj"], r"lora\.target_modules has an unclosed bracket"),
    (["--grid", "lora.r"], r"must look like section\.key=value1,value2"),
    (["--grid", "name=a,b"], r"the sweep sets name"),
    (["--grid", "lora.r=4,8", "--set", "output_dir=elsewhere"], r"choose the sweep folder with --output"),
    (["--grid", "train.epochs=1,2"], r"train\.epochs has no effect while train\.max_steps=4 is set"),
    (["--grid", "lora.r=4,8", "--metric", "containz"], r"--metric containz .* Did you mean contains\?"),
    (["--grid", "lora.r=4,8", "--metric", "judge"], r"--metric judge needs an LLM judge"),
    ([], r"give at least one --grid"),
    (["--grid", "lora.target_modules=[c_attn],[q_proj]"],  # what the architecture allows, before any point trains
     r"grid point 2 of 2 \(lora\.target_modules=\[q_proj\]\): lora\.target_modules names layers .* q_proj"),
])
def test_bad_grids_are_one_paragraph_exit_2_and_write_nothing(tmp_path, monkeypatch, capsys, argv, message,
                                                               tiny_gpt2):
    config = write_config(tmp_path / "cfg", tiny_gpt2, "data.jsonl")
    monkeypatch.chdir(tmp_path)
    assert affiner_sweep(str(config), *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("affiner sweep: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg"]  # no sweeps/ folder, no run


def test_resume_and_output_are_checked(tmp_path, capsys, tiny_gpt2):
    config = write_config(tmp_path / "cfg", tiny_gpt2, "data.jsonl")
    existing = tmp_path / "taken"
    existing.mkdir()
    assert affiner_sweep(str(config), "--grid", "lora.r=4,8", "--output", str(existing)) == 2
    assert "already exists" in capsys.readouterr().err and not any(existing.iterdir())
    assert affiner_sweep("--resume", str(tmp_path / "nope")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert affiner_sweep("--resume", str(existing)) == 2
    assert "not an affiner sweep folder" in capsys.readouterr().err
    assert affiner_sweep("--resume", str(existing), "--grid", "lora.r=4") == 2
    assert "drop --grid" in capsys.readouterr().err
    for damaged in ("{}", "null", '{"points": [1]}'):  # valid JSON, not a sweep's plan
        (existing / "sweep.json").write_text(damaged)
        assert affiner_sweep("--resume", str(existing)) == 2
        err = capsys.readouterr().err
        assert "sweep.json is damaged" in err and "Traceback" not in err
    assert affiner_sweep("--resume", str(existing / "sweep.json")) == 2
    assert f"is a file; --resume takes the sweep's folder ({existing})" in capsys.readouterr().err


def test_resume_picks_the_right_continuation_for_each_point(tmp_path):
    def point(status, run=None):
        return {"status": status, "run": run}

    (tmp_path / "runs" / "trained").mkdir(parents=True)
    (tmp_path / "runs" / "trained" / "run.json").write_text('{"status": "finished"}')
    (tmp_path / "runs" / "half" / "checkpoints" / "step-000002").mkdir(parents=True)
    (tmp_path / "runs" / "half" / "run.json").write_text('{"status": "interrupted"}')
    (tmp_path / "runs" / "started").mkdir(parents=True)
    (tmp_path / "runs" / "started" / "run.json").write_text('{"status": "training"}')
    assert sweep.next_action(point("finished", "runs/trained"), tmp_path) == "skip"
    assert sweep.next_action(point("pending"), tmp_path) == "fresh"
    assert sweep.next_action(point("running"), tmp_path) == "fresh"
    assert sweep.next_action(point("running", "runs/trained"), tmp_path) == "evaluate"
    assert sweep.next_action(point("running", "runs/half"), tmp_path) == "resume"
    assert sweep.next_action(point("running", "runs/started"), tmp_path) == "fresh"
    assert sweep.next_action(point("failed", "runs/half"), tmp_path) == "fresh"


def test_table_and_plot_of_a_recorded_sweep(tmp_path):
    def point(index, lr, r, status, loss=None, base=2.0):
        metrics = None if loss is None else {"base": {"loss": base, "contains": 0.0},
                                             "tuned": {"loss": loss, "contains": 0.5}, "train_loss": 1.0, "steps": 4}
        return {"index": index, "name": f"p{index}", "overrides": {"train.learning_rate": lr, "lora.r": r},
                "values": {"train.learning_rate": float(lr), "lora.r": int(r)}, "status": status,
                "run": f"runs/p{index}" if metrics else None, "metrics": metrics, "duration": 12.0,
                "error": None if metrics else "no training row survives"}

    state = {"config": "c.yaml", "overrides": [], "metric": "loss",
             "grid": [{"key": "train.learning_rate", "values": ["1e-4", "1e-2"]}, {"key": "lora.r", "values": ["4", "8"]}],
             "points": [point(1, "1e-4", "4", "finished", 1.5), point(2, "1e-4", "8", "finished", 1.2),
                        point(3, "1e-2", "4", "failed"), point(4, "1e-2", "8", "finished", 1.7)]}
    rows = sweep_table.table_rows(tmp_path, state)[1]
    assert [r[0] for r in rows] == ["", "*", "", ""]  # lower loss is better
    assert rows[1][2:8] == ["1e-4", "8", 2.0, 1.2, pytest.approx(-0.8), 1.2]
    text = sweep_table.format_table(tmp_path, state)
    assert "best loss after tuning: point 2, p2" in text and "failed" in text
    markdown = sweep_table.format_markdown(tmp_path, state)
    assert "| * | 2 | 1e-4 | 8 |" in markdown and "point 3 (p3): no training row survives" in markdown
    assert sweep_table.plot(state).startswith(PNG)
    state["metric"] = "contains"
    state["grid"][0]["values"] = ["[a,b]", "[c]"]
    for p in state["points"]:
        p["overrides"]["train.learning_rate"] = "[a,b]" if p["index"] < 3 else "[c]"
        p["values"]["train.learning_rate"] = ["a", "b"] if p["index"] < 3 else ["c"]
    assert sweep_table.plot(state).startswith(PNG)  # non-numeric values: one tick per value
    assert "contains base" in sweep_table.format_table(tmp_path, state)
    assert sweep_table.best_point(state)["index"] == 2  # every point ties at 50 %: the lower held-out loss wins


# ---------------------------------------------------------------------------------------- tiny sweeps


def tiny_config(folder: Path, base: Path, data: Path) -> Path:
    """Three steps and four-token answers: each point trains and evaluates in a few seconds."""
    return write_config(folder, base, data, train={"max_steps": 3}, eval={"max_new_tokens": 4})


@pytest.fixture(autouse=True)
def no_embedding_model(monkeypatch):
    """Loading MiniLM for the embedding score costs ~20 s once; the sweep never looks at that score."""
    from affiner.evaluation import metrics

    monkeypatch.setattr(metrics, "embedding_similarity", lambda answers, references: [0.0] * len(answers))


def test_a_two_point_sweep_trains_evaluates_and_compares(tmp_path, tiny_gpt2, qa_file, capsys):
    config = tiny_config(tmp_path, tiny_gpt2, qa_file)
    folder = tmp_path / "sw"
    assert affiner_sweep(str(config), "--grid", "train.learning_rate=1e-3,1e-2", "--metric", "loss",
                         "--output", str(folder)) == 0
    out = capsys.readouterr().out
    state = read_json(folder / "sweep.json")
    assert [p["status"] for p in state["points"]] == ["finished", "finished"]
    assert [p["name"] for p in state["points"]] == ["test-lr1e-3", "test-lr1e-2"]
    runs = sorted(p.name for p in (folder / "runs").iterdir())
    assert len(runs) == 2 and [p["run"] for p in state["points"]] == [f"runs/{r}" for r in
                                                                      sorted(runs, key=lambda r: "1e-2" in r)]
    for p in state["points"]:
        assert read_json(folder / p["run"] / "run.json")["status"] == "finished"
        assert p["duration"] > 0 and p["attempts"] == 1
    table = read_table(folder)
    assert [r["train.learning_rate"] for r in table] == ["1e-3", "1e-2"]
    for row in table:
        check_row_against_run(row, "loss")
        assert row["status"] == "finished"
    losses = [float(r["loss_tuned"]) for r in table]
    assert [r["best"] for r in table] == ["*" if v == min(losses) else "" for v in losses]
    assert "loss base" in out and "held-out loss (tuned)" in out and str(folder / "sweep.md") in out
    assert "| train.learning_rate |" in (folder / "sweep.md").read_text()
    assert (folder / "sweep.png").read_bytes().startswith(PNG)
    assert "config.yaml" in {p.name for p in (folder / state["points"][0]["run"]).iterdir()}


def test_a_metric_a_point_did_not_measure_is_said_at_once(capsys):
    """--metric contains_key over rows without a key would rank nothing: said after the first point, not the last."""
    sweep.warn_if_unmeasured("contains_key", {"index": 1, "metrics": {"tuned": {"contains": 1.0, "contains_key": None}}})
    err = capsys.readouterr().err
    assert "point 1's evaluation did not measure contains_key" in err and "eval.key_before" in err
    sweep.warn_if_unmeasured("contains", {"index": 1, "metrics": {"tuned": {"contains": 0.0}}})
    assert capsys.readouterr().err == ""


def test_an_interrupted_sweep_resumes_with_its_second_point(tmp_path, tiny_gpt2, qa_file, monkeypatch, capsys,
                                                            interrupt_training):
    config = tiny_config(tmp_path, tiny_gpt2, qa_file)
    folder = tmp_path / "sw"
    real_train = train_mod.train
    calls: list = []

    def train_and_press_ctrl_c_in_the_second_run(config=None, resume=None):
        calls.append(resume)
        if len(calls) == 2:
            interrupt_training(2)  # Ctrl-C after the second run's step 2 (of 3)
        return real_train(config, resume)

    monkeypatch.setattr(train_mod, "train", train_and_press_ctrl_c_in_the_second_run)
    assert affiner_sweep(str(config), "--grid", "train.learning_rate=1e-3,1e-2", "--output", str(folder)) == 130
    err = capsys.readouterr().err
    assert f"affiner sweep --resume {folder}" in err
    state = read_json(folder / "sweep.json")
    first, second = state["points"]
    assert state["status"] == "interrupted"
    assert first["status"] == "finished" and second["status"] == "running"
    assert (folder / second["run"] / "checkpoints" / "step-000002").is_dir()
    before = snapshot(folder / first["run"])
    assert not (folder / "sweep.csv").exists()

    interrupt_training.disarm()
    calls.clear()
    assert affiner_sweep("--resume", str(folder)) == 0
    assert calls == [folder / second["run"]]  # only the second point, continued from its checkpoint
    assert snapshot(folder / first["run"]) == before
    state = read_json(folder / "sweep.json")
    assert [p["status"] for p in state["points"]] == ["finished", "finished"]
    assert state["points"][1]["run"] == second["run"] and state["points"][1]["abandoned"] == []
    assert state["points"][1]["attempts"] == 2 and state["points"][0]["attempts"] == 1
    assert "resumed" in read_json(folder / second["run"] / "run.json")
    assert len(list((folder / "runs").iterdir())) == 2
    table = read_table(folder)
    assert [r["status"] for r in table] == ["finished", "finished"]
    for row in table:
        check_row_against_run(row, "contains")
    assert "Resuming sweep" in capsys.readouterr().out


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_gpt2, qa_file, monkeypatch, capsys):
    config = tiny_config(tmp_path, tiny_gpt2, qa_file)
    folder = tmp_path / "sw"
    assert affiner_sweep(str(config), "--grid", "data.max_length=8,96", "--output", str(folder)) == 2
    captured = capsys.readouterr()
    assert "1 of 2 point(s) failed (point 1, test-len8: no row of" in captured.err
    assert f"affiner sweep --resume {folder}" in captured.err
    state = read_json(folder / "sweep.json")
    failed, good = state["points"]
    assert failed["status"] == "failed" and "survives" in failed["error"] and failed["run"] is None
    assert good["status"] == "finished"
    table = read_table(folder)
    assert [r["status"] for r in table] == ["failed", "finished"]
    assert table[0]["contains_tuned"] == "" and table[0]["run"] == ""
    check_row_against_run(table[1], "contains")
    assert "failed" in captured.out and (folder / "sweep.png").read_bytes().startswith(PNG)

    before = snapshot(folder / good["run"])

    def out_of_memory(config=None, resume=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_mod, "train", out_of_memory)
    assert affiner_sweep("--resume", str(folder)) == 2  # the failed point is retried, and fails for another reason
    state = read_json(folder / "sweep.json")
    assert state["points"][0]["attempts"] == 2 and state["points"][1]["attempts"] == 1
    assert state["points"][0]["error"].startswith("out of memory: CUDA out of memory")
    assert snapshot(folder / good["run"]) == before
    assert "1 of 2 point(s) failed (point 1, test-len8: out of memory" in capsys.readouterr().err


def test_a_point_whose_judge_left_answers_unjudged_fails_and_resumes_by_evaluating_again(tmp_path, tiny_gpt2, qa_file,
                                                                                         monkeypatch, capsys):
    """A sweep ranked by a judge that could not answer would compare nothing: the point fails (exit 3, as `affiner
    run`), and --resume evaluates its trained run again instead of training it anew."""
    from fake_endpoint import Reply, running_server

    monkeypatch.setenv("AFFINER_CACHE", str(tmp_path / "cache"))
    with running_server() as server:
        server.behaviour = lambda body: Reply(status=404, body=b'{"error": {"message": "model stand-in not found"}}')
        config = write_config(tmp_path, tiny_gpt2, qa_file, train={"max_steps": 3},
                              eval={"max_new_tokens": 4, "judge": {"url": server.url, "model": "stand-in"}})
        folder = tmp_path / "sw"
        assert affiner_sweep(str(config), "--grid", "train.learning_rate=1e-3", "--output", str(folder)) == 3
        (point,) = read_json(folder / "sweep.json")["points"]
        assert point["status"] == "failed" and "could not judge" in point["error"]
        assert "affiner sweep --resume" in capsys.readouterr().err
        server.behaviour = lambda body: Reply("<result>tie</result>" if "<answer_A>" in body["messages"][-1]["content"]
                                              else "<result>1</result><explain>It matches.</explain>")
        assert affiner_sweep("--resume", str(folder)) == 0
    (again,) = read_json(folder / "sweep.json")["points"]
    assert again["status"] == "finished" and again["run"] == point["run"] and again["metrics"]
    assert [p.name for p in (folder / "runs").iterdir()] == [point["run"].split("/")[-1]]  # not trained again


def stopped_before_training(tmp_path, monkeypatch, base) -> Path:
    """A two-point sweep whose first point was stopped by Ctrl-C before its run folder existed: its folder."""
    config, folder = write_config(tmp_path, base, "data.jsonl"), tmp_path / "sw"

    def ctrl_c(config=None, resume=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train", ctrl_c)
    assert affiner_sweep(str(config), "--grid", "lora.r=4,8", "--output", str(folder)) == 130
    return folder


def test_ctrl_c_before_the_run_folder_exists_leaves_the_point_to_start_again(tmp_path, monkeypatch, capsys,
                                                                              tiny_gpt2):
    folder = stopped_before_training(tmp_path, monkeypatch, tiny_gpt2)
    assert f"affiner sweep --resume {folder}" in capsys.readouterr().err
    state = read_json(folder / "sweep.json")
    assert [p["status"] for p in state["points"]] == ["running", "pending"]
    assert state["points"][0]["run"] is None and sweep.next_action(state["points"][0], folder) == "fresh"


def test_a_second_process_on_a_running_sweep_is_refused_and_touches_nothing(tmp_path, monkeypatch, capsys,
                                                                             tiny_gpt2):
    """`affiner sweep --resume` in another terminal while the sweep runs would train every point twice."""
    from affiner.core.files import sole_writer

    folder = stopped_before_training(tmp_path, monkeypatch, tiny_gpt2)
    before = (folder / "sweep.json").read_bytes()
    monkeypatch.setattr(train_mod, "train", lambda *a, **k: pytest.fail("a second sweep process trained"))
    capsys.readouterr()
    with sole_writer(folder, "sweep"):  # the first process, still running
        assert affiner_sweep("--resume", str(folder)) == 2
    assert re.search(r"is being written by another affiner \(affiner sweep, PID \d+", capsys.readouterr().err)
    assert (folder / "sweep.json").read_bytes() == before


def test_the_points_are_tracked_together_under_the_sweeps_name(tmp_path, monkeypatch, tiny_gpt2):
    """Each point's config is named after its values: without a shared name, MLflow would file every point in an
    experiment (and W&B in a project) of its own, where they cannot be compared."""
    import os

    for key in sweep.TRACKER_GROUPS:
        monkeypatch.delenv(key, raising=False)
    config, folder, seen = write_config(tmp_path, tiny_gpt2, "data.jsonl"), tmp_path / "sw", []

    def train(config=None, resume=None):
        seen.append({key: os.environ.get(key) for key in sweep.TRACKER_GROUPS})
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train", train)
    assert affiner_sweep(str(config), "--grid", "lora.r=4,8", "--output", str(folder)) == 130
    assert seen == [{"MLFLOW_EXPERIMENT_NAME": "test", "WANDB_PROJECT": "test"}]
    assert not any(key in os.environ for key in sweep.TRACKER_GROUPS)  # only while the points run
    monkeypatch.setenv("WANDB_PROJECT", "mine")  # a name the user gives is kept
    assert affiner_sweep("--resume", str(folder)) == 130
    assert seen[-1] == {"MLFLOW_EXPERIMENT_NAME": "test", "WANDB_PROJECT": "mine"}


def test_a_sweep_killed_before_it_recorded_its_run_continues_that_run(tmp_path, tiny_gpt2, qa_file, capsys,
                                                                      monkeypatch):
    """kill -9 (no Python clean-up) during a point's training, before sweep.json names its run: --resume finds
    the run the point left and continues it from its checkpoint, instead of training another beside it, however
    the sweep folder is spelt (here relative, where the sweep was started with its absolute path)."""
    import os
    import signal
    import subprocess
    import sys

    config = write_config(tmp_path, tiny_gpt2, qa_file, train={"max_steps": 4, "save_steps": 1},
                          eval={"max_new_tokens": 4})
    folder = tmp_path / "sw"
    driver = Path(__file__).with_name("kill_driver.py")
    killed = subprocess.run([sys.executable, str(driver), "affiner.core.runfolder.append_jsonl:3", "sweep",
                             str(config), "--grid", "train.learning_rate=1e-3,1e-2", "--output", str(folder)],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (left,) = list((folder / "runs").iterdir())
    assert read_json(folder / "sweep.json")["points"][0]["run"] is None  # what the kill left unrecorded
    assert (left / "checkpoints").is_dir()
    monkeypatch.chdir(tmp_path)
    assert affiner_sweep("--resume", "sw") == 0
    assert f"continuing runs/{left.name}" in capsys.readouterr().out
    first, second = read_json(folder / "sweep.json")["points"]
    assert first["run"] == f"runs/{left.name}" and first["status"] == "finished" and first["abandoned"] == []
    assert "resumed" in read_json(left / "run.json")
    assert len(list((folder / "runs").iterdir())) == 2  # one run per point
