"""Held-out rows are evaluated whatever the length of their answer: data.max_length is a training limit. Only a
prompt the model cannot read (over its context) leaves a row out, and the report lists it with why."""

from __future__ import annotations

import json

import pytest

from affiner.core.config import load_config
from affiner.core.runfolder import RunFolder
from affiner.evaluation.evaluate import evaluate
from affiner.experiments import workflow
from conftest import write_config

LONG_ANSWER = "Long answer: " + "many words here " * 120  # well over max_length (96) and the context (256)
UNREADABLE = "Question " + "far too long " * 200  # a prompt over the tiny GPT-2's 256 positions


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_gpt2):
    folder = tmp_path_factory.mktemp("held-out")
    test = folder / "test.jsonl"
    rows = [{"question": "What is a zorble?", "answer": "A made-up word."},
            {"question": "Tell me a long story.", "answer": LONG_ANSWER},
            {"question": UNREADABLE, "answer": "Never asked."}]
    test.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = write_config(folder, tiny_gpt2, "embedded:glossary-train.json", data={"test": str(test)},
                          train={"max_steps": 1}, eval={"max_new_tokens": 4, "general": False})
    return workflow.train(load_config(str(config)))


def test_a_long_answer_is_held_out_and_an_unreadable_prompt_is_listed(run):
    questions = [e.instruction for e in RunFolder(run).held_out()]
    assert questions == ["What is a zorble?", "Tell me a long story."]
    dropped = json.loads((run / "data.json").read_text())["test"]["dropped"]
    assert dropped["count"] == 1 and dropped["rows"][0]["reason"] == "prompt over the model's context (256 tokens)"


def test_the_report_lists_rows_not_evaluated_and_long_references_scored_in_part(run):
    evaluation = evaluate(run)
    settings = evaluation["settings"]
    assert settings["questions"] == 2
    assert settings["held-out rows not evaluated"] == "1 (1 prompt over the model's context (256 tokens))"
    assert settings["references past the context (loss on the part that fits)"] == 1
    assert evaluation["metrics"]["loss"]["tuned"]["mean"] > 0  # the long reference is scored, not skipped
    report = (run / "report.md").read_text()
    assert "## Held-out rows not evaluated" in report and "far too long" in report
    assert "Held-out rows not evaluated" in (run / "report.html").read_text()


def test_evaluate_with_a_test_file_keeps_long_answers_and_lists_unreadable_prompts(run, tmp_path):
    test = tmp_path / "other.jsonl"
    test.write_text(json.dumps({"question": "Long?", "answer": LONG_ANSWER}) + "\n"
                    + json.dumps({"question": UNREADABLE, "answer": "x"}) + "\n", encoding="utf-8")
    evaluation = evaluate(run, test=str(test))
    assert evaluation["settings"]["questions"] == 1
    assert evaluation["not_evaluated"]["rows"][0]["reason"] == "prompt over the model's context (256 tokens)"


def test_a_test_row_with_a_reference_only_keeps_the_others_losses_and_a_row_without_question_is_listed(run, tmp_path):
    """A --test row whose answer is empty but whose reference is given is scored on its text; its loss cannot be
    taken, which must not take every model's held-out loss away. A row without question is listed, not asked."""
    test = tmp_path / "mixed.jsonl"
    rows = [{"question": "What is a zorble?", "answer": "A made-up word."},
            {"question": "What is a blix?", "answer": "", "reference": "A small fish."},
            {"question": "  ", "answer": "Nobody asked."}]
    test.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    whole = evaluate(run, test=str(test))
    assert whole["settings"]["questions"] == 2
    assert [row["reason"] for row in whole["not_evaluated"]["rows"]] == ["empty question"]
    assert whole["settings"]["questions without an answer to take the loss of (a reference only)"] == 1
    test.write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    alone = evaluate(run, test=str(test))
    for model in ("base", "tuned"):  # the loss is the scored row's alone
        assert whole["metrics"]["loss"][model]["mean"] == pytest.approx(alone["metrics"]["loss"][model]["mean"])


def test_a_held_out_file_row_with_a_reference_only_is_kept_as_evaluate_keeps_it(tmp_path, tiny_gpt2):
    """data.test rows are held out as `evaluate --test` holds them: a row with a reference and no answer is
    asked and scored on its text (its loss cannot be taken); training never sees it."""
    test = tmp_path / "test.jsonl"
    rows = [{"question": "What is a zorble?", "answer": "A made-up word."},
            {"question": "What is a blix?", "answer": "", "reference": "A small fish."}]
    test.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = write_config(tmp_path, tiny_gpt2, "embedded:glossary-train.json", data={"test": str(test)},
                          train={"max_steps": 1}, eval={"max_new_tokens": 4, "general": False})
    run = workflow.train(load_config(str(config)))
    assert [e.instruction for e in RunFolder(run).held_out()] == ["What is a zorble?", "What is a blix?"]
    evaluation = evaluate(run)
    assert evaluation["settings"]["questions"] == 2 and "loss" in evaluation["metrics"]
    assert evaluation["settings"]["questions without an answer to take the loss of (a reference only)"] == 1
