"""The no-harm check: the general set, its verdict, and where a reader finds it."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from affiner.core.config import load_config
from affiner.evaluation.evaluate import evaluate
from affiner.core.formatting import general_verdict
from affiner.evaluation.general import general_examples, general_tables, no_harm
from affiner.evaluation.generation import Answer
from affiner.evaluation.scoring import score_answers
from affiner.experiments import workflow
from conftest import write_config


def _answers(texts):
    return [Answer(text=t, stopped=True, tokens=len(t.split())) for t in texts]


def _section(base_losses, tuned_losses):
    examples = general_examples()[:len(base_losses)]
    answers = {"base": _answers(["Paris."] * len(examples)), "tuned": _answers(["X stands for Y."] * len(examples))}
    scores = {m: score_answers(examples, a) for m, a in answers.items()}
    counts = [10] * len(examples)
    return no_harm(examples, answers, scores, {"base": ([10 * x for x in base_losses], counts),
                                               "tuned": ([10 * x for x in tuned_losses], counts)})


def test_the_general_set_is_everyday_english_and_french_with_references():
    examples = general_examples()
    assert len(examples) >= 80 and all(e.expected.strip() for e in examples)
    rows = json.loads(resources.files("affiner").joinpath("resources/general.json").read_text(encoding="utf-8"))
    assert {r["lang"] for r in rows} == {"en", "fr"} and len({r["kind"] for r in rows}) >= 6


def test_a_fine_tune_that_raised_the_loss_everywhere_is_measurable_harm():
    section = _section([1.0, 1.2, 0.9, 1.1] * 5, [2.0, 1.3, 1.0, 1.9] * 5)
    change = section["changes"]["tuned"]
    assert change["verdict"] == "measurable harm" and change["loss_change"]["low"] > 0
    assert change["harmed"] == 10  # the items whose loss rose by more than 0.5 nats per token
    assert change["shown"][0]["loss"] == [1.0, 2.0] and change["shown"][0]["tuned"] == "X stands for Y."
    assert general_verdict(section, "tuned").startswith("tuned: measurable harm on general ability (loss of the "
                                                     "references, mean change per item +0.500 nats per token")


def test_noise_around_zero_is_no_measurable_harm():
    section = _section([1.0, 1.2, 0.9, 1.1] * 5, [1.1, 1.1, 1.0, 1.0] * 5)
    assert section["changes"]["tuned"]["verdict"] == "no measurable harm"
    assert section["changes"]["tuned"]["harmed"] == 0
    verdicts, tables = general_tables(section)
    assert verdicts == [general_verdict(section, "tuned")] and len(tables) == 1  # nothing harmed: no item table
    # The table's loss is token-weighted, the verdict's change a mean over items: never labelled alike, nor as the
    # task's held-out loss.
    (_, _, rows), = tables
    assert rows[0][0] == "loss of the general references (token-weighted)" and "mean change per item" in verdicts[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_gpt2):
    folder = tmp_path_factory.mktemp("general")
    config = write_config(folder, tiny_gpt2, "embedded:glossary-train.json", train={"max_steps": 2},
                          eval={"max_new_tokens": 4, "batch_size": 16, "general": True})
    return workflow.train(load_config(str(config)))


def test_every_evaluation_reports_general_ability_beside_the_task(tiny_run):
    evaluation = evaluate(tiny_run, max_questions=2)
    general = evaluation["general"]
    assert general["items"] == len(general_examples()) and general["models"] == ["base", "tuned"]
    assert general["changes"]["tuned"]["verdict"] in {"measurable harm", "no measurable harm", "better"}
    assert general["figures"]["base"]["loss"]["mean"] > 0
    report = (tiny_run / "report.md").read_text()
    assert "## General ability (no-harm check)" in report and general_verdict(general, "tuned") in report
    assert "General ability (no-harm check)" in (tiny_run / "report.html").read_text()
    assert json.loads((tiny_run / "metrics.json").read_text())["general"]["items"] == general["items"]
    assert json.loads((tiny_run / "summary.json").read_text())["general"] == {
        "tuned": general["changes"]["tuned"]["verdict"]}


def test_eval_general_false_skips_it(tiny_run, tmp_path):
    from conftest import copy_run

    run = copy_run(tiny_run, tmp_path, eval__general=False)
    evaluation = evaluate(run, max_questions=2)
    assert "general" not in evaluation and "General ability" not in (run / "report.md").read_text()


def test_the_command_line_overrides_eval_general_both_ways(tiny_run, tmp_path):
    from conftest import copy_run, run_cli

    assert run_cli("evaluate", str(tiny_run), "--max-questions", "2", "--no-general") == 0
    assert "general" not in json.loads((tiny_run / "metrics.json").read_text())
    run = copy_run(tiny_run, tmp_path, eval__general=False)
    assert run_cli("evaluate", str(run), "--max-questions", "2", "--general") == 0
    assert json.loads((run / "metrics.json").read_text())["general"]["models"] == ["base", "tuned"]


def test_general_answers_keep_their_own_limit_under_a_longer_task_limit(tiny_run, monkeypatch):
    from affiner.evaluation import evaluate as evaluate_module
    from affiner.evaluation.general import MAX_NEW_TOKENS

    limits = {}
    real = evaluate_module.generate

    def recording(model, tokenizer, template, examples, limit, *args, desc="", **kwargs):
        answers = real(model, tokenizer, template, examples, limit, *args, desc=desc, **kwargs)
        limits[desc.split()[0]] = (limit, [a.tokens for a in answers])
        return answers

    general = len(general_examples())
    monkeypatch.setattr(evaluate_module, "generate", recording)
    evaluate(tiny_run, max_questions=1, max_new_tokens=MAX_NEW_TOKENS + 20)
    for model in ("base", "tuned"):  # one question of the task, then the general set, in one queue
        asked, tokens = limits[model]
        assert asked == [MAX_NEW_TOKENS + 20] + [MAX_NEW_TOKENS] * general
        assert max(tokens[1:]) <= MAX_NEW_TOKENS  # a random tiny model never stops: answers run to their limit
    evaluate(tiny_run, max_questions=1, max_new_tokens=8, reuse_base=False)
    assert limits["base"][0] == limits["tuned"][0] == [8] * (1 + general)  # a lower task limit applies to both
