"""Several runs evaluated together: each run folder gets its own evaluation (base against that run: summary,
metrics, report), linked to the side-by-side comparison in the first run's comparison/ folder, so that
`affiner runs` and every later command see each run as evaluated."""

from __future__ import annotations

import json

import pytest

from affiner.core.config import load_config
from affiner.experiments import workflow
from conftest import run_cli, write_config


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_gpt2):
    folder = tmp_path_factory.mktemp("several")
    runs = []
    for rate in (1e-2, 1e-3):
        config = write_config(folder / str(rate), tiny_gpt2, "embedded:glossary-train.json",
                              output_dir=str(folder / "runs"), train={"max_steps": 1, "learning_rate": rate},
                              eval={"max_new_tokens": 4, "max_questions": 3, "general": True})
        runs.append(workflow.train(load_config(str(config))))
    return folder / "runs", runs


def test_each_run_gets_its_own_evaluation_linked_to_the_comparison(two_runs, capsys):
    root, (first, second) = two_runs
    assert run_cli("evaluate", str(first), str(second)) == 0
    printed = capsys.readouterr().out
    comparison = first / "comparison"
    assert f"Report: {comparison / 'report.html'}" in printed
    for run in (first, second):
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["models"] == ["base", "tuned"]
        assert metrics["settings"]["compared with"].endswith(f"side by side in {comparison / 'report.html'}")
        assert set(metrics["general"]["changes"]) == {"tuned"}  # the no-harm check, of this run alone
        summary = json.loads((run / "summary.json").read_text())
        assert summary["run"] == str(run) and summary["tuned"]["questions"] == 3
        assert "tuned" in summary["answers"][0] and (run / "report.html").is_file()
        assert "Not evaluated yet" not in (run / "README.md").read_text()  # its card has its evaluation
    together = json.loads((comparison / "metrics.json").read_text())
    assert together["models"] == ["base", first.name, second.name]
    assert together["settings"]["each run's own report"] == f"{first / 'report.html'}, {second / 'report.html'}"
    # The tuned figures of each run are the same in its own evaluation and in the comparison.
    for run in (first, second):
        own = json.loads((run / "metrics.json").read_text())["metrics"]["rouge_l"]["tuned"]["mean"]
        assert own == together["metrics"]["rouge_l"][run.name]["mean"]


def test_runs_lists_both_as_evaluated(two_runs, capsys):
    root, (first, second) = two_runs
    assert run_cli("evaluate", str(first), str(second)) == 0
    capsys.readouterr()
    assert run_cli("runs", "--dir", str(root)) == 0
    listing = capsys.readouterr().out
    assert "not evaluated" not in listing
    assert [line.split()[0] for line in listing.splitlines()[1:]] == [first.name, second.name]
    assert (first / "comparison" / "evaluations" / "1" / "report.html").is_file()  # the earlier comparison kept


def test_runs_trained_with_another_system_prompt_are_refused_not_prompted_alike(two_runs, tmp_path, tiny_gpt2,
                                                                               capsys):
    """Every model of one evaluation is prompted with one template: a run trained with another system prompt
    would be answered and scored with a prompt it never saw."""
    root, (first, _) = two_runs
    config = write_config(tmp_path, tiny_gpt2, "embedded:glossary-train.json", output_dir=str(tmp_path / "runs"),
                          train={"max_steps": 1}, data={"system_prompt": "Réponds en français."})
    other = workflow.train(load_config(str(config)))
    for verb in ("evaluate", "chat"):
        assert run_cli(verb, str(first), str(other)) == 2
        message = capsys.readouterr().err
        assert f"{other} was trained with another prompt than {first}" in message and "Traceback" not in message
    assert not (first / "comparison" / "evaluations" / "2").exists()


def test_a_run_folder_called_base_is_not_taken_for_the_base_model(two_runs, tmp_path):
    from affiner.core.runfolder import model_names

    root, (first, _) = two_runs
    named_base = tmp_path / "copies" / "base"
    assert model_names([first, named_base]) == [f"{first.parent.name}/{first.name}", "copies/base"]
