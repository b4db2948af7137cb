"""`affiner evaluate RUN --test FILE` checks the file against the run's training questions: a question the model
trained on measures memory, not learning, so it is left out of the scores (--keep-overlap keeps it), counted
word for word and up to case and punctuation, and listed in the report with why."""

from __future__ import annotations

import json

import pytest

from affiner.core.config import load_config
from affiner.data.filters import EXACT_OVERLAP, NORMALISED_OVERLAP
from affiner.evaluation.evaluate import evaluate
from affiner.experiments import workflow
from conftest import run_cli, write_config

TRAIN = [{"question": f"What does {a} stand for?", "answer": f"{a} stands for {d}."}
         for a, d in [("QUILT", "Queue of Unified Index Lookup Tables"), ("FROND", "Federated Registry of Open Data"),
                      ("MAPLE", "Modular Archive for Prototype Lab Experiments"), ("GLINT", "Geospatial Layer"),
                      ("TANGO", "Technical Assembly"), ("BRISK", "Bureau of Regional Irrigation")]]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_gpt2):
    folder = tmp_path_factory.mktemp("overlap")
    train = _jsonl(folder / "train.jsonl", TRAIN)
    config = write_config(folder, tiny_gpt2, train, train={"max_steps": 1}, eval={"max_new_tokens": 4})
    return workflow.train(load_config(str(config)))


@pytest.fixture
def test_file(tmp_path):
    return _jsonl(tmp_path / "course-test.jsonl", [
        {"question": "What does QUILT stand for?", "answer": "Queue of Unified Index Lookup Tables"},  # word for word
        {"question": "what does  maple stand for", "answer": "Modular Archive for Prototype Lab Experiments"},
        {"question": "Which words make up ZEPHYR?", "answer": "Zonal Electric Power Hybrid"},  # new
    ])


def test_questions_the_run_trained_on_are_left_out_counted_and_listed(run, test_file):
    evaluation = evaluate(run, test=str(test_file))
    settings = evaluation["settings"]
    assert settings["questions"] == 1
    assert [e["question"] for e in evaluation["examples"]] == ["Which words make up ZEPHYR?"]
    assert settings["overlap with the training rows"] == (
        "2 of 3 test questions also in the training rows (1 word for word, 1 up to case, spacing and punctuation), "
        "left out of the scores")
    reasons = {row["question"]: row["reason"] for row in evaluation["not_evaluated"]["rows"]}
    assert reasons == {"What does QUILT stand for?": EXACT_OVERLAP, "what does  maple stand for": NORMALISED_OVERLAP}
    report = (run / "report.md").read_text()
    assert "## Held-out rows not evaluated" in report and EXACT_OVERLAP in report


def test_keep_overlap_scores_them_and_still_says_so(run, test_file, capsys):
    assert run_cli("evaluate", str(run), "--test", str(test_file), "--keep-overlap") == 0
    settings = json.loads((run / "metrics.json").read_text())["settings"]
    assert settings["questions"] == 3
    assert settings["overlap with the training rows"].endswith("kept in the scores (--keep-overlap)")
    card = (run / "README.md").read_text()  # the run's model card: no "held-out" figures on trained questions
    assert "3 test questions" in card and "**Not held out:** 2 of 3 test questions also in the training rows" in card
    assert "dataset_type: held-out" not in card and "held-out questions" not in card


def test_a_test_file_without_overlap_says_it_was_checked(run, tmp_path):
    clean = _jsonl(tmp_path / "clean.jsonl", [{"question": "Which words make up ZEPHYR?", "answer": "Zonal"}])
    settings = evaluate(run, test=str(clean))["settings"]
    assert settings["overlap with the training rows"].startswith("0 of 1 test questions")
    assert "held-out rows not evaluated" not in settings


def test_training_rows_gone_means_not_checked_not_silence(run, test_file, tmp_path, capsys):
    moved = tmp_path / "moved-run"
    import shutil

    shutil.copytree(run, moved)
    config = (moved / "config.yaml").read_text().replace(str(run.parent.parent / "train.jsonl"),
                                                          str(tmp_path / "gone.jsonl"))
    (moved / "config.yaml").write_text(config)
    settings = evaluate(moved, test=str(test_file))["settings"]
    assert settings["questions"] == 3
    assert settings["overlap with the training rows"].startswith("not checked: the training rows")
    assert "gone.jsonl" in capsys.readouterr().err
