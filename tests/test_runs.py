"""affiner runs: the list and the comparison are read from the runs' own files, and wrong input is one
clear paragraph."""

from __future__ import annotations

import json

import pytest
from conftest import write_config

from affiner import cli
from affiner.experiments.runs import find_runs


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_gpt2):
    root = tmp_path_factory.mktemp("runs-verb")
    qa = root / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"What is item {i}?", "answer": f"Item {i}."}) + "\n"
                          for i in range(8)), encoding="utf-8")
    folders = []
    for lr in (1e-2, 1e-3):
        config = write_config(root / f"lr{lr}", tiny_gpt2, qa, output_dir=str(root / "runs"),
                              train={"max_steps": 2, "learning_rate": lr})
        cli.main(["train", str(config)])
        folders = find_runs(root / "runs")
    cli.main(["evaluate", str(folders[0]), "--max-new-tokens", "4"])
    return root / "runs", folders


def test_list_shows_every_run_with_its_scores(two_runs, capsys):
    root, (first, second) = two_runs
    capsys.readouterr()
    cli.main(["runs", "--dir", str(root)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["run", "status", "model", "method"]
    assert [line.split()[0] for line in lines[1:]] == [first.name, second.name]
    evaluation = json.loads((first / "metrics.json").read_text())["metrics"]
    correct = (f"contains {100 * evaluation['contains']['base']['mean']:.0f} % → "
               f"{100 * evaluation['contains']['tuned']['mean']:.0f} %")  # the headline named
    assert correct in lines[1] and f"{evaluation['loss']['tuned']['mean']:.3f}" in lines[1]
    assert "not evaluated" in lines[2] and "finished" in lines[2]
    header = lines[0].split()
    minutes, steps = header.index("min"), header.index("steps")
    assert [line.split()[steps] for line in lines[1:]] == ["2", "2"]
    assert [line.split()[minutes] for line in lines[1:]] == ["<0.1", "<0.1"]  # seconds of training, not "-"
    cli.main(["runs", "--dir", str(root.parent)])  # a sweep's (or a project's) folder: its runs/ are listed
    assert capsys.readouterr().out.splitlines() == lines
    cli.main(["runs", str(root)])  # a folder in place of `list`, as a user types it
    assert capsys.readouterr().out.splitlines() == lines


def test_compare_shows_config_differences_and_scores_side_by_side(two_runs, capsys):
    _, (first, second) = two_runs
    capsys.readouterr()
    cli.main(["runs", "compare", str(first), str(second), "--json"])
    comparison = json.loads(capsys.readouterr().out)
    assert comparison["differences"]["train.learning_rate"] == [1e-2, 1e-3]
    assert "lora.r" not in comparison["differences"]  # only what differs
    evaluation = json.loads((first / "metrics.json").read_text())["metrics"]
    assert comparison["scores"]["contains"][0]["tuned"] == evaluation["contains"]["tuned"]["mean"]
    assert comparison["scores"]["contains"][1] == {"base": None, "tuned": None}
    cli.main(["runs", "compare", str(first), str(second)])
    text = capsys.readouterr().out
    assert "train.learning_rate" in text and "contains the reference" in text
    assert comparison["questions"][1] is None and comparison["caveats"] == []  # one base, one evaluation


def test_compare_says_when_the_figures_do_not_compare(two_runs, tmp_path, capsys):
    """Other questions, or another tokenizer, under figures side by side: said, not left to be guessed."""
    import shutil

    _, (first, _) = two_runs
    other = tmp_path / "other"
    shutil.copytree(first, other)
    report = json.loads((other / "metrics.json").read_text())
    report["settings"] |= {"test": "mine.jsonl", "questions": 6}
    (other / "metrics.json").write_text(json.dumps(report))
    config = (other / "config.yaml").read_text()
    base = next(line.split(":", 1)[1].strip() for line in config.splitlines() if line.strip().startswith("base:"))
    (other / "config.yaml").write_text(config.replace(base, str(tmp_path / "another-model"), 1))
    (tmp_path / "another-model").mkdir()
    capsys.readouterr()
    cli.main(["runs", "compare", str(first), str(other)])
    text = capsys.readouterr().out
    assert "questions answered" in text and "6 of mine.jsonl" in text
    assert "note: the runs were scored on different questions" in text
    assert "note: the runs tune different base models: held-out loss and perplexity" in text


@pytest.mark.parametrize("argv, message", [
    (["runs", "compare", "{first}"], "needs at least two run folders"),
    (["runs", "compare", "{first}", "{root}/nowhere"], "nowhere does not exist"),
    (["runs", "compare", "{first}", "{root}"], "is not an affiner run folder"),
    (["runs", "--dir", "{root}/nowhere"], "nowhere does not exist"),
    (["runs", "lsit"], "affiner runs lsit: not list, compare or a folder of runs"),
    (["runs", "{root}", "{first}"], "to compare run folders: affiner runs compare"),
    (["runs", "{first}"], "is a run folder: affiner runs --dir"),
])
def test_wrong_input_is_one_paragraph_and_exit_2(two_runs, capsys, argv, message):
    root, (first, _) = two_runs
    with pytest.raises(SystemExit) as exit_info:
        cli.main([a.format(first=first, root=root) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err
